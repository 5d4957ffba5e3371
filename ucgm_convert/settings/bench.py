"""Benchmark settings: what `ucgm bench` / `python -m bench` run, where, at which size."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Bool, Int, Settings


class BenchSettings(Settings):
    """Which benchmarks run on which device and network size, how often each timing repeats, where results go."""

    only: str | None = Field(default=None, description="Comma-separated benchmarks to run (default: all): "
                             "sampler, guidance, tuning, loading, precision, quality, demo.")
    device: str = Field(default="cpu", description="Torch device to time on (cpu, cuda, cuda:1).")
    size: Literal["small", "xl"] = Field(default="small", description="Network sizes: small (CPU, minutes) or xl "
                                         "(full-size random networks of each family, for a GPU).")
    quick: Bool = Field(default=False, description="The smallest run that still exercises every code path.")
    repeats: Int = Field(default=7, ge=1, le=1000, description="Timed repeats per measurement (the median is kept).")
    out: Path = Field(default=Path("bench/results"), description="Folder for the results (*.json, *.png).")
