"""Command-line flags generated from the settings models, so a field is declared once and every command
that takes its group shows it with the same name, help, type and bounds.

A command declares a parameter annotated with a `Group` (e.g. `sampling: Annotated[Settings,
SAMPLING]`); `@flags` replaces it in the signature typer sees by one option per field of the
group's model, and calls the command with the validated settings instance. A bad value is one
line naming the flag: ``--steps: expected an integer >= 1, got 0``.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from ..settings.base import Settings, SettingsError, _split

F = TypeVar("F", bound=Callable[..., Any])


def flag_of(name: str) -> str:
    """The default spelling of a field's flag: --steps, --cfg-scale."""
    return "--" + name.replace("_", "-")


def _base(annotation: Any) -> tuple[Any, bool]:
    """(the type without None and Annotated, whether None is allowed)."""
    hint, _ = _split(annotation, [])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        hint = _split(options[0], [])[0] if len(options) == 1 else typing.Union[tuple(options)]
        return hint, optional
    return hint, False


_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _cli_type(annotation: Any) -> tuple[Any, str | None]:
    """(the type typer parses, a metavar) for a settings field; pydantic checks the value afterwards."""
    hint, _ = _base(annotation)
    if hint in (int, float, Path):
        return hint, _TYPE_NAMES[hint]
    if hint is bool:
        return hint, None
    if typing.get_origin(hint) is Literal:
        return str, "|".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return str, ",".join(["FLOAT"] * len(typing.get_args(hint)))
    if typing.get_origin(hint) is list and typing.get_args(hint) and _base(typing.get_args(hint)[0])[0] is Path:
        return list[Path], "PATH"  # a repeatable option
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return str, "|".join(_cli_type(a)[1] or _TYPE_NAMES.get(_base(a)[0], "TEXT") for a in typing.get_args(hint))
    return str, "TEXT"


def _metavar(info: Any, default: str | None) -> str | None:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("metavar", default)


@dataclass(frozen=True)
class Group:
    """A settings model exposed as flags.

    `flags`: field -> spellings (default `--field-name`); `only` / `skip`: which fields;
    `arguments`: fields taken as positional arguments; `note`: appended to every help text
    (e.g. "Default: the recipe's." for override groups, whose None means "not given");
    `sections`: the groups of nested settings fields (a job config's `source`, `sampling`, ...).
    """

    model: type[Settings]
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sections: Mapping[str, Group] = field(default_factory=dict)
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    arguments: tuple[str, ...] = ()
    note: str = ""

    def fields(self) -> list[str]:
        names = [n for n in self.model.model_fields if n not in self.sections]
        return [n for n in names if (self.only is None or n in self.only) and n not in self.skip]

    def spelling(self, name: str) -> tuple[str, ...]:
        return self.flags.get(name, (flag_of(name),))

    def parameters(self, prefix: str) -> list[inspect.Parameter]:
        """One typer parameter per field (and per field of each section), named `prefix__field`."""
        params = [p for section, group in self.sections.items() for p in group.parameters(f"{prefix}__{section}")]
        for name in self.fields():
            info = self.model.model_fields[name]
            kind, metavar = _cli_type(info.annotation)
            metavar = _metavar(info, metavar)
            required = info.is_required()
            default = ... if required else info.get_default(call_default_factory=True)
            help_text = " ".join(t for t in (info.description or "", self.note) if t)
            if name in self.arguments:
                option = typer.Argument(default, help=help_text, metavar=metavar or name.upper(),
                                        show_default=not required and default is not None)
            else:
                spellings = self.spelling(name)
                if kind is bool:
                    spellings = tuple(f"{s}/--no-{s[2:]}" for s in spellings[:1]) + spellings[1:]
                option = typer.Option(default, *spellings, help=help_text, metavar=metavar,
                                      show_default=not required and default not in (None, []))
            annotation = kind if required or default is not None else typing.Optional[kind]
            params.append(inspect.Parameter(f"{prefix}__{name}", inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
        return params

    def build(self, values: Mapping[str, Any]) -> Settings:
        """The group's settings from parsed flag values (`field` or `section__field`); UCGMError naming the flag."""
        sections = {name: group.build({k[len(name) + 2:]: v for k, v in values.items() if k.startswith(f"{name}__")})
                    for name, group in self.sections.items()}
        given = {k: v for k, v in values.items() if v is not None and "__" not in k}
        try:
            return self.model(**given, **sections)
        except SettingsError as err:
            raise err.as_flag(lambda name: self.spelling(name)[0]) from None


def flags(func: F) -> F:
    """Expand every `Annotated[..., Group]` parameter of a typer command into the group's flags."""
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    groups: dict[str, Group] = {}
    params: list[inspect.Parameter] = []
    for name, param in signature.parameters.items():
        hint = hints.get(name, param.annotation)
        group = next((m for m in typing.get_args(hint)[1:] if isinstance(m, Group)), None) \
            if typing.get_origin(hint) is Annotated else None
        if group is None:
            params.append(param.replace(annotation=hint))
            continue
        groups[name] = group
        params += group.parameters(name)

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        for name, group in groups.items():
            prefix = f"{name}__"
            values = {k[len(prefix):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}
            kwargs[name] = group.build(values)
        return func(**kwargs)

    ordered = sorted(params, key=lambda p: p.kind)
    wrapper.__signature__ = signature.replace(parameters=ordered)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
    return wrapper  # type: ignore[return-value]


def spellings(group: Group) -> list[str]:
    """Every flag spelling of a group and its sections (a command's flags must not repeat)."""
    own = [s for name in group.fields() if name not in group.arguments for s in group.spelling(name)]
    return own + [s for section in group.sections.values() for s in spellings(section)]
