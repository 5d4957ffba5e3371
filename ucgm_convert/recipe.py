"""Recipes: the published UCGM-S / UCGM-T hyperparameters per source model, as validated data.

A recipe is a YAML file (shipped ones live in the `ucgm_convert.recipes` package, one per
source model). `load_recipe("repa-e")` parses and validates one into a frozen `Recipe`;
`apply_overrides(recipe.sampling, steps=20)` is how command-line flags replace recipe values.

Validation is generic: every field's type hint plus a little metadata (bounds, allowed
strings, an extra check) drive both the checks and the wording of the error, which names the
file and the field path, e.g. ``recipes/ddt-256.yaml: sampling.steps: expected an integer
>= 1, got 'abc'``. Constructing the dataclasses directly in Python runs the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml

from .errors import UCGMError
from .sampler import count_nfe, time_grid
from .transports import TRANSPORTS, get_transport

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; annotations only
    from importlib.resources.abc import Traversable

__all__ = [
    "FAMILIES",
    "OPTIMIZERS",
    "PaperResult",
    "Recipe",
    "RecipeFieldError",
    "SamplingSettings",
    "TuningSettings",
    "apply_overrides",
    "list_recipes",
    "load_recipe",
    "recipe_names",
    "recipe_path",
    "recipe_text",
]

Family = Literal["repa-e", "lightningdit", "ddt", "edm2", "ucgm"]
Teacher = Literal["frozen", "online"]
CfgChannels = Literal["model", "all"]
FAMILIES: tuple[str, ...] = typing.get_args(Family)
OPTIMIZERS = ("RAdam", "Adam", "AdamW")
RECIPE_PACKAGE = "ucgm_convert.recipes"
_SUFFIXES = (".yaml", ".yml")


class RecipeFieldError(UCGMError):
    """A bad value at a field path; `path` is a tuple of names, `detail` says what was expected."""

    def __init__(self, path: tuple[str, ...], detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{'.'.join(path)}: {detail}" if path else detail)

    def under(self, name: str) -> RecipeFieldError:
        """The same error one level down, below the field `name`."""
        return RecipeFieldError((name, *self.path), self.detail)


# --------------------------------------------------------------------------------------------
# Generic, type-hint-driven validation
# --------------------------------------------------------------------------------------------


def _spec(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
    convert: tuple[Callable[[Any], Any], str] | None = None,
    hint: tuple[Callable[[Any], bool], str] | None = None,
) -> dict[str, Any]:
    """Field metadata read by the validator.

    ge/gt/le/lt bound every number (tuple elements too); `choices` lists the allowed strings
    (matched case-insensitively, stored as written here); `check` = (predicate on the
    converted value, words appended to the expectation); `convert` = (function returning the
    canonical value or raising ValueError, the expectation); `hint` = (predicate on the bad
    value, words appended to the error when it holds).
    """
    spec = dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, check=check, convert=convert, hint=hint)
    return {"recipe": {k: v for k, v in spec.items() if v is not None}}


def _num(x: float) -> str:
    return f"{x:g}"


def _bounds_text(spec: Mapping[str, Any]) -> str:
    lo = ("[", spec["ge"]) if "ge" in spec else ("(", spec["gt"]) if "gt" in spec else None
    hi = ("]", spec["le"]) if "le" in spec else (")", spec["lt"]) if "lt" in spec else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _quoted(values: tuple[Any, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _one_of(values: tuple[Any, ...]) -> str:
    return repr(values[0]) if len(values) == 1 else f"one of {_quoted(values)}"


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _describe(hint: Any, spec: Mapping[str, Any]) -> str:
    """The expectation for a value of type `hint`, in words ("an integer >= 1")."""
    if "convert" in spec:
        text = spec["convert"][1]
    else:
        text = _describe_type(hint, spec)
    if "check" in spec:
        text += f", {spec['check'][1]}"
    return text


def _describe_type(hint: Any, spec: Mapping[str, Any]) -> str:
    args = _union_args(hint)
    if args is not None:
        return " or ".join(_describe_type(a, spec) for a in args)
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return _one_of(typing.get_args(hint))
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer" + _bounds_text(spec)
    if hint is float:
        return "a number" + _bounds_text(spec)
    if hint is str:
        return _one_of(spec["choices"]) if "choices" in spec else "a string"
    if origin is tuple:
        elems = typing.get_args(hint)
        bounds = _bounds_text(spec)
        return f"a list of {len(elems)} numbers" + (f", each{bounds}" if bounds else "")
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {', '.join(_field_names(hint))}"
    return getattr(hint, "__name__", str(hint))


class _Mismatch(Exception):
    """Internal: the value does not fit the type (the caller words the error)."""


def _check_bounds(x: float, spec: Mapping[str, Any]) -> None:
    ok = (
        ("ge" not in spec or x >= spec["ge"])
        and ("gt" not in spec or x > spec["gt"])
        and ("le" not in spec or x <= spec["le"])
        and ("lt" not in spec or x < spec["lt"])
    )
    if not ok:
        raise _Mismatch


def _match_choice(value: str, choices: tuple[Any, ...]) -> Any:
    for choice in choices:
        if isinstance(choice, str) and value.lower() == choice.lower():
            return choice
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            x = float(value.strip())
        except ValueError:
            raise _Mismatch from None
    else:
        raise _Mismatch
    if not math.isfinite(x):
        raise _Mismatch
    return x


def _convert(value: Any, hint: Any, spec: Mapping[str, Any]) -> Any:
    """`value` as type `hint` (canonical form), or _Mismatch. Nested dataclasses raise
    RecipeFieldError with their own relative path."""
    args = _union_args(hint)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, spec)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    origin = typing.get_origin(hint)
    if origin is Literal:
        if not isinstance(value, str):
            raise _Mismatch
        return _match_choice(value, typing.get_args(hint))
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        _check_bounds(value, spec)
        return value
    if hint is float:
        x = _to_float(value)
        _check_bounds(x, spec)
        return x
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch
        return _match_choice(value, spec["choices"]) if "choices" in spec else value
    if origin is tuple:
        if isinstance(value, str):  # command-line form: "1.2,0.72,1.2" or "1.2 0.72 1.2"
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        elems = typing.get_args(hint)
        if len(value) != len(elems):
            raise _Mismatch
        return tuple(_convert(v, h, spec) for v, h in zip(value, elems))
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _from_mapping(hint, value)
        raise _Mismatch
    raise TypeError(f"recipe validator: unsupported type hint {hint!r}")  # a bug, not bad input


def _coerce(value: Any, hint: Any, spec: Mapping[str, Any]) -> Any:
    """Validated, canonical `value`; RecipeFieldError(path=(), ...) when it does not fit."""
    try:
        if "convert" in spec:
            try:
                out = spec["convert"][0](value)
            except (ValueError, TypeError):
                raise _Mismatch from None
        else:
            out = _convert(value, hint, spec)
        if "check" in spec and not spec["check"][0](out):
            raise _Mismatch
        return out
    except _Mismatch:
        shown = list(value) if isinstance(value, tuple) else value
        detail = f"expected {_describe(hint, spec)}, got {shown!r}"
        if "hint" in spec and spec["hint"][0](value):
            detail += f" ({spec['hint'][1]})"
        raise RecipeFieldError((), detail) from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    """Build dataclass `cls` from a mapping: unknown and missing keys are errors."""
    names = _field_names(cls)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeFieldError(
                (str(key),), f"unknown key{guess}; allowed keys: {', '.join(names)}"
            )
    for f in dataclasses.fields(cls):
        if _required(f) and f.name not in data:
            raise RecipeFieldError((f.name,), f"missing required key ({_describe(_hints(cls)[f.name], _meta(f))})")
    return cls(**data)


def _meta(f: dataclasses.Field) -> Mapping[str, Any]:
    return f.metadata.get("recipe", {})


class _Validated:
    """Mixin: __post_init__ validates and canonicalises every field from its type hint."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            try:
                value = _coerce(getattr(self, f.name), hints[f.name], _meta(f))
            except RecipeFieldError as err:
                raise err.under(f.name) from None
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as it would be written to YAML or JSON."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The recipe dataclasses
# --------------------------------------------------------------------------------------------

