"""Speed and quality benchmarks (`python -m bench`, `ucgm bench`); installed as ucgm_convert.bench."""
