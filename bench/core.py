"""What every benchmark module in bench/ shares: its options, its result, and how it times things.

A benchmark is a module `bench/<name>.py` with `TITLE: str` and `run(opts: Options) -> Result`.
Timings are medians of repeated runs reported as ratios against a baseline timed in the same run.
"""

from __future__ import annotations

import io
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ucgm_convert.foundation import write_file_atomic


@dataclass(frozen=True)
class Options:
    """How a benchmark runs: where, at which model size, and where its files go."""

    device: str = "cpu"
    size: str = "small"  # "small" (CPU, minutes) or "xl" (full-size random networks, for a GPU)
    quick: bool = False  # the smallest run that still exercises every code path (used by the tests)
    out: Path = Path("bench/results")
    repeats: int = 7


@dataclass
class Result:
    """One benchmark's table (rows of `columns`), its plots on disk, and notes saying where we lose."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """Median and spread (min, max) of repeated wall times, in seconds."""

    median: float
    low: float
    high: float

    def ratio(self, baseline: Timing) -> float:
        return self.median / baseline.median


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Wall time of `fn()` over `repeats` runs after `warmup` untimed ones; `sync` waits for a device."""
    for _ in range(warmup):
        fn()
    times = [_wall(fn, sync) for _ in range(repeats)]
    return Timing(statistics.median(times), min(times), max(times))


def _wall(fn: Callable[[], Any], sync: Callable[[], None] | None) -> float:
    """Seconds of one `fn()`, the device synchronised before and after when `sync` is given."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def rounds(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
           sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall times of each function over `repeats` interleaved rounds (each round runs every function once).

    Interleaving makes the per-round ratios robust to a shared machine's load changing between runs; the
    order rotates from round to round so that no function always runs first (or right after another).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_wall(fns[name], sync))
    return times


def summary(values: Sequence[float]) -> Timing:
    """Median and (min, max) of a list of measurements."""
    return Timing(statistics.median(values), min(values), max(values))


def ratio(times: Sequence[float], baseline: Sequence[float], scale: float = 1.0) -> Timing:
    """Per-round ratios times[i] / (scale * baseline[i]): their median and (min, max)."""
    return summary([a / (scale * b) for a, b in zip(times, baseline)])


def cell(value: Timing, digits: int = 3) -> str:
    """'median (min-max)' for a table."""
    return f"{value.median:.{digits}f} ({value.low:.{digits}f}-{value.high:.{digits}f})"


def sync_for(device: str) -> Callable[[], None] | None:
    """The function that waits for `device`'s queued work (None on the CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a new (spawned) Python process, for peak-memory readings; its exception is re-raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def save_figure(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Write a matplotlib figure to `path` as PNG (atomically, parent folders created) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    fig.clf()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, buffer.getvalue())
    return path