_UNIT = dict(ge=0.0, le=1.0)
_NONEMPTY = _spec(check=(lambda s: bool(s.strip()), "not empty"))
_NO_CFG_HINT = (
    lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0,
    "1.0 means no guidance here; the reference configs write 0.0 for 'no guidance'",
)


def _lo_le_hi(v: tuple[float, float]) -> bool:
    return v[0] <= v[1]


def _canonical_transport(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(name)
    return get_transport(name).name


@dataclass(frozen=True, kw_only=True)
class SamplingSettings(_Validated):
    """UCGM-S settings (arguments of `uc.sample`) plus classifier-free guidance."""

    steps: int = field(metadata=_spec(ge=1))
    order: int = field(default=1, metadata=_spec(ge=1, le=2))
    stochasticity: float | str = field(default=0.0, metadata=_spec(**_UNIT, choices=("auto",)))
    extrapolation: float = field(default=0.0, metadata=_spec(ge=0.0))
    time_dist: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0), metadata=_spec(gt=0.0))
    gaps: tuple[float, float] = field(
        default=(0.001, 0.001),
        metadata=_spec(ge=0.0, check=(lambda g: g[0] + g[1] < 1.0, "with start + end < 1")),
    )
    cfg_scale: float = field(default=1.0, metadata=_spec(gt=0.0, hint=_NO_CFG_HINT))
    cfg_interval: tuple[float, float] = field(
        default=(0.0, 1.0), metadata=_spec(**_UNIT, check=(_lo_le_hi, "with lo <= hi"))
    )
    # "model": the channels the model's family guides (LightningDiT's published guidance: the
    # first 3 latent channels); "all": every channel.
    cfg_channels: CfgChannels = "model"

    SAMPLE_KEYS: ClassVar[tuple[str, ...]] = (
        "steps", "order", "stochasticity", "extrapolation", "time_dist", "gaps",
    )

    def as_sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.sample` (steps, order, stochasticity, extrapolation, time_dist, gaps)."""
        return {key: getattr(self, key) for key in self.SAMPLE_KEYS}

    def guidance_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.guided` (scale, interval, channels); use only when `uses_guidance`."""
        return {"scale": self.cfg_scale, "interval": self.cfg_interval,
                "channels": "all" if self.cfg_channels == "all" else None}

    @property
    def uses_guidance(self) -> bool:
        """True when classifier-free guidance is on (cfg_scale != 1)."""
        return self.cfg_scale != 1.0

    @property
    def sampler_nfe(self) -> int:
        """Sampler steps that evaluate the network (`uc.count_nfe`), not counting CFG doubling."""
        return count_nfe(self.steps, self.order, self.gaps)

    @property
    def nfe(self) -> int:
        """Model evaluations per sample as the paper counts them: sampler NFE, x2 with CFG."""
        return self.sampler_nfe * (2 if self.uses_guidance else 1)

    @property
    def nfe_label(self) -> str:
        """NFE as the paper writes it: "40x2" with CFG (batched cond+uncond), else "40"."""
        return f"{self.sampler_nfe}x2" if self.uses_guidance else str(self.sampler_nfe)

    def evaluations(self, transport: str | Any) -> int:
        """Exact network evaluations per sample: those at a time inside cfg_interval count twice."""
        grid = time_grid(transport, self.steps, self.order, self.time_dist, self.gaps)
        k = grid.numel() - 1
        times = [grid[:k]]
        if self.order == 2:  # the correction evaluates at t_{i+1}, also at the end when gap 0
            times.append(grid[1 : k + 1] if self.gaps[1] == 0 else grid[1:k])
        evaluated = [t for part in times for t in part]
        if not self.uses_guidance:
            return len(evaluated)
        lo, hi = self.cfg_interval
        return sum(2 if lo <= float(t) <= hi else 1 for t in evaluated)


@dataclass(frozen=True, kw_only=True)
class TuningSettings(_Validated):
    """UCGM-T few-step tuning settings: optimizer, objective (`uc.UCGMObjective`) and schedule."""

    optimizer: str = field(default="RAdam", metadata=_spec(choices=OPTIMIZERS))
    lr: float = field(default=1e-4, metadata=_spec(gt=0.0))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_spec(ge=0.0, lt=1.0))
    weight_decay: float = field(default=0.0, metadata=_spec(ge=0.0))
    grad_clip: float = field(default=0.1, metadata=_spec(gt=0.0))
    consistency: float = field(default=1.0, metadata=_spec(**_UNIT))
    enhanced: float = field(metadata=_spec(ge=0.0))
    enhanced_range: tuple[float, float] = field(
        default=(0.0, 0.75), metadata=_spec(**_UNIT, check=(_lo_le_hi, "with lo <= hi"))
    )
    huber_eps: float = field(metadata=_spec(ge=0.0))
    label_drop: float = field(default=0.1, metadata=_spec(**_UNIT))
    time_dist: tuple[float, float, float] = field(default=(0.8, 1.0, 1.0), metadata=_spec(gt=0.0))
    weighting: str | None = field(default="Cosine", metadata=_spec(choices=("Cosine",)))
    cosine_loss: bool = False
    teacher: Teacher = "frozen"
    ema_decay: float = field(default=0.99, metadata=_spec(**_UNIT))
    steps: int = field(default=500, metadata=_spec(ge=1))
    global_batch: int = field(default=1024, metadata=_spec(ge=1))

    OBJECTIVE_KEYS: ClassVar[tuple[str, ...]] = (
        "consistency", "enhanced", "enhanced_range", "label_drop", "huber_eps",
        "cosine_loss", "weighting", "time_dist",
    )

    def objective_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.UCGMObjective` except transport and num_classes."""
        return {key: getattr(self, key) for key in self.OBJECTIVE_KEYS}

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `torch.optim.<optimizer>(params, ...)` (lr, betas, weight_decay)."""
        return {"lr": self.lr, "betas": self.betas, "weight_decay": self.weight_decay}


def _nfe_text(value: Any) -> str:
    text = str(value).strip().replace("×", "x").replace(" ", "") if not isinstance(value, bool) else ""
    head, _, mult = text.partition("x")
    if not head.isdigit() or int(head) < 1 or (mult and mult != "2"):
        raise ValueError(value)
    return text


@dataclass(frozen=True, kw_only=True)
class PaperResult(_Validated):
    """A published FID and its cost, as the UCGM README reports it."""

    nfe: str = field(metadata=_spec(convert=(_nfe_text, 'an NFE such as 40, "2" or "250x2"')))
    fid: float = field(metadata=_spec(gt=0.0))
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Recipe(_Validated):
    """Everything needed to sample and tune one source model the published way."""

    name: str = field(metadata=_NONEMPTY)
    description: str = ""
    family: Family
    model: str = field(metadata=_NONEMPTY)
    resolution: int = field(metadata=_spec(ge=1))
    transport: str = field(
        metadata=_spec(convert=(_canonical_transport, f"one of {_quoted(tuple(TRANSPORTS))}"))
    )
    num_classes: int = field(metadata=_spec(ge=1))
    vae: str = field(metadata=_NONEMPTY)
    checkpoint: str | None = None
    # DDT's encoder/decoder split, which its weights cannot show (the published 22 of 28 blocks).
    encoder_depth: int | None = field(default=None, metadata=_spec(ge=1))
    sampling: SamplingSettings
    few_step_sampling: SamplingSettings | None = None
    tuning: TuningSettings | None = None
    paper_before: PaperResult | None = None
    paper_after: PaperResult | None = None
    paper_tuned: PaperResult | None = None
    source: str = ""

    def load_overrides(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`uc.load` overrides: what the recipe fixes (encoder_depth), then the user's `given` ones."""
        fixed = {"encoder_depth": self.encoder_depth} if self.encoder_depth is not None else {}
        return {**fixed, **(given or {})}

    def sample_kwargs(self, few_step: bool = False) -> dict[str, Any]:
        """`uc.sample` keyword arguments including transport (few_step: the tuned model's)."""
        settings = self.few_step_sampling if few_step else self.sampling
        if settings is None:
            raise UCGMError(f"recipe {self.name!r} has no few_step_sampling section")
        return {"transport": self.transport, **settings.as_sample_kwargs()}

    def objective_kwargs(self) -> dict[str, Any]:
        """`uc.UCGMObjective` keyword arguments including transport and num_classes."""
        if self.tuning is None:
            raise UCGMError(f"recipe {self.name!r} has no tuning section")
        return {"transport": self.transport, "num_classes": self.num_classes, **self.tuning.objective_kwargs()}

    def to_yaml(self) -> str:
        """The recipe as YAML that `load_recipe` reads back to an equal Recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _shipped() -> dict[str, Traversable]:
    files = resources.files(RECIPE_PACKAGE)
    return {
        Path(entry.name).stem: entry
        for entry in files.iterdir()
        if entry.is_file() and entry.name.endswith(_SUFFIXES)
    }


def recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(_shipped())


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(_SUFFIXES) or "/" in name_or_path or "\\" in name_or_path


def recipe_path(name_or_path: str | Path) -> Traversable | Path:
    """The file behind a recipe name (shipped) or a path to a .yaml file; UCGMError if none."""
    if isinstance(name_or_path, Path) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        if not path.is_file():
            raise UCGMError(f"{path}: recipe file not found")
        return path
    shipped = _shipped()
    entry = shipped.get(str(name_or_path).strip().lower())
    if entry is None:
        known = ", ".join(sorted(shipped))
        raise UCGMError(f"unknown recipe {str(name_or_path)!r}; known recipes: {known} (or pass a path to a .yaml file)")
    return entry


def recipe_text(name_or_path: str | Path) -> str:
    """The raw YAML text of a recipe (for `ucgm recipes show --yaml`)."""
    return recipe_path(name_or_path).read_text(encoding="utf-8")


def _display(file: Traversable | Path) -> str:
    if isinstance(file, Path):
        return str(file)
    return f"recipes/{file.name}"


def _parse(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UCGMError(f"{where}: {place}invalid YAML: {problem}") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe: a shipped name ("repa-e") or a path to a .yaml file.

    The recipe's name defaults to the file name without .yaml. Every problem raises
    UCGMError naming the file and the field path.
    """
    file = recipe_path(name_or_path)
    where = _display(file)
    data = _parse(file.read_text(encoding="utf-8"), where)
    if data is None:
        raise UCGMError(f"{where}: the file is empty; expected a mapping with keys {', '.join(_field_names(Recipe))}")
    if not isinstance(data, Mapping):
        raise UCGMError(f"{where}: expected a mapping with keys {', '.join(_field_names(Recipe))}, got {data!r}")
    data = {"name": Path(file.name).stem, **data}
    try:
        return _from_mapping(Recipe, data)
    except RecipeFieldError as err:
        raise UCGMError(f"{where}: {err}") from None


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, loaded and validated, sorted by name."""
    return sorted((load_recipe(name) for name in recipe_names()), key=lambda r: r.name)


def apply_overrides(
    settings: SamplingSettings, *, flag_names: Mapping[str, str] | None = None, **flags: Any
) -> SamplingSettings:
    """A copy of `settings` with every non-None flag replacing its field, validated.

    Flags are keyed by field name (steps=20, cfg_scale=4.0, time_dist=(1.2, 0.72, 1.2) or
    "1.2,0.72,1.2"). Errors name the flag as the command line spells it: "--" + the field
    name with dashes (--cfg-scale), unless `flag_names` maps the field to another spelling
    (flag_names={"cfg_scale": "--cfg"}).
    """
    names = _field_names(SamplingSettings)

    def flag(name: str) -> str:
        return (flag_names or {}).get(name) or "--" + name.replace("_", "-")

    unknown = [key for key in flags if key not in names]
    if unknown:
        raise UCGMError(
            f"{flag(unknown[0])}: not a sampling setting; known: {', '.join(flag(n) for n in names)}"
        )
    changes = {key: value for key, value in flags.items() if value is not None}
    try:
        return dataclasses.replace(settings, **changes)
    except RecipeFieldError as err:
        raise UCGMError(f"{flag(err.path[0])}: {err.detail}") from None
