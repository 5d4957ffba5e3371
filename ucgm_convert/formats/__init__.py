"""Reading checkpoint files without running code from them: torch zips, pickles, safetensors, state dicts."""
