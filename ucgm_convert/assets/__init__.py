"""Data files shipped with the package (the embedded demo model)."""
