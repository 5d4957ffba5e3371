"""What every `ucgm` command shares: one `error:` line for bad input (ours and click's), never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer._click.exceptions import ClickException, UsageError  # typer vendors click; no public name
from typer.core import TyperGroup

from ..console import error_line
from ..distributed import launched_by_torchrun, relaunch_with_torchrun
from ..errors import UCGMError

F = TypeVar("F", bound=Callable[..., Any])
BAD_INPUT = 2


def clean_errors(func: F) -> F:
    """Turn UCGMError (bad input) into one `error:` line on stderr (rank 0 only) and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UCGMError as err:
            error_line(str(err))
            raise typer.Exit(BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


def relaunch_if_asked(nproc: int) -> None:
    """`--nproc N` (N > 1) outside torchrun: run this same command under torchrun and exit with its status."""
    if isinstance(nproc, bool) or nproc < 1:
        raise UCGMError(f"--nproc: expected an integer >= 1, got {nproc}")
    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc))


class OneLineErrors(TyperGroup):
    """The root command: click's usage errors (unknown flag, bad integer, missing option) as one `error:` line."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as err:
            if not standalone_mode:
                raise
            error_line(err.format_message())
            sys.exit(BAD_INPUT if isinstance(err, UsageError) else err.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            error_line("aborted")
            sys.exit(1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)
