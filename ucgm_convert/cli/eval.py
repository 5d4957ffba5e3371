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
    help="Measure FID / Inception Score the way papers report them (torch-fidelity's Inception, ADM reference stats).",
    no_args_is_help=True,
)
NPROC = typer.Option(1, "--nproc", help="Processes (GPUs) on this machine: relaunches under torchrun. Results do "
                     "not depend on it.")


@eval_app.command("fid")
@clean_errors
@flags
def fid_command(config: Annotated[evaluate.EvalConfig, EVAL], nproc: int = NPROC) -> None:
    """Sample NUM images with UCGM-S and report FID and Inception Score against --ref; writes OUT/results.json."""
    relaunch_if_asked(nproc)
    evaluate.run(config, Reporter())


@eval_app.command("ref")
@clean_errors
@flags
def ref_command(config: Annotated[evaluate.RefConfig, EVAL_REF]) -> None:
    """Build reference statistics (mu, sigma of Inception pool3 features) from images; images are not resized."""
    evaluate.run_ref(config, Reporter())
