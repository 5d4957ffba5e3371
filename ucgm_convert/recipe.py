"""Recipes: the published UCGM-S / UCGM-T hyperparameters per source model, as validated data.

A recipe is a YAML file (shipped ones live in the `ucgm_convert.recipes` package, one per source
model). `load_recipe("repa-e")` parses and validates one into a frozen `Recipe`; every problem is
one UCGMError naming the file and the field path, e.g.
``recipes/ddt-256.yaml: sampling.steps: expected an integer >= 1, got 'abc'``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import AfterValidator, Field, model_validator

from .adapters import family_names
from .errors import UCGMError
from .settings.base import Describe, Float, Int, NonEmpty, Settings, SettingsError, nested_model
from .settings.evaluation import DEFAULT_METRICS, UINT8_DEFAULT, MetricList, Uint8Rule
from .settings.sampling import SamplingSettings
from .settings.tuning import TuningSettings
from .transports import TRANSPORTS, get_transport

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; annotations only
    from importlib.resources.abc import Traversable

RECIPE_PACKAGE = "ucgm_convert.recipes"
_SUFFIXES = (".yaml", ".yml")


def _nfe_text(value: Any) -> str:
    text = str(value).strip().replace("×", "x").replace(" ", "") if not isinstance(value, bool) else ""
    head, _, mult = text.partition("x")
    if not head.isdigit() or int(head) < 1 or (mult and mult != "2"):
        raise ValueError(value)
    return text


def _family(name: str) -> str:
    lowered = name.strip().lower()
    if lowered not in family_names():
        raise ValueError(name)
    return lowered


def _transport(name: str) -> str:
    return get_transport(name).name



class PaperResult(Settings):
    """A published FID and its cost, as the UCGM README reports it, with what it was measured on.

    `checkpoint`: the exact weights (file name or URL) when a release has several (EDM2's EMA lengths);
    `reference`: the FID reference statistics it was computed against.
    """

    nfe: Annotated[Any, AfterValidator(_nfe_text), Describe('an NFE such as 40, "2" or "250x2"')]
    fid: Float = Field(gt=0.0)
    note: str = ""
    checkpoint: str = ""
    reference: str = ""
    uint8: Uint8Rule | None = None  # type: ignore[valid-type]  # the pixel rule of the pipeline that measured it

    def details(self) -> str:
        """The note, then the checkpoint and reference statistics when stated (one line for tables)."""
        parts = [self.note, f"checkpoint {self.checkpoint}" if self.checkpoint else "",
                 f"reference statistics {self.reference}" if self.reference else ""]
        return "; ".join(p for p in parts if p)


# Recipe fields that describe the recipe itself, not a value taken from a source (never "borrowed").
META_FIELDS = ("name", "description", "borrowed", "source")


class Recipe(Settings):
    """Everything needed to sample and tune one source model the published way."""

    name: NonEmpty  # type: ignore[valid-type]
    description: str = ""
    family: Annotated[str, AfterValidator(_family), Describe(f"one of {', '.join(map(repr, family_names()))}")]
    model: NonEmpty  # type: ignore[valid-type]
    resolution: Int = Field(ge=1)
    transport: Annotated[str, AfterValidator(_transport), Describe(f"one of {', '.join(map(repr, TRANSPORTS))}")]
    num_classes: Int = Field(ge=1)
    vae: NonEmpty  # type: ignore[valid-type]
    dataset: str | None = None  # Hub dataset id of the training data, when the family's default does not apply
    checkpoint: str | None = None
    base_model: str | None = None  # Hub id of the published source weights (model cards' base_model)
    # DDT's encoder/decoder split, which its weights cannot show (the published 22 of 28 blocks).
    encoder_depth: Int | None = Field(default=None, ge=1)
    sampling: SamplingSettings
    few_step_sampling: SamplingSettings | None = None
    tuning: TuningSettings | None = None
    # What `ucgm eval fid` computes by default: the metrics the paper's table reports, and the uint8 rule
    # of the pipeline that measured paper_after / paper_tuned (vae.UINT8_RULES).
    metrics: MetricList = Field(default_factory=lambda: list(DEFAULT_METRICS))
    uint8: Uint8Rule = UINT8_DEFAULT  # type: ignore[valid-type]
    paper_before: PaperResult | None = None
    paper_after: PaperResult | None = None
    paper_tuned: PaperResult | None = None
    source: str = ""
    # Provenance: dotted path (tuning.lr) or whole section (tuning) -> the one-line source it was borrowed
    # from (a field's own key wins over its section's); every value not covered is published (see `source`).
    borrowed: Annotated[dict[str, NonEmpty], Describe(  # type: ignore[valid-type]
        "a mapping of field paths (tuning.lr) or sections (tuning) to a non-empty one-line source")] = Field(
        default_factory=dict)

    @model_validator(mode="after")
    def _borrowed_keys_exist(self) -> Recipe:
        for key in self.borrowed:
            _check_borrowed_key(self, key)
        return self

    def provenance(self, path: str) -> str:
        """How a value at dotted `path` is known: "published" or "borrowed from FILE" (its own key wins over its
        section's)."""
        source = self.borrowed.get(path) or self.borrowed.get(path.split(".")[0])
        return f"borrowed from {source}" if source else "published"

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


def _check_borrowed_key(recipe: Recipe, key: str) -> None:
    """A `borrowed:` key must name a value field, a present section, or SECTION.FIELD of one."""
    fields = Recipe.model_fields
    values = [name for name in fields if name not in META_FIELDS]
    head, dot, rest = key.partition(".")
    section = nested_model(fields[head].annotation) if head in values else None
    if head not in values or (dot and section is None):
        close = difflib.get_close_matches(key, values, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(("borrowed", key), f"not a recipe field or section{guess}; expected one of "
                            f"{', '.join(values)}, or SECTION.FIELD")
    if section is not None and getattr(recipe, head) is None:
        raise SettingsError(("borrowed", key), f"this recipe has no {head} section")
    if dot and rest not in section.model_fields:  # type: ignore[union-attr]
        names = list(section.model_fields)  # type: ignore[union-attr]
        close = difflib.get_close_matches(rest, names, n=1)
        guess = f" (did you mean {head + '.' + close[0]!r}?)" if close else ""
        raise SettingsError(("borrowed", key), f"{head} has no field {rest!r}{guess}; its fields: {', '.join(names)}")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """Safe YAML with duplicate keys refused; a syntax error names the file, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UCGMError(f"{where}: {place}invalid YAML: {' '.join(str(problem).split())}") from None


def _shipped() -> dict[str, Traversable]:
    files = resources.files(RECIPE_PACKAGE)
    return {Path(e.name).stem: e for e in files.iterdir() if e.is_file() and e.name.endswith(_SUFFIXES)}


def recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(_shipped())


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(_SUFFIXES) or "/" in name_or_path or "\\" in name_or_path


def recipe_path(name_or_path: str | Path) -> Traversable | Path:
    """The file behind a recipe name (shipped) or a path to a .yaml file; UCGMError if none."""
    if isinstance(name_or_path, Path) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UCGMError(f"{path}: recipe file not found")
        return path
    shipped = _shipped()
    entry = shipped.get(str(name_or_path).strip().lower())
    if entry is None:
        known = ", ".join(sorted(shipped))
        raise UCGMError(f"unknown recipe {str(name_or_path)!r}; known recipes: {known} "
                        "(or pass a path to a .yaml file)")
    return entry


def recipe_text(name_or_path: str | Path) -> str:
    """The raw YAML text of a recipe (for `ucgm recipes show --yaml`)."""
    file = recipe_path(name_or_path)
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UCGMError(f"{_display(file)}: cannot read the recipe ({err})") from None


def _display(file: Traversable | Path) -> str:
    return str(file) if isinstance(file, Path) else f"recipes/{file.name}"


def parse_recipe(text: str, where: str, default_name: str) -> Recipe:
    """Validate recipe YAML text (`where` names it in errors); the name defaults to `default_name`."""
    data = parse_yaml(text, where)
    if data is None:
        raise UCGMError(f"{where}: the file is empty; expected a mapping with keys {', '.join(Recipe.model_fields)}")
    if not isinstance(data, Mapping):
        raise UCGMError(f"{where}: not a recipe: expected a mapping with keys {', '.join(Recipe.model_fields)}, "
                        f"got {type(data).__name__} content")
    return Recipe.parse({"name": default_name, **data}, where)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe: a shipped name ("repa-e") or a path to a .yaml file."""
    file = recipe_path(name_or_path)
    return parse_recipe(recipe_text(name_or_path), _display(file), Path(file.name).stem)


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, loaded and validated, sorted by name."""
    return sorted((load_recipe(name) for name in recipe_names()), key=lambda r: r.name)


def flag_name(field: str) -> str:
    """The command-line spelling of a settings field: `--` + the name with dashes (cfg_scale -> --cfg-scale)."""
    return "--" + field.replace("_", "-")


def apply_overrides(settings: SamplingSettings, **flags: Any) -> SamplingSettings:
    """A copy of `settings` with every non-None flag replacing its field; errors name the flag (--steps: ...)."""
    unknown = [key for key in flags if key not in SamplingSettings.model_fields]
    if unknown:
        known = ", ".join(flag_name(n) for n in SamplingSettings.model_fields)
        raise UCGMError(f"{flag_name(unknown[0])}: not a sampling setting; known: {known}")
    try:
        return settings.replace(**flags)
    except SettingsError as err:
        raise err.as_flag(flag_name) from None
