"""`ucgm recipes`: list the shipped recipes and show one."""

from __future__ import annotations

from typing import Any

import typer
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from ..console import stdout
from ..recipe import Recipe, list_recipes, load_recipe, recipe_text
from ..settings import SamplingSettings, Settings
from .common import clean_errors

recipes_app = typer.Typer(
    help="Published UCGM-S / UCGM-T settings per source model (use one with --from NAME).",
    no_args_is_help=True,
)


def _before_after(before: str | None, after: str | None) -> str:
    if before is None and after is None:
        return "-"
    return f"{before or '?'} → {after or '?'}"


@recipes_app.command("list")
@clean_errors
def list_command() -> None:
    """List the shipped recipes: model, UCGM-S cost, and the paper's FID before -> after UCGM-S."""
    table = Table(title="ucgm recipes", box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for column, justify in (("name", "left"), ("family", "left"), ("model", "left"), ("res", "right"),
                            ("transport", "left"), ("UCGM-S\nNFE", "right"), ("paper FID\nbefore → after", "left")):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.columns[0].style = "bold cyan"
    for recipe in list_recipes():
        before, after = recipe.paper_before, recipe.paper_after
        table.add_row(
            recipe.name,
            recipe.family,
            recipe.model,
            str(recipe.resolution),
            recipe.transport,
            recipe.sampling.nfe_label,
            _before_after(before and f"{before.fid:g}", after and f"{after.fid:g}"),
        )
    stdout.print(table)
    stdout.print("paper FID: the source's own sampler → UCGM-S, as the UCGM README reports them "
                  "(NFE and notes: `ucgm recipes show NAME`). Use a recipe with --from NAME.", style="dim")


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_SECTIONS = ("sampling", "few_step_sampling", "tuning", "paper_before", "paper_after", "paper_tuned")


def _fields_table(obj: Settings, title: str, extra: dict[str, str] | None = None) -> Table:
    """One row per scalar field of a recipe dataclass (sections get their own tables)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name in type(obj).model_fields:
        if name not in _SECTIONS:
            table.add_row(name, _format(getattr(obj, name)))
    for key, value in (extra or {}).items():
        table.add_row(key, value, style="dim")
    return table


def _sampling_table(settings: SamplingSettings, transport: str, title: str) -> Table:
    guidance = "off" if not settings.uses_guidance else f"{settings.cfg_scale:g} on {_format(settings.cfg_interval)}"
    return _fields_table(settings, title, {
        "guidance": guidance,
        "NFE (paper count)": settings.nfe_label,
        "forward passes / sample": f"{settings.evaluations(transport)} (cond+uncond count 2 inside the interval)"
        if settings.uses_guidance else str(settings.evaluations(transport)),
    })


def _papers_table(recipe: Recipe) -> Table | None:
    rows = [("before (source sampler)", recipe.paper_before), ("after (UCGM-S)", recipe.paper_after),
            ("tuned (UCGM-T)", recipe.paper_tuned)]
    rows = [(label, result) for label, result in rows if result is not None]
    if not rows:
        return None
    table = Table(title="paper results (UCGM README)", title_justify="left", box=box.SIMPLE)
    for column in ("", "NFE", "FID", "uint8", "note"):
        table.add_column(column, overflow="fold")
    for label, result in rows:
        table.add_row(label, result.nfe, f"{result.fid:g}", result.uint8 or "-", result.note)
    return table


@recipes_app.command("show")
@clean_errors
def show_command(
    name: str = typer.Argument(..., help="Recipe name (see `ucgm recipes list`) or a path to a .yaml file."),
    raw_yaml: bool = typer.Option(False, "--yaml", help="Print the recipe's YAML file as it is, comments included."),
) -> None:
    """Show every setting of one recipe."""
    if raw_yaml:
        typer.echo(recipe_text(name), nl=False)
        return
    recipe = load_recipe(name)
    parts: list[Any] = [_fields_table(recipe, f"recipe {recipe.name}")]
    parts.append(_sampling_table(recipe.sampling, recipe.transport, "sampling (UCGM-S)"))
    if recipe.few_step_sampling is not None:
        parts.append(_sampling_table(recipe.few_step_sampling, recipe.transport, "few_step_sampling (after UCGM-T)"))
    if recipe.tuning is not None:
        parts.append(_fields_table(recipe.tuning, "tuning (UCGM-T)"))
    papers = _papers_table(recipe)
    if papers is not None:
        parts.append(papers)
    stdout.print(Panel(Group(*parts), title=recipe.name, subtitle=recipe.family, expand=False))
