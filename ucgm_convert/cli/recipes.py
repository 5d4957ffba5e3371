"""`ucgm recipes`: list the shipped recipes and show one."""

from __future__ import annotations

from typing import Any

import typer
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..console import stdout
from ..recipe import META_FIELDS, Recipe, list_recipes, load_recipe, recipe_text
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


def _fields_table(obj: Settings, title: str, recipe: Recipe, section: str = "",
                 extra: dict[str, str] | None = None) -> Table:
    """One row per scalar field of a recipe section: value and where it comes from (recipe.provenance)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for name in type(obj).model_fields:
        if name in _SECTIONS or name in ("borrowed", "source"):
            continue
        source = "" if name in META_FIELDS else recipe.provenance(f"{section}.{name}" if section else name)
        style = "yellow" if source.startswith("borrowed") else None
        table.add_row(name, _format(getattr(obj, name)), source, style=style)
    for key, value in (extra or {}).items():
        table.add_row(key, value, "derived", style="dim")
    return table


def _sampling_table(recipe: Recipe, section: str, title: str) -> Table:
    settings: SamplingSettings = getattr(recipe, section)
    guidance = "off" if not settings.uses_guidance else f"{settings.cfg_scale:g} on {_format(settings.cfg_interval)}"
    evaluations = settings.evaluations(recipe.transport)
    return _fields_table(settings, title, recipe, section, {
        "guidance": guidance,
        "NFE (paper count)": settings.nfe_label,
        "forward passes / sample": f"{evaluations} (cond+uncond count 2 inside the interval)"
        if settings.uses_guidance else str(evaluations),
    })


def _papers_table(recipe: Recipe) -> Table | None:
    rows = [("before (source sampler)", "paper_before"), ("after (UCGM-S)", "paper_after"),
            ("tuned (UCGM-T)", "paper_tuned")]
    rows = [(label, key) for label, key in rows if getattr(recipe, key) is not None]
    if not rows:
        return None
    table = Table(title="paper results (UCGM README)", title_justify="left", box=box.SIMPLE)
    for column in ("", "NFE", "FID", "uint8", "note", "source"):
        table.add_column(column, overflow="fold")
    for label, key in rows:
        result = getattr(recipe, key)
        table.add_row(label, result.nfe, f"{result.fid:g}", result.uint8 or "-", result.details(),
                      recipe.provenance(key))
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
    parts: list[Any] = [_fields_table(recipe, f"recipe {recipe.name}", recipe),
                        Text(f"published values from: {recipe.source or '-'}\n", overflow="fold")]
    parts.append(_sampling_table(recipe, "sampling", "sampling (UCGM-S)"))
    if recipe.few_step_sampling is not None:
        parts.append(_sampling_table(recipe, "few_step_sampling", "few_step_sampling (after UCGM-T)"))
    if recipe.tuning is not None:
        parts.append(_fields_table(recipe.tuning, "tuning (UCGM-T)", recipe, "tuning"))
    papers = _papers_table(recipe)
    if papers is not None:
        parts.append(papers)
    stdout.print(Panel(Group(*parts), title=recipe.name, subtitle=recipe.family, expand=False))
