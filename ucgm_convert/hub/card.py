"""Model cards: one generator for every card we write (`ucgm tune`'s checkpoints and `ucgm push`).

A card written by ucgm-convert carries the marker line `CARD_MARKER`; such a card is
regenerated on every push (so results added since appear). A README.md without the marker is
hand-written: push refuses to replace it unless asked (policy "overwrite"), or uploads it
unchanged ("keep"). Cards are written atomically.

Metadata (YAML front matter, huggingface_hub's ModelCardData / EvalResult): the license the
source family's adapter declares (or `license=`); library_name ucgm-convert; tags; base_model
(given, else config.json's); datasets (the recipe's, else the family's); model-index entries,
one per measured result. Class-conditional models get no pipeline_tag: the Hub has no
class-conditional task, and "unconditional-image-generation" would say the opposite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from ..adapters import FAMILIES, IMAGENET, UNKNOWN_LICENSE, License
from ..checkpoint import (
    CARD_NAME,
    CONFIG_NAME,
    RECIPE_NAME,
    VAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    read_config,
)
from ..errors import UCGMError
from ..formats.statedict import state_sha256
from ..foundation import one_line, write_text_atomic
from ..settings import ModelConfig
from .results import MeasuredResult, read_results, text_or_none

LIBRARY_NAME = "ucgm-convert"
UCGM_URL = "https://github.com/LINs-lab/UCGM"
UNCONDITIONAL_TAG = "unconditional-image-generation"
TASK = "class-conditional-image-generation"  # model-index task type (free text on the Hub)
BASE_TAGS = ("diffusion", "flow-matching", "few-step", "ucgm", "image-generation")
CARD_MARKER = ("<!-- ucgm-convert: generated model card; `ucgm push` regenerates it. "
               "Delete this line to keep hand edits. -->")
# Cards written by earlier versions of `ucgm tune` start like this (and are ours too).
GENERATED_CARD_SIGNATURES = (CARD_MARKER, "Few-step generator made by `ucgm tune")
CardPolicy = Literal["auto", "overwrite", "keep"]


@dataclass
class CardInfo:
    """What a card says about a model: its config, recipe, measured results and size."""

    config: ModelConfig
    recipe: dict[str, Any] | None  # recipe.yaml parsed as a mapping
    recipe_text: str | None
    results: list[MeasuredResult]
    num_parameters: int
    has_vae_weights: bool = False
    path: Path | None = None  # the checkpoint folder, when the card describes one

    @property
    def source_family(self) -> str:
        """The family the weights come from: recipe.yaml's, else config.json's."""
        family = (self.recipe or {}).get("family")
        return family if isinstance(family, str) and family else self.config.family

    @property
    def license(self) -> License:
        family = FAMILIES.get(self.source_family)
        return family.license if family is not None else UNKNOWN_LICENSE

    @property
    def dataset(self) -> str | None:
        """The Hub dataset id of the training data: the recipe's, else the family's."""
        family = FAMILIES.get(self.source_family)
        return text_or_none((self.recipe or {}).get("dataset")) or (family.dataset if family else None)

    @property
    def resolution(self) -> int | None:
        res = (self.recipe or {}).get("resolution")
        return res if isinstance(res, int) and not isinstance(res, bool) else None


def inspect_checkpoint(folder: str | Path, results: list[str | Path] | tuple[str | Path, ...] = ()) -> CardInfo:
    """Validate `folder` as our checkpoint format and read what the card needs.

    `results`: more results files (besides `folder`/results.json). A result that records the
    sha256 of the weights it measured must match this folder's weights.
    """
    path = Path(folder)
    if not path.exists():
        raise UCGMError(f"{path}: no such folder")
    if not path.is_dir():
        raise UCGMError(f"{path}: not a folder (push uploads a checkpoint folder in the ucgm-convert format: "
                        f"{WEIGHTS_NAME} + {CONFIG_NAME}; `ucgm convert` or `ucgm tune` write one)")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise UCGMError(f"{path}: not a ucgm-convert checkpoint folder: missing {' and '.join(missing)} "
                        "(`ucgm convert` or `ucgm tune` write one)")
    config = read_config(path)
    model = load_checkpoint(path)  # every weight must fit the architecture config.json describes
    measured = read_results(path) + [r for extra in results for r in read_results(extra)]
    if any(r.state_sha256 for r in measured):
        digest = state_sha256(model)
        for r in measured:
            if r.state_sha256 and r.state_sha256 != digest:
                raise UCGMError(f"{r.source}: measured other weights than {path} (model.state_sha256 differs); "
                                "re-run `ucgm eval fid` on this checkpoint or leave that file out")
    recipe, recipe_text = _read_recipe(path)
    return CardInfo(config, recipe, recipe_text, measured, model.num_parameters(),
                    (path / VAE_WEIGHTS_NAME).is_file(), path)


def _read_recipe(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    file = path / RECIPE_NAME
    if not file.is_file():
        return None, None
    text = file.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UCGMError(f"{file}: invalid YAML ({one_line(err)})") from None
    if data is not None and not isinstance(data, dict):
        raise UCGMError(f"{file}: expected a YAML mapping, got {type(data).__name__}")
    return data, text


def validate_repo_id(repo_id: str, flag: str = "--repo") -> str:
    """`repo_id` if it is a valid Hub model id USER/NAME, else a UCGMError saying why."""
    text = repo_id.strip() if isinstance(repo_id, str) else repo_id
    try:
        hf_validate_repo_id(text)
    except HFValidationError as err:
        raise UCGMError(f"{flag} {repo_id!r}: not a valid Hugging Face repo id ({one_line(err)}); "
                        "expected USER/NAME, e.g. alice/sit-xl-ucgm-2step") from None
    if text.count("/") != 1:
        raise UCGMError(f"{flag} {repo_id!r}: expected USER/NAME (a namespace, a slash and a name), "
                        "e.g. alice/sit-xl-ucgm-2step")
    return text


def _dataset_name(info: CardInfo) -> str:
    res = info.resolution or (info.config.latent_shape[1] if info.config.vae.name == "identity" else None)
    size = f" {res}x{res}" if res else ""
    if info.dataset == IMAGENET:
        return f"ImageNet-1k{size}"
    return f"{info.dataset or f'{info.config.num_classes}-class data'}{size}"


def card_metadata(info: CardInfo, repo_id: str | None, base_model: str | None = None,
                  license: str | None = None) -> ModelCardData:
    """The card's YAML metadata as a huggingface_hub ModelCardData."""
    lic = info.license
    conditional = info.config.num_classes > 1
    tags = [*BASE_TAGS, "class-conditional" if conditional else "unconditional", info.source_family]
    if info.dataset == IMAGENET:
        tags.append("imagenet")
    base = base_model or info.config.base_model
    eval_results = []
    for r in info.results:
        args = {"nfe": r.nfe, **({"num_samples": r.num_samples} if r.num_samples else {}),
                **{k: v for k, v in r.settings.items() if isinstance(v, (int, float, str, list))}}
        common = dict(task_type=TASK if conditional else UNCONDITIONAL_TAG,
                      task_name="Class-conditional image generation" if conditional else "Image generation",
                      dataset_type=info.dataset or "custom", dataset_name=_dataset_name(info),
                      metric_config=f"nfe={r.nfe}", metric_args=args)
        eval_results.append(EvalResult(metric_type="fid", metric_name=f"FID ({r.nfe} NFE)", metric_value=r.fid,
                                       **common))
        if r.inception_score is not None:
            eval_results.append(EvalResult(metric_type="inception_score", metric_name=f"IS ({r.nfe} NFE)",
                                           metric_value=r.inception_score, **common))
    spdx = license or lic.spdx
    other = spdx == "other"
    return ModelCardData(
        license=spdx,
        license_name=(lic.name or "custom") if other else None,
        license_link=(lic.link or (f"https://huggingface.co/{base}" if base else None)) if other else None,
        library_name=LIBRARY_NAME,
        pipeline_tag=None if conditional else UNCONDITIONAL_TAG,
        tags=tags,
        base_model=base,
        datasets=[info.dataset] if info.dataset else None,
        model_name=repo_id or info.config.recipe or info.config.arch,
        eval_results=eval_results or None,
    )


