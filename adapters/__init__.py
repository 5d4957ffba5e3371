"""Source-family adapters (installed as ucgm_convert.adapters)."""
