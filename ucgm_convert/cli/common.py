"""Helpers shared by the `ucgm` commands: one-line errors, list parsing, consoles."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import UCGMError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    """Print one red error line to stderr and exit with status 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def clean_errors(func: F) -> F:
    """Turn UCGMError (bad input) into a one-line message instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UCGMError as err:
            fail(str(err))

    return wrapper  # type: ignore[return-value]


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """'3,7,9' or 'all' (default) -> class ids, each checked against the model's classes."""
    if text is None or text.strip().lower() == "all":
        return list(range(num_classes))
    try:
        classes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UCGMError(f"--classes: expected comma-separated integers or 'all', got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise UCGMError(f"--classes: class ids must be in [0, {num_classes - 1}], got {text!r}")
    return classes
