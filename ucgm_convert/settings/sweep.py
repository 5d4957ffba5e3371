"""Sweeps: every field of an overrides model may take a list of values, one run per combination.

`sweep_of(SamplingOverrides)` is a model with the same field names whose values are a single value
or several: "4,8,16" (or [4, 8, 16]) for a scalar field; for a field that is itself a list of
numbers (time_dist, gaps, cfg_interval), values are separated by ';': "0.001,0.002;0.001,0.75".
Each value is validated by the overrides model itself, so errors have the same words as the
single-run flags. `Sweep.points()` lists the combinations (the cartesian product, in flag order).
"""

from __future__ import annotations

import itertools
import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, Field, create_model

from .base import Overrides, Settings, SettingsError, _split


def _options(model: type[Settings], name: str) -> list[Any]:
    """The base types a field accepts (None aside)."""
    hint, _ = _split(model.model_fields[name].annotation, model.model_fields[name].metadata)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [_split(o, [])[0] for o in options if o is not type(None)]


def _is_tuple_field(model: type[Settings], name: str) -> bool:
    return any(typing.get_origin(o) is tuple for o in _options(model, name))


def _metavar(model: type[Settings], name: str) -> str:
    """INTEGER[,...], FLOAT,FLOAT[;...], a|b[,...]: one value, or several for a sweep."""
    words = []
    for o in _options(model, name):
        if typing.get_origin(o) is tuple:
            words.append(",".join(["FLOAT"] * len(typing.get_args(o))))
        elif typing.get_origin(o) is typing.Literal:
            words.append("|".join(map(str, typing.get_args(o))))
        else:
            words.append({int: "INTEGER", float: "FLOAT"}.get(o, "TEXT"))
    return "|".join(words) + ("[;...]" if _is_tuple_field(model, name) else "[,...]")


def _values(model: type[Settings], name: str, raw: Any) -> list[Any]:
    """The values one sweep field lists, each validated by `model` (SettingsError naming the field)."""
    tuple_field = _is_tuple_field(model, name)
    if isinstance(raw, str):
        parts = [p.strip() for p in raw.split(";" if tuple_field else ",")]
    elif isinstance(raw, (list, tuple)) and raw and (not tuple_field or isinstance(raw[0], (list, tuple, str))):
        parts = list(raw)
    else:
        parts = [raw]
    if not parts or any(p == "" for p in parts):
        raise SettingsError((name,), f"expected a value or a list of values, got {raw!r}")
    values = []
    integer = int in _options(model, name)
    for part in parts:
        if integer and isinstance(part, str) and part.lstrip("-").isdigit():
            part = int(part)  # the command line's text; typer would have parsed a single int
        value = getattr(model(**{name: part}), name)
        if value in values:
            raise SettingsError((name,), f"lists {value!r} twice")
        values.append(value)
    return values


class Sweep(Settings):
    """One or several values per field; see the module doc."""

    SINGLE: ClassVar[type[Settings]]

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        self.grid()  # every value validated on construction: a bad one is a SettingsError naming the field

    def grid(self) -> dict[str, list[Any]]:
        """field -> its validated values, for the fields given."""
        return {name: _values(self.SINGLE, name, raw) for name, raw in self if raw is not None}

    @property
    def is_sweep(self) -> bool:
        return any(len(v) > 1 for v in self.grid().values())

    def points(self) -> list[tuple[dict[str, Any], Settings]]:
        """Each combination: (the swept fields' values, the overrides of that run)."""
        grid = self.grid()
        swept = [name for name, values in grid.items() if len(values) > 1]
        fixed = {name: values[0] for name, values in grid.items() if len(values) == 1}
        out = []
        for combo in itertools.product(*(grid[name] for name in swept)):
            point = dict(zip(swept, combo))
            out.append((point, self.SINGLE(**fixed, **point)))
        return out

    def single(self) -> Settings:
        """The overrides of a run that sweeps nothing; SettingsError when a field lists several values."""
        points = self.points()
        if len(points) != 1:
            raise SettingsError((next(iter(points[0][0])),), "lists several values: run it as a sweep")
        return points[0][1]


def sweep_of(model: type[Overrides], name: str) -> type[Sweep]:
    """A Sweep over `model`'s fields (each: one value, a comma list, or ';'-separated lists for list fields)."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        sep = "';'" if _is_tuple_field(model, field_name) else "','"
        fields[field_name] = (Any, Field(default=None, description=f"{info.description} Several values "
                                         f"(separated by {sep}) run one evaluation each (a sweep).",
                                         json_schema_extra={"metavar": _metavar(model, field_name)}))
    sweep = create_model(name, __base__=Sweep, **fields)
    sweep.SINGLE = model
    return sweep


def as_sweep(sweep: type[Sweep], value: Any) -> Any:
    """Accept an instance of the single-run overrides model where a sweep is expected (library callers)."""
    if isinstance(value, BaseModel) and not isinstance(value, sweep):
        return {k: v for k, v in value if v is not None}
    return value