def make_model_card(folder: str | Path | CardInfo, repo_id: str | None = None, base_model: str | None = None,
                    license: str | None = None) -> ModelCard:
    """The model card of a checkpoint (a folder, or CardInfo built in memory); `repo_id`: its Hub id, if any."""
    info = folder if isinstance(folder, CardInfo) else inspect_checkpoint(folder)
    if repo_id is not None:
        repo_id = validate_repo_id(repo_id)
    data = card_metadata(info, repo_id, base_model=base_model, license=license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(info, repo_id, data, license)}")


def _card_body(info: CardInfo, repo_id: str | None, data: ModelCardData, license_override: str | None) -> str:
    cfg = info.config
    recipe = info.recipe or {}
    family = info.source_family
    model_name = text_or_none(recipe.get("model")) or f"{cfg.arch} ({family})"
    title = repo_id.split("/")[1] if repo_id else f"{model_name}, ucgm-convert checkpoint"
    where = repo_id or "<this folder>"
    kind = "A class-conditional" if cfg.num_classes > 1 else "An"
    lines = [CARD_MARKER, "", f"# {title}", "",
             f"{kind} image generator: **{model_name}** from the **{family}** family, in the ucgm-convert format, "
             f"for [UCGM]({UCGM_URL}) sampling (UCGM-S) and few-step tuning (UCGM-T, arXiv "
             "[2505.07447](https://arxiv.org/abs/2505.07447)).", ""]
    if data.base_model:
        lines += [f"Base model: [{data.base_model}](https://huggingface.co/{data.base_model}).", ""]
    if text_or_none(recipe.get("description")):
        lines += [f"Recipe: *{recipe['description']}*.", ""]
    vae = cfg.vae.name
    sampling = cfg.sampling.to_dict() if cfg.sampling is not None else {}
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| family | `{family}` |",
              f"| architecture | `{cfg.arch}` ({_params(info.num_parameters)} parameters) |",
              f"| transport | `{cfg.transport}` |",
              f"| classes | {cfg.num_classes} (null class {cfg.null_class}) |",
              f"| latent shape (C, H, W) | {tuple(cfg.latent_shape)} |",
              f"| autoencoder | {'none (pixel space)' if vae == 'identity' else f'`{vae}`'}"
              f"{' (weights included: vae.safetensors)' if info.has_vae_weights else ''} |"]
    if sampling:
        lines.append(f"| default sampling | {_settings_text(sampling)} |")
    lines += ["", *_recipe_section(info), *_results_section(info)]
    lines += ["## Usage", "", "```bash", f"pip install {LIBRARY_NAME}",
              f"ucgm sample --checkpoint {where} --num 16 --out samples   # samples.npz + grid.png", "```", "",
              "```python", "import torch", "import ucgm_convert as uc", "",
              f'm = uc.load("{where}")' + ("  # downloaded once, then read from the Hugging Face cache (offline too)"
                                             if repo_id else ""),
              *_python_sampling(sampling), "```", ""]
    lic = info.license
    lines += ["## License", ""]
    if license_override and license_override != lic.spdx:
        lines.append(f"License `{license_override}`, as declared by the publisher. For reference: {lic.note}")
    else:
        lines.append(f"License `{data.license}`. {lic.note}")
    lines += ["", f"Weights and card written by {LIBRARY_NAME} (`ucgm tune` / `ucgm push`).", ""]
    return "\n".join(lines)


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# Settings shown only when they differ from these defaults (older cards stay as they were).
_QUIET_DEFAULTS: dict[str, Any] = {"solver": "ucgm", "encoder_refresh": 1}


