"""torch.distributed plumbing shared by `ucgm tune` and `ucgm eval fid`.

Processes are started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) or by
`--nproc N`, which re-launches the same command under torchrun. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or torch.distributed.run)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | None = None) -> Context:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    if not launched_by_torchrun():
        return Context(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


@contextlib.contextmanager
def session(device: str | None = None) -> Iterator[Context]:
    """`setup(device)` for the duration of a job; leaves the process group only if it joined it here."""
    joined_before = dist.is_available() and dist.is_initialized()
    ctx = setup(device)
    try:
        yield ctx
    finally:
        if not joined_before:
            teardown(ctx)


def barrier(ctx: Context) -> None:
    """Wait for every process (no-op when alone)."""
    if ctx.distributed:
        dist.barrier()


def teardown(ctx: Context) -> None:
    """Leave the process group."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def without_nproc(argv: Sequence[str]) -> list[str]:
    """argv minus `--nproc N` / `--nproc=N`: torchrun's own parser would reject it as an
    ambiguous abbreviation of its --nproc-per-node, and the children must not relaunch."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch_with_torchrun(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run this same `ucgm` command under torchrun with `nproc` processes; returns the exit code
    of the first failing process (2 for bad input, which that process has already reported).

    Only torchrun's own options go through its argument parser: the command's arguments are
    set directly, so none of them can be taken for an abbreviation of a torchrun option.
    """
    args = get_args_parser().parse_args([f"--nproc_per_node={nproc}", "--standalone", "-m", "ucgm_convert"])
    args.training_script_args = without_nproc(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values() if failure.exitcode]
        return codes[0] if codes and codes[0] > 0 else 1
    return 0
