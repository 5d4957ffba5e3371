"""The `ucgm` command line (typer + rich): thin commands over the library jobs (ucgm_convert.jobs)."""

from __future__ import annotations

import typer

from .bench import bench_command
from .common import OneLineErrors
from .convert import convert_command
from .eval import eval_app
from .prepare import prepare_command
from .push import push_command
from .recipes import recipes_app
from .sample import sample_command
from .search import search_command
from .tune import tune_command

app = typer.Typer(
    name="ucgm",
    cls=OneLineErrors,
    help="Load third-party diffusion / flow checkpoints and make them fast (UCGM-S, UCGM-T).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(recipes_app, name="recipes")
app.command("sample")(sample_command)
app.command("convert")(convert_command)
app.command("prepare-data")(prepare_command)
app.add_typer(eval_app, name="eval")
app.command("push")(push_command)
app.command("tune")(tune_command)
app.command("bench")(bench_command)
app.command("search")(search_command)


def main() -> None:
    """Entry point of the `ucgm` console script."""
    app()