def _settings_text(s: dict[str, Any]) -> str:
    keys = ("steps", "order", "cfg_scale", "stochasticity", "extrapolation", "solver", "encoder_refresh")
    parts = [f"{k}={s[k]}" for k in keys if k in s and s[k] != _QUIET_DEFAULTS.get(k, ())]
    return ", ".join(parts) or "-"


def _python_sampling(s: dict[str, Any]) -> list[str]:
    """Python lines sampling with the checkpoint's default settings (config.json "sampling")."""
    keys = ("steps", "order", "stochasticity", "extrapolation", "time_dist", "gaps", "solver", "encoder_refresh")
    kwargs = "".join(f", {k}={tuple(s[k]) if isinstance(s[k], list) else s[k]!r}" for k in keys
                     if k in s and s[k] != _QUIET_DEFAULTS.get(k, ()))
    lines = ["noise = torch.randn(4, *m.latent_shape)", "y = torch.arange(4) % m.num_classes"]
    scale = s.get("cfg_scale", 1.0)
    if isinstance(scale, (int, float)) and scale != 1.0:
        interval = tuple(s.get("cfg_interval", (0.0, 1.0)))
        lines.append(f"fn = uc.guided(m, {scale!r}, interval={interval!r})  # classifier-free guidance")
    else:
        lines.append("fn = m")
    lines.append(f"latents = uc.sample(fn, noise, transport=m.transport{kwargs}, y=y)")
    lines.append("# images: decode the latents with the model's autoencoder, or use `ucgm sample`")
    return lines


