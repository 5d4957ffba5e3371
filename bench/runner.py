"""Runs the benchmarks a `BenchSettings` selects, prints each table and writes OUT/<name>.json (plots: OUT/*.png)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from ucgm_convert.cli.common import clean_errors
from ucgm_convert.cli.groups import BENCH
from ucgm_convert.cli.options import flags
from ucgm_convert.errors import UCGMError
from ucgm_convert.foundation import check_writable_dir, resolve_device, write_text_atomic
from ucgm_convert.settings import BenchSettings

from . import demo, guidance, loading, precision, quality, sampler, search_demo, search_proof, tuning
from .core import Options, Result

BENCHMARKS = {m.__name__.rsplit(".", 1)[-1]: m for m in (sampler, guidance, tuning, loading, precision, quality, demo)}
# The proofs of `uc.search` take tens of minutes on 2 CPU cores: run only when `--only` names them.
LONG = {m.__name__.rsplit(".", 1)[-1]: m for m in (search_proof, search_demo)}
ALL = {**BENCHMARKS, **LONG}


def selected(only: str | None) -> list[str]:
    """The benchmark names `--only` asks for (all when None); UCGMError for an unknown one."""
    if only is None:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
        raise UCGMError(f"--only: expected names among {', '.join(ALL)}, got {only!r}")
    return names


def machine() -> dict[str, Any]:
    """What the timings depend on: CPU count and threads, device, torch and Python versions."""
    info = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def show(console: Console, result: Result, seconds: float, cpu: float) -> None:
    """The result as a rich table, with its notes under it."""
    table = Table(title=f"{result.title}  [dim]({seconds:.0f} s, {cpu:.0f} CPU s)[/dim]", title_justify="left")
    for column in result.columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*[str(v) for v in row])
    console.print(table)
    for note in result.notes:
        console.print(f"  [yellow]{note}[/yellow]")
    for plot in result.plots:
        console.print(f"  plot: {plot}")


def save(result: Result, opts: Options, seconds: float, cpu: float) -> None:
    """OUT/<name>.json: the table, the notes, the plots, the raw data, the options and the machine."""
    payload = dataclasses.asdict(result)
    payload.update(seconds=seconds, cpu_seconds=cpu, options={k: str(v) for k, v in dataclasses.asdict(opts).items()},
                   machine=machine(), plots=[str(p) for p in result.plots])
    write_text_atomic(opts.out / f"{result.name}.json", json.dumps(payload, indent=2, default=str) + "\n")


def run_all(settings: BenchSettings) -> dict[str, Result]:
    """Run each selected benchmark in turn; results by name."""
    names = selected(settings.only)
    device = str(resolve_device(settings.device))
    out = check_writable_dir(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = Options(device=device, size=settings.size, quick=settings.quick, out=out, repeats=settings.repeats)
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep whole rows
    results, start, cpu_start = {}, time.perf_counter(), time.process_time()
    for name in names:
        t0, c0 = time.perf_counter(), time.process_time()
        result = ALL[name].run(opts)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        save(result, opts, seconds, cpu)
        show(console, result, seconds, cpu)
        results[name] = result
    console.print(f"[bold]{len(names)} benchmark(s) in {time.perf_counter() - start:.0f} s "
                  f"({time.process_time() - cpu_start:.0f} CPU s in this process)[/bold]; results in {out}")
    return results


@clean_errors
@flags
def command(settings: Annotated[BenchSettings, BENCH]) -> None:
    """Run the speed and quality benchmarks: tables, OUT/*.json and OUT/*.png."""
    run_all(settings)


def main() -> None:
    """`python -m bench`: the same flags as `ucgm bench`."""
    typer.run(command)
