"""The base of every typed setting: pydantic models whose errors read as one line naming the field.

A field's type hint and its constraints (annotated_types bounds, `Check` words, `Hint` text)
drive both pydantic's validation and the wording of the error, e.g.
``recipes/ddt-256.yaml: sampling.steps: expected an integer >= 1, got 'abc'``. The same text
is used for command-line flags (``--steps: expected an integer >= 1, got 0``), so the CLI and
the files speak one language.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import annotated_types as at
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
)

from ..errors import UCGMError

S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Check:
    """Words appended to the expectation of a field checked by an extra validator ("with lo <= hi")."""

    words: str


@dataclass(frozen=True)
class Hint:
    """Text added to the error when `applies(bad value)` holds (e.g. "1.0 means no guidance here")."""

    applies: Callable[[Any], bool]
    text: str


@dataclass(frozen=True)
class Describe:
    """A complete expectation text that replaces the generated one ('an NFE such as 40 or "250x2"')."""

    text: str


class SettingsError(UCGMError):
    """A bad value at a field path; `path` is a tuple of names, `detail` says what was expected."""

    def __init__(self, path: tuple[str, ...], detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{'.'.join(path)}: {detail}" if path else detail)

    def under(self, *names: str) -> SettingsError:
        """The same error below the fields `names`."""
        return SettingsError((*names, *self.path), self.detail)

    def as_flag(self, flag_of: Callable[[str], str]) -> UCGMError:
        """The error worded for a command-line flag: `--steps: expected ...`."""
        return UCGMError(f"{flag_of(self.path[0])}: {self.detail}" if self.path else self.detail)


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _finite_number(value: Any) -> Any:
    """Numbers (and numeric strings: YAML 1.1 reads 1e-4 as a string) as float; bools are not numbers."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("not a number") from None
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _split_list(value: Any) -> Any:
    """Command-line form of a list: "1.2,0.72,1.2" or "1.2 0.72 1.2"."""
    return value.replace(",", " ").split() if isinstance(value, str) else value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_finite_number)]


def floats(n: int, *bounds: Any) -> Any:
    """A tuple of `n` floats, each with `bounds` (annotated_types Ge/Gt/Le/Lt); "a,b,c" strings accepted."""
    element = Annotated[(float, BeforeValidator(_finite_number), *bounds)]
    return Annotated[tuple[(element,) * n], BeforeValidator(_split_list)]  # type: ignore[misc]


def choice(*values: str) -> Any:
    """One of `values`, matched case-insensitively and stored as written here."""
    lowered = {v.lower(): v for v in values}

    def canonical(value: Any) -> Any:
        return lowered.get(value.lower(), value) if isinstance(value, str) else value

    return Annotated[Literal[values], BeforeValidator(canonical)]  # type: ignore[valid-type]


def checked(kind: Any, predicate: Callable[[Any], bool], words: str) -> Any:
    """`kind` with an extra check; `words` complete the expectation ("with lo <= hi")."""

    def check(value: Any) -> Any:
        if not predicate(value):
            raise ValueError(words)
        return value

    return Annotated[kind, AfterValidator(check), Check(words)]


NonEmpty = checked(str, lambda s: bool(s.strip()), "not empty")
UNIT = (at.Ge(0.0), at.Le(1.0))


# --------------------------------------------------------------------------------------------
# Describing what a field expects
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds_text(meta: list[Any]) -> str:
    lo = next((("[", m.ge) if isinstance(m, at.Ge) else ("(", m.gt) for m in meta if isinstance(m, (at.Ge, at.Gt))),
              None)
    hi = next((("]", m.le) if isinstance(m, at.Le) else (")", m.lt) for m in meta if isinstance(m, (at.Le, at.Lt))),
              None)
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _split(hint: Any, meta: list[Any]) -> tuple[Any, list[Any]]:
    """(base type, metadata) of a possibly Annotated hint; FieldInfo metadata of nested hints included."""
    meta = list(meta)
    while typing.get_origin(hint) is Annotated:
        args = typing.get_args(hint)
        hint = args[0]
        for m in args[1:]:
            meta.extend(getattr(m, "metadata", [m]) if type(m).__name__ == "FieldInfo" else [m])
    return hint, meta


def _one_of(values: tuple[Any, ...]) -> str:
    quoted = ", ".join(repr(v) for v in values)
    return repr(values[0]) if len(values) == 1 else f"one of {quoted}"


def describe(hint: Any, meta: list[Any] = ()) -> str:  # type: ignore[assignment]
    """What a value of type `hint` (with metadata `meta`) must be, in words ("an integer >= 1")."""
    hint, meta = _split(hint, list(meta))
    fixed = next((m.text for m in meta if isinstance(m, Describe)), None)
    text = fixed if fixed is not None else _describe_type(hint, meta)
    for m in meta:
        if isinstance(m, Check):
            text += f", {m.words}"
    return text


def _describe_type(hint: Any, meta: list[Any]) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(describe(a, meta if i == 0 else []) for i, a in enumerate(options))
        return text + (" or null" if len(options) < len(typing.get_args(hint)) else "")
    if origin is Literal:
        return _one_of(typing.get_args(hint))
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer" + _bounds_text(meta)
    if hint is float:
        return "a number" + _bounds_text(meta)
    if hint is str:
        return "a string"
    if origin is tuple:
        elems = typing.get_args(hint)
        _, elem_meta = _split(elems[0], [])
        bounds = _bounds_text(elem_meta)
        return f"a list of {len(elems)} numbers" + (f", each{bounds}" if bounds else "")
    if origin in (list, typing.List):  # noqa: UP006
        (elem,) = typing.get_args(hint) or (Any,)
        return f"a list of {describe(elem)}s" if elem is not Any else "a list"
    if origin in (dict, typing.Dict):  # noqa: UP006
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return f"a mapping with keys {', '.join(hint.model_fields)}"
    return getattr(hint, "__name__", str(hint))


