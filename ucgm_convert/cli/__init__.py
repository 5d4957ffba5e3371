"""The `ucgm` command line (typer + rich)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ucgm",
    help="Load third-party diffusion / flow checkpoints and make them fast (UCGM-S, UCGM-T).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def main() -> None:
    """Entry point of the `ucgm` console script."""
    app()
