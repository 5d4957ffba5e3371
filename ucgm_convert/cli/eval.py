"""`ucgm eval fid` (sample + Inception features + FID/IS, sharded and resumable) and `ucgm eval ref`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import Reporter
from ..jobs import evaluate
from .common import clean_errors, relaunch_if_asked
from .groups import EVAL, EVAL_REF
from .options import flags

eval_app = typer.Typer(
    help="Measure FID, sFID, IS, precision, recall and FD_DINOv2 the way papers report them (ADM evaluator settings).",
    no_args_is_help=True,
)
NPROC = typer.Option(1, "--nproc", help="Processes (GPUs) on this machine: relaunches under torchrun. Results do "
                     "not depend on it.")


@eval_app.command("fid")
@clean_errors
@flags
def fid_command(config: Annotated[evaluate.EvalConfig, EVAL], nproc: int = NPROC) -> None:
    """Sample NUM images with UCGM-S and report --metrics against --ref; writes OUT/results.json. A sampling flag
    with several values (--steps 4,8,16) runs a sweep: one evaluation per value, a table and plots."""
    relaunch_if_asked(nproc)
    evaluate.run(config, Reporter())


@eval_app.command("ref")
@clean_errors
@flags
def ref_command(config: Annotated[evaluate.RefConfig, EVAL_REF]) -> None:
    """Build a reference (FID and sFID statistics, pool rows, DINOv2 statistics) from images; never resized."""
    evaluate.run_ref(config, Reporter())
