"""`ucgm bench`: the speed and quality benchmarks (bench/, installed as ucgm_convert.bench)."""

from __future__ import annotations

import importlib
from typing import Annotated

from ..errors import UCGMError
from ..settings import BenchSettings
from .common import clean_errors
from .groups import BENCH
from .options import flags


@clean_errors
@flags
def bench_command(settings: Annotated[BenchSettings, BENCH]) -> None:
    """Run the benchmarks: print tables, write OUT/*.json and OUT/*.png (see bench/README.md)."""
    # Imported when run: the benchmarks pull in matplotlib and diffusers' schedulers, which no other command needs.
    try:
        runner = importlib.import_module("ucgm_convert.bench.runner")
    except ModuleNotFoundError as err:
        raise UCGMError(f"the benchmarks are not installed ({err}); reinstall the package (pip install -e .)") from None
    runner.run_all(settings)
