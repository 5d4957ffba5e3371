"""Terminal output in one place: diagnostics on stderr, data on stdout, progress bars, error lines.

Every command prints what it is doing (settings tables, progress, notes, errors) to stderr and
what it produces as data (tables a user may pipe, raw YAML) to stdout. Under torchrun only
rank 0 prints, so an error is reported once.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

stderr = Console(stderr=True)
stdout = Console()


def is_main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0 (those stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def note(message: str, style: str = "yellow", label: str = "note") -> None:
    """One `label: message` line on stderr (main process only)."""
    if is_main_process():
        stderr.print(f"[{style}]{label}:[/] {message}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    """A plain line on stderr (main process only)."""
    if is_main_process():
        stderr.print(message, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """The one `error: ...` line of a failed command, on stderr (main process only)."""
    if is_main_process():
        stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


class SpeedColumn(ProgressColumn):
    """rich's own speed estimate of the task (`task.speed`), in `unit`/s."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = TaskProgressColumn.render_speed(speed).plain.replace("it/s", f"{self.unit}/s") if speed else ""
        return Text(text, style="progress.data.speed")


class Reporter:
    """What a job tells its user: settings tables, notes and progress. This one prints to stderr (rank 0)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and is_main_process()

    def table(self, title: str, rows: dict[str, object]) -> None:
        """A two-column table (setting, value)."""
        if self.enabled:
            table = Table(title=title, show_header=False)
            for key, value in rows.items():
                table.add_row(key, str(value))
            stderr.print(table)

    def grid(self, title: str, columns: list[str], rows: list[list[object]]) -> None:
        """A table with a header row (a sweep's summary)."""
        if self.enabled:
            table = Table(title=title)
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(*map(str, row))
            stderr.print(table)

    def note(self, message: str) -> None:
        if self.enabled:
            note(message)

    def info(self, message: str) -> None:
        if self.enabled:
            info(message)

    def progress(self, unit: str, *fields: str) -> Progress:
        return progress(unit, *fields, enabled=self.enabled)


SILENT = Reporter(enabled=False)


def progress(unit: str, *fields: str, enabled: bool = True) -> Progress:
    """A rich progress bar: description, bar, done/total, `fields` (task fields), speed in `unit`/s, times.

    Disabled (or on a worker process) it renders nothing, so callers never branch on it.
    """
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    columns += [SpeedColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=stderr, disable=not (enabled and is_main_process()))
