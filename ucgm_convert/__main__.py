"""`python -m ucgm_convert` runs the `ucgm` command line."""

from .cli import main

main()