def field_expectation(model: type[BaseModel], name: str) -> str:
    """The expectation text of `model`'s field `name`."""
    info = model.model_fields[name]
    return describe(info.annotation, info.metadata)


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


def _shown(value: Any, limit: int = 60) -> str:
    """A bad value as the error shows it: its repr, cut to `limit` characters (a file's contents are never dumped)."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 5] + " ...'"


def _first_error(model: type[BaseModel], err: ValidationError, data: Any) -> SettingsError:
    """The first pydantic error as a SettingsError at its field path, worded from the field's type."""
    error = err.errors()[0]
    loc = [str(p) for p in error["loc"]]
    cls: type[BaseModel] = model
    value: Any = data
    path: list[str] = []
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            break  # inside a tuple / list / dict: report at the field
        fields = cls.model_fields
        if part not in fields:
            names = list(fields)
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(part, names, n=1)
                guess = f" (did you mean {close[0]!r}?)" if close else ""
                return SettingsError((*path, part), f"unknown key{guess}; allowed keys: {', '.join(names)}")
            break
        path.append(part)
        info = fields[part]
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        nested = nested_model(_split(info.annotation, info.metadata)[0])
        if nested is not None and isinstance(value, Mapping):
            if part != loc[-1]:
                cls = nested
                continue
            inner = error.get("ctx", {}).get("error")
            if isinstance(inner, SettingsError):  # the nested model's own __init__ already worded it
                return inner.under(*path)
            if error["type"] == "value_error":  # a check across the nested section's fields
                return SettingsError(tuple(path), _message(error))
        annotation = _without_none(info.annotation) if issubclass(cls, Overrides) else info.annotation
        expected = describe(annotation, info.metadata)
        if error["type"] == "missing" and len(loc) == len(path):
            return SettingsError(tuple(path), f"missing required key ({expected})")
        detail = f"expected {expected}, got {_shown(value)}"
        for m in _all_metadata(info.annotation, info.metadata):
            if isinstance(m, Hint) and m.applies(value):
                detail += f" ({m.text})"
        return SettingsError(tuple(path), detail)
    return SettingsError(tuple(path), _message(error))


def _message(error: Mapping[str, Any]) -> str:
    """The text of a pydantic error: a validator's own message, else pydantic's."""
    message = str(error.get("ctx", {}).get("error", "")) or error["msg"]
    return " ".join(message.split())


def _without_none(hint: Any) -> Any:
    """X for X | None (an override's None means "not given", not a value to offer)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else typing.Union[tuple(options)]
    return hint


def _all_metadata(hint: Any, meta: list[Any]) -> list[Any]:
    """The metadata of `hint` and of every member of a union inside it."""
    base, found = _split(hint, meta)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        for option in typing.get_args(base):
            found += _all_metadata(option, [])
    return found


def nested_model(hint: Any) -> type[BaseModel] | None:
    """The settings model inside `hint` (X or X | None), if any."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)


class Settings(BaseModel):
    """Frozen, strictly checked settings; a bad value raises one SettingsError naming its field path."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _first_error(type(self), err, data) from None

    @classmethod
    def parse(cls: type[S], data: Any, where: str) -> S:
        """Validate parsed file contents; errors start with `where` (the file name)."""
        if not isinstance(data, Mapping):
            raise UCGMError(f"{where}: expected a mapping with keys {', '.join(cls.model_fields)}, got "
                            f"{type(data).__name__} content")
        try:
            return cls(**data)
        except SettingsError as err:
            raise UCGMError(f"{where}: {err}") from None

    @classmethod
    def flat(cls: type[S], **values: Any) -> S:
        """Build a job config from flag-like keywords: each goes to this model's field of that name, else to
        the one nested section that has it (`TuneConfig.flat(out="o", recipe="demo", steps=100)`)."""
        sections = {name: nested_model(info.annotation) for name, info in cls.model_fields.items()}
        own: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name, model in sections.items() if model is not None}
        for key, value in values.items():
            if key in cls.model_fields and sections[key] is None:
                own[key] = value
                continue
            homes = [name for name in nested if key in sections[name].model_fields]  # type: ignore[union-attr]
            if len(homes) != 1:
                raise SettingsError((key,), f"not a setting of {cls.__name__}" if not homes else
                                    f"ambiguous: a field of {', '.join(homes)}")
            nested[homes[0]][key] = value
        return cls(**own, **{name: sections[name](**fields) for name, fields in nested.items() if fields})  # type: ignore[misc]

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with `changes` applied (None values mean "not given" and are skipped)."""
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(given) - set(type(self).model_fields))
        if unknown:
            raise SettingsError((unknown[0],), f"not a field of {type(self).__name__}")
        return type(self)(**{**self.model_dump(), **given})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples as lists), as written to YAML or JSON."""
        return self.model_dump(mode="json")


def overrides_of(model: type[Settings], name: str | None = None) -> type[Settings]:
    """A settings model with every field of `model` optional (None = "not given"), same types and bounds.

    What the command line's flags of that model are: validated on their own (bounds, allowed
    values), then laid over a base with `model.replace(**overrides.given())`.
    """
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        hint = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[field_name] = (hint | None, Field(default=None, description=info.description))
    return create_model(name or f"{model.__name__}Overrides", __base__=Overrides, **fields)


class Overrides(Settings):
    """Optional values of another settings model; see `overrides_of`."""

    def given(self) -> dict[str, Any]:
        """The fields that were given (not None)."""
        return {k: v for k, v in self if v is not None}
