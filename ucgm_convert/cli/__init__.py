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

from .recipes import recipes_app  # noqa: E402

app.add_typer(recipes_app, name="recipes")

from .sample import sample_command  # noqa: E402

app.command("sample")(sample_command)

from .convert import convert_command  # noqa: E402

app.command("convert")(convert_command)
from .prepare import prepare_command  # noqa: E402
app.command("prepare-data")(prepare_command)

from .eval import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")
from .push import push_command  # noqa: E402
app.command("push")(push_command)
from .tune import tune_command  # noqa: E402
app.command("tune")(tune_command)


def main() -> None:
    """Entry point of the `ucgm` console script."""
    app()
