"""Recipe YAML files, one per source model, shipped as package data."""