def _recipe_section(info: CardInfo) -> list[str]:
    if info.recipe_text is None:
        return []
    recipe = info.recipe or {}
    lines = ["## Recipe", ""]
    name = text_or_none(recipe.get("name"))
    lines.append(f"The hyperparameters used (`{RECIPE_NAME}`{f', recipe `{name}`' if name else ''}; "
                 "`ucgm recipes show NAME` prints the shipped ones):")
    lines += ["", "<details><summary>recipe.yaml</summary>", "", "```yaml", info.recipe_text.rstrip("\n"), "```",
              "", "</details>", ""]
    return lines


def _results_section(info: CardInfo) -> list[str]:
    recipe = info.recipe or {}
    paper = [(key, recipe[key]) for key in ("paper_before", "paper_after", "paper_tuned")
             if isinstance(recipe.get(key), dict)]
    if not info.results and not paper:
        return []
    lines = ["## Results", ""]
    if info.results:
        lines += ["Measured with `ucgm eval fid` (`results.json`); lower FID is better.", "",
                  "| NFE | FID | IS | samples | steps | order | CFG scale | reference |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in info.results:
            s = r.settings
            lines.append(f"| {r.nfe} | {r.fid:.2f} | {_fmt(r.inception_score, '.1f')} | {_fmt(r.num_samples)} "
                         f"| {_fmt(s.get('steps'))} | {_fmt(s.get('order'))} | {_fmt(s.get('cfg_scale'))} "
                         f"| {_fmt(r.reference)} |")
        lines.append("")
    if paper:
        labels = {"paper_before": "source model, own sampler", "paper_after": "UCGM-S",
                  "paper_tuned": "UCGM-T (tuned)"}
        lines += ["Published numbers for the source model (UCGM paper / README), for comparison:", "",
                  "| setting | NFE | FID | note |", "|---|---|---|---|"]
        for key, p in paper:
            lines.append(f"| {labels[key]} | {_fmt(p.get('nfe'))} | {_fmt(p.get('fid'))} | {_fmt(p.get('note'))} |")
        lines.append("")
    return lines


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value).replace("|", "/")


def is_generated_card(text: str) -> bool:
    """True for a README.md that ucgm-convert wrote (push may regenerate it)."""
    return any(sig in text for sig in GENERATED_CARD_SIGNATURES)


def write_model_card(folder: str | Path, card: Any, policy: CardPolicy = "auto") -> bool:
    """Write `card` as `folder`/README.md (atomically); False when a kept hand-written card stays.

    policy "auto": write unless README.md exists without CARD_MARKER (hand-written) -> UCGMError;
    "overwrite": always write; "keep": keep an existing README.md as it is.
    """
    path = Path(folder) / CARD_NAME
    if not card_needs_writing(path, policy):
        return False
    write_text_atomic(path, str(card))
    return True


def card_needs_writing(path: Path, policy: CardPolicy) -> bool:
    """Whether the card at `path` is to be (re)written; UCGMError for a hand-written one under "auto"."""
    if not path.is_file():
        return True
    if policy == "keep":
        return False
    if policy == "auto" and not is_generated_card(path.read_text(errors="replace")):
        raise UCGMError(f"{path}: exists and was not generated by ucgm-convert; pass --overwrite-card to "
                        "replace it or --keep-card to upload it unchanged")
    return True
