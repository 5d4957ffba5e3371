"""Publishing a checkpoint folder to the Hugging Face Hub: model card + one-commit upload.

`push_to_hub(folder, "user/name")` validates a folder in our format (config.json,
model.safetensors that loads into the architecture it describes, optional vae.safetensors,
recipe.yaml, results.json), writes its model card README.md into the folder, and uploads the
folder's managed files to the Hub in ONE commit. `uc.load("user/name")` reads it back through
huggingface_hub's cache (offline too, once cached).

Model card policy. A card written by ucgm-convert carries the marker line `CARD_MARKER`; such
a card is regenerated on every push (so results added since the last push appear). A README.md
without the marker is hand-written: push refuses to replace it unless `card="overwrite"`, or
uploads it unchanged with `card="keep"`. The card is written atomically (temporary file +
rename), so an interrupted push never leaves half a README.md.

Metadata (YAML front matter, built with huggingface_hub's ModelCardData / EvalResult):
- license: inherited from the source model's family, see `FAMILY_LICENSES`; `license=`
  overrides it (e.g. when the base model's own Hub card says otherwise);
- library_name: ucgm-convert; pipeline_tag: unconditional-image-generation (the Hub has no
  class-conditional task; class-conditional ImageNet generators such as MAR and IMM use this
  one); tags: diffusion, flow-matching, few-step, ucgm, class-conditional, the family, and
  imagenet for the ImageNet families;
- base_model: `base_model=` (ucgm push --base-model), else a `base_model` recorded in
  config.json; omitted when unknown;
- datasets: ILSVRC/imagenet-1k for the ImageNet families;
- model-index: one FID (and IS when measured) entry per measured result in results.json,
  labelled by its NFE.

results.json (written by `ucgm eval fid`) is read defensively: a JSON object, a list of them,
or {"results": [...]}. Per result, keys used (all but "fid" optional; unknown keys ignored):
- "fid": number (an entry without one is skipped);
- NFE: "nfe" (int or label such as "40x2"), else "sampling"."nfe_per_sample", else computed
  from the settings;
- settings: "settings" or "sampling"."settings" (steps, order, cfg_scale, stochasticity, ...);
- "inception_score": number, or a mapping with "mean" (as ucgm eval fid writes it);
- "num_samples": int;
- "reference": text, or a mapping with "name" or "path" (the FID reference statistics);
  "dataset" as a fallback;
- "model"."state_sha256": the sha256 of the weights measured (ucgm_convert.evaluate.
  state_sha256); when present it must match the folder's weights, else push refuses (results
  of other weights are never published).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .checkpoint import (
    CARD_NAME,
    CONFIG_NAME,
    RECIPE_NAME,
    VAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    read_config,
    write_file_atomic,
)
from .errors import UCGMError
from .model import ModelConfig

RESULTS_NAME = "results.json"
LIBRARY_NAME = "ucgm-convert"
UCGM_URL = "https://github.com/LINs-lab/UCGM"
PIPELINE_TAG = "unconditional-image-generation"
IMAGENET_DATASET = "ILSVRC/imagenet-1k"
BASE_TAGS = ("diffusion", "flow-matching", "few-step", "ucgm", "class-conditional")
CARD_MARKER = "<!-- ucgm-convert: generated model card; `ucgm push` regenerates it. Delete this line to keep hand edits. -->"
# Files of our format that a push uploads; anything else in the folder stays local.
UPLOAD_FILES = (WEIGHTS_NAME, VAE_WEIGHTS_NAME, CONFIG_NAME, RECIPE_NAME, RESULTS_NAME, CARD_NAME)
IMAGENET_FAMILIES = ("repa-e", "lightningdit", "ddt", "edm2")
CardPolicy = Literal["auto", "overwrite", "keep"]


@dataclass(frozen=True)
class LicenseInfo:
    """The Hub license id of a family's weights and where that comes from."""

    spdx: str
    note: str
    name: str | None = None  # license_name / license_link: for "other" only
    link: str | None = None


# Checked in the upstream repositories (LICENSE files at the commits named).
FAMILY_LICENSES: dict[str, LicenseInfo] = {
    "edm2": LicenseInfo(
        "cc-by-nc-sa-4.0",
        "EDM2 weights (NVlabs/edm2, LICENSE.txt @4bf8162) are CC BY-NC-SA 4.0: weights derived from them "
        "stay non-commercial and share-alike under the same license.",
    ),
    "repa-e": LicenseInfo(
        "mit", "REPA-E (End2End-Diffusion/REPA-E, LICENSE @3ad8046) is released under the MIT license."
    ),
    "lightningdit": LicenseInfo(
        "mit", "LightningDiT (hustvl/LightningDiT, LICENSE @2725fed) is released under the MIT license."
    ),
    "ddt": LicenseInfo(
        "other",
        "The DDT repository (MCG-NJU/DDT @1d1b4d2) declares no license; the terms of the source weights are "
        "those of their original release. Check them before reuse, and pass --license to record them.",
        name="upstream-unspecified",
        link="https://github.com/MCG-NJU/DDT",
    ),
    "ucgm": LicenseInfo("apache-2.0", "A model of this project (ucgm-convert), released under Apache-2.0."),
}
UNKNOWN_LICENSE = LicenseInfo(
    "other",
    "The source model's license is not known to ucgm-convert; check the base model's terms before reuse "
    "(pass --license to record them).",
    name="unknown",
)


# --------------------------------------------------------------------------------------------
# Inspecting a folder
# --------------------------------------------------------------------------------------------


@dataclass
class MeasuredResult:
    """One entry of results.json."""

    fid: float
    nfe: str
    inception_score: float | None = None
    num_samples: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    state_sha256: str | None = None  # of the weights measured (ucgm eval fid records it)
    source: str = ""


@dataclass
class CheckpointInfo:
    """What a card says about a validated checkpoint folder."""

    path: Path
    config: ModelConfig
    raw_config: dict[str, Any]
    recipe: dict[str, Any] | None  # recipe.yaml parsed as a mapping
    recipe_text: str | None
    results: list[MeasuredResult]
    num_parameters: int

    @property
    def source_family(self) -> str:
        """The family the weights come from: recipe.yaml's, else config.json's."""
        family = (self.recipe or {}).get("family")
        return family if isinstance(family, str) and family else self.config.family

    @property
    def is_imagenet(self) -> bool:
        return self.source_family in IMAGENET_FAMILIES  # every published model of these families is ImageNet-1k

    @property
    def resolution(self) -> int | None:
        res = (self.recipe or {}).get("resolution")
        return res if isinstance(res, int) and not isinstance(res, bool) else None


def inspect_checkpoint(folder: str | Path, results: list[str | Path] | tuple[str | Path, ...] = ()) -> CheckpointInfo:
    """Validate `folder` as our checkpoint format and read what the card needs.

    `results`: more results files (besides `folder`/results.json) for the card. A result that
    records the sha256 of the weights it measured must match this folder's weights.
    Errors (UCGMError) name the folder and what is missing or broken.
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
    num_parameters = sum(p.numel() for p in model.net.parameters())
    measured = read_results(path) + [r for extra in results for r in read_results(extra)]
    if any(r.state_sha256 for r in measured):
        from .evaluate import state_sha256

        digest = state_sha256(model, model.vae_state)
        for r in measured:
            if r.state_sha256 and r.state_sha256 != digest:
                raise UCGMError(f"{r.source}: measured other weights than {path} (model.state_sha256 differs); "
                                "re-run `ucgm eval fid` on this checkpoint or leave that file out")
    del model
    raw_config = json.loads((path / CONFIG_NAME).read_text())
    recipe, recipe_text = _read_recipe(path)
    return CheckpointInfo(path, config, raw_config, recipe, recipe_text, measured, num_parameters)


def _read_recipe(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    file = path / RECIPE_NAME
    if not file.is_file():
        return None, None
    text = file.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UCGMError(f"{file}: invalid YAML ({' '.join(str(err).split())})") from None
    if data is not None and not isinstance(data, dict):
        raise UCGMError(f"{file}: expected a YAML mapping, got {type(data).__name__}")
    return data, text


def read_results(path: str | Path) -> list[MeasuredResult]:
    """The measured results of `path` (a folder: its results.json, absent = none; or a file).

    See the module docstring for the accepted shapes and keys.
    """
    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    if not file.is_file():
        if file != path:
            return []
        raise UCGMError(f"{file}: no such results file")
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise UCGMError(f"{file}: invalid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        entries = data["results"]
    elif isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        entries = [data]
    else:
        raise UCGMError(f"{file}: expected a JSON object or a list of objects, got {type(data).__name__}")
    results = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        fid = _number(entry.get("fid"))
        if fid is None:
            continue
        sampling = entry.get("sampling") if isinstance(entry.get("sampling"), dict) else {}
        settings = next((s for s in (entry.get("settings"), sampling.get("settings")) if isinstance(s, dict)), {})
        model = entry.get("model") if isinstance(entry.get("model"), dict) else {}
        inception = entry.get("inception_score")
        if isinstance(inception, dict):  # ucgm eval fid: {"mean", "std", "splits", ...}
            inception = inception.get("mean")
        results.append(MeasuredResult(
            fid=fid,
            nfe=_nfe_of(entry.get("nfe", sampling.get("nfe_per_sample")), settings),
            inception_score=_number(inception),
            num_samples=_integer(entry.get("num_samples")),
            settings=settings,
            reference=_reference_text(entry.get("reference")) or _text(entry.get("dataset")),
            state_sha256=_text(model.get("state_sha256")),
            source=str(file),
        ))
    return results


def _reference_text(value: Any) -> str | None:
    """A short name for the FID reference statistics (results.json "reference": text or mapping)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        for key in ("name", "path"):
            if isinstance(value.get(key), str) and value[key]:
                return Path(value[key]).name if key == "path" else value[key]
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _nfe_of(value: Any, settings: dict[str, Any]) -> str:
    """The NFE label: results.json's "nfe", else computed from its sampling settings."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if _integer(value) is not None:
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    try:
        from .recipe import SamplingSettings

        known = {k: v for k, v in settings.items() if k in SamplingSettings.__dataclass_fields__}
        return SamplingSettings(**known).nfe_label
    except Exception:  # noqa: BLE001 - settings of unknown shape: say so rather than fail the push
        return "?"


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


def license_for(family: str) -> LicenseInfo:
    """The license of weights derived from a `family` model (UNKNOWN_LICENSE if not known)."""
    return FAMILY_LICENSES.get(family, UNKNOWN_LICENSE)


def validate_repo_id(repo_id: str, flag: str = "--repo") -> str:
    """`repo_id` if it is a valid Hub model id USER/NAME, else a UCGMError saying why."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    text = repo_id.strip() if isinstance(repo_id, str) else repo_id
    try:
        hf_validate(text)
    except HFValidationError as err:
        raise UCGMError(f"{flag} {repo_id!r}: not a valid Hugging Face repo id ({_one_line(err)}); "
                        "expected USER/NAME, e.g. alice/sit-xl-ucgm-2step") from None
    if text.count("/") != 1:
        raise UCGMError(f"{flag} {repo_id!r}: expected USER/NAME (a namespace, a slash and a name), "
                        "e.g. alice/sit-xl-ucgm-2step")
    return text


def card_metadata(info: CheckpointInfo, repo_id: str, base_model: str | None = None,
                  license: str | None = None) -> Any:
    """The card's YAML metadata as a huggingface_hub ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    family = info.source_family
    lic = license_for(family)
    tags = [*BASE_TAGS, family]
    if info.is_imagenet:
        tags.append("imagenet")
    base = base_model or _text(info.raw_config.get("base_model"))
    dataset_type, dataset_name = _dataset(info)
    eval_results = []
    for r in info.results:
        args = {"nfe": r.nfe, **({"num_samples": r.num_samples} if r.num_samples else {}),
                **{k: v for k, v in r.settings.items() if isinstance(v, (int, float, str, list))}}
        common = dict(task_type=PIPELINE_TAG, task_name="Class-conditional image generation",
                      dataset_type=dataset_type, dataset_name=dataset_name, metric_config=f"nfe={r.nfe}",
                      metric_args=args)
        eval_results.append(EvalResult(metric_type="fid", metric_name=f"FID ({r.nfe} NFE)",
                                       metric_value=r.fid, **common))
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
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        base_model=base,
        datasets=[IMAGENET_DATASET] if info.is_imagenet else None,
        model_name=repo_id,
        eval_results=eval_results or None,
    )


def _dataset(info: CheckpointInfo) -> tuple[str, str]:
    res = info.resolution or (info.config.latent_shape[1] if info.config.vae.get("name") == "identity" else None)
    size = f" {res}x{res}" if res else ""
    if info.is_imagenet:
        return IMAGENET_DATASET, f"ImageNet-1k{size}"
    if info.source_family == "ucgm" and (info.recipe or {}).get("name") == "demo":
        return "ucgm-convert/demo-shapes", f"ucgm-convert demo shapes{size}"
    return "custom", f"{info.config.num_classes}-class data{size}"


def make_model_card(folder: str | Path | CheckpointInfo, repo_id: str, base_model: str | None = None,
                    license: str | None = None) -> Any:
    """The model card (huggingface_hub ModelCard) of a checkpoint folder to be published as `repo_id`."""
    from huggingface_hub import ModelCard

    info = folder if isinstance(folder, CheckpointInfo) else inspect_checkpoint(folder)
    repo_id = validate_repo_id(repo_id)
    data = card_metadata(info, repo_id, base_model=base_model, license=license)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(info, repo_id, data, license)}")


def _card_body(info: CheckpointInfo, repo_id: str, data: Any, license_override: str | None) -> str:
    cfg = info.config
    recipe = info.recipe or {}
    family = info.source_family
    model_name = _text(recipe.get("model")) or f"{cfg.arch} ({family})"
    base = data.base_model
    lines = [CARD_MARKER, "", f"# {repo_id.split('/')[1]}", ""]
    what = (f"A class-conditional image generator: **{model_name}** from the **{family}** family, "
            f"in the ucgm-convert format, for [UCGM]({UCGM_URL}) sampling (UCGM-S) and few-step "
            "tuning (UCGM-T, arXiv [2505.07447](https://arxiv.org/abs/2505.07447)).")
    lines += [what, ""]
    if base:
        lines += [f"Base model: [{base}](https://huggingface.co/{base}).", ""]
    if _text(recipe.get("description")):
        lines += [f"Recipe: *{recipe['description']}*.", ""]
    vae = cfg.vae.get("name", "identity")
    sampling = cfg.sampling or {}
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| family | `{family}` |",
              f"| architecture | `{cfg.arch}` ({_params(info.num_parameters)} parameters) |",
              f"| transport | `{cfg.transport}` |",
              f"| classes | {cfg.num_classes} (null class {cfg.null_class}) |",
              f"| latent shape (C, H, W) | {tuple(cfg.latent_shape)} |",
              f"| autoencoder | {'none (pixel space)' if vae == 'identity' else f'`{vae}`'}"
              f"{' (weights included: vae.safetensors)' if (info.path / VAE_WEIGHTS_NAME).is_file() else ''} |"]
    if sampling:
        lines.append(f"| default sampling | {_settings_text(sampling)} |")
    lines.append("")
    lines += _recipe_section(info)
    lines += _results_section(info)
    lines += ["## Usage", "", "```bash", f"pip install {LIBRARY_NAME}",
              f"ucgm sample --checkpoint {repo_id} --num 16 --out samples   # samples.npz + grid.png", "```", "",
              "```python", "import torch", "import ucgm_convert as uc", "",
              f'm = uc.load("{repo_id}")  # downloaded once, then read from the Hugging Face cache (offline too)',
              *_python_sampling(sampling), "```", ""]
    lic = license_for(family)
    lines += ["## License", ""]
    if license_override and license_override != lic.spdx:
        lines.append(f"License `{license_override}`, as declared by the publisher. For reference: {lic.note}")
    else:
        lines.append(f"License `{data.license}`. {lic.note}")
    lines += ["", f"Weights and card published with `ucgm push` ({LIBRARY_NAME}).", ""]
    return "\n".join(lines)


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _settings_text(s: dict[str, Any]) -> str:
    keys = ("steps", "order", "cfg_scale", "stochasticity", "extrapolation")
    parts = [f"{k}={s[k]}" for k in keys if k in s]
    return ", ".join(parts) or "-"


def _python_sampling(s: dict[str, Any]) -> list[str]:
    """Python lines sampling with the checkpoint's default settings (config.json "sampling")."""
    keys = ("steps", "order", "stochasticity", "extrapolation", "time_dist", "gaps")
    kwargs = "".join(f", {k}={tuple(s[k]) if isinstance(s[k], list) else s[k]!r}" for k in keys if k in s)
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


def _recipe_section(info: CheckpointInfo) -> list[str]:
    if info.recipe_text is None:
        return []
    recipe = info.recipe or {}
    lines = ["## Recipe", ""]
    name = _text(recipe.get("name"))
    lines.append(f"The hyperparameters used (`{RECIPE_NAME}`{f', recipe `{name}`' if name else ''}; "
                 "`ucgm recipes show NAME` prints the shipped ones):")
    lines += ["", "<details><summary>recipe.yaml</summary>", "", "```yaml", info.recipe_text.rstrip("\n"), "```",
              "", "</details>", ""]
    return lines


def _results_section(info: CheckpointInfo) -> list[str]:
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


# Text by which a README.md written by ucgm-convert is recognised: our marker, and the card
# `ucgm tune` writes into its checkpoints (ucgm_convert/tuner.py) until it carries the marker.
GENERATED_CARD_SIGNATURES = (CARD_MARKER, "Few-step generator made by `ucgm tune")


def is_generated_card(text: str) -> bool:
    """True for a README.md that ucgm-convert wrote (push may regenerate it)."""
    return any(sig in text for sig in GENERATED_CARD_SIGNATURES)


def write_model_card(folder: str | Path, card: Any, policy: CardPolicy = "auto") -> bool:
    """Write `card` as `folder`/README.md (atomically); False when a kept hand-written card stays.

    policy "auto": write unless README.md exists without CARD_MARKER (hand-written) -> UCGMError;
    "overwrite": always write; "keep": keep an existing README.md as it is.
    """
    path = Path(folder) / CARD_NAME
    if not _card_needs_writing(path, policy):
        return False
    write_file_atomic(path, str(card).encode())
    return True


def _card_needs_writing(path: Path, policy: CardPolicy) -> bool:
    """Whether the card at `path` is to be (re)written; UCGMError for a hand-written one under "auto"."""
    if not path.is_file():
        return True
    if policy == "keep":
        return False
    if policy == "auto" and not is_generated_card(path.read_text(errors="replace")):
        raise UCGMError(f"{path}: exists and was not generated by ucgm-convert; pass --overwrite-card to "
                        "replace it or --keep-card to upload it unchanged")
    return True


# --------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    repo_url: str | None
    commit_url: str | None
    commit_oid: str | None
    files: list[str]
    deleted: list[str]
    card_path: Path
    card_written: bool


def resolve_token(token: str | None) -> str:
    """`token`, else HF_TOKEN, else the cached `hf auth login` token; UCGMError if none."""
    from huggingface_hub import get_token

    if token is not None and token.strip():
        return token.strip()
    found = get_token()
    if not found:
        raise UCGMError("no Hugging Face token: pass --token hf_..., set the HF_TOKEN environment variable, or run "
                        "`hf auth login` once (a token with write access: https://huggingface.co/settings/tokens)")
    return found


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    card: CardPolicy = "auto",
    commit_message: str | None = None,
    dry_run: bool = False,
    results: list[str | Path] | tuple[str | Path, ...] = (),
) -> PushResult:
    """Validate `folder`, write its model card, and upload it to `repo_id` in one commit.

    Creates the repo if needed (`private` applies to a new repo only). Uploads the files of our
    format present in the folder (UPLOAD_FILES) and deletes those files from the repo that the
    folder no longer has (e.g. a stale vae.safetensors), in the same commit. `dry_run` writes
    the card and uploads nothing (no token needed). `results`: more results files for the
    card (FOLDER/results.json is always used and uploaded; these are only summarised).
    """
    repo_id = validate_repo_id(repo_id)
    if base_model is not None:
        base_model = validate_repo_id(base_model, flag="--base-model")
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise UCGMError(f"--license {license!r}: expected a Hub license id such as mit, apache-2.0, "
                        "cc-by-nc-sa-4.0 or other")
    if card not in ("auto", "overwrite", "keep"):
        raise UCGMError(f"card policy must be 'auto', 'overwrite' or 'keep', got {card!r}")
    info = inspect_checkpoint(folder, results)
    path = info.path
    card_path = path / CARD_NAME
    _card_needs_writing(card_path, card)  # a hand-written card conflict fails before anything happens
    files = [name for name in UPLOAD_FILES if (path / name).is_file() or name == CARD_NAME]
    if dry_run:
        written = write_model_card(path, make_model_card(info, repo_id, base_model, license), card)
        return PushResult(repo_id, None, None, None, files, [], card_path, written)
    token = resolve_token(token)
    model_card = make_model_card(info, repo_id, base_model, license)
    written = write_model_card(path, model_card, card)
    return _upload(path, repo_id, files, token=token, private=private, card_path=card_path, written=written,
                   commit_message=commit_message or f"Upload {info.config.arch} ({info.source_family}) with ucgm push")


def _upload(path: Path, repo_id: str, files: list[str], *, token: str, private: bool, card_path: Path,
            written: bool, commit_message: str) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from . import __version__

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        remote = set(api.list_repo_files(repo_id, repo_type="model"))
        deleted = [name for name in UPLOAD_FILES if name in remote and name not in files]
        operations = [CommitOperationDelete(path_in_repo=name) for name in deleted]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name)) for name in files]
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    except OfflineModeIsEnabled:
        raise UCGMError("cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hub)") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise UCGMError(f"{repo_id}: the Hub rejected the token (401 Unauthorized); check it is valid "
                            "and has write access") from None
        if status == 403:
            raise UCGMError(f"{repo_id}: the token may not write to this repo (403 Forbidden): "
                            f"{_one_line(err)}") from None
        raise UCGMError(f"{repo_id}: Hugging Face Hub error: {_one_line(err)}") from None
    except ValueError as err:  # e.g. the Hub's YAML validation of README.md (huggingface_hub raises ValueError)
        raise UCGMError(f"{repo_id}: the Hub refused the upload: {_one_line(err)}") from None
    except (*_transport_errors(), OSError) as err:
        raise UCGMError(f"{repo_id}: cannot reach the Hugging Face Hub ({_one_line(err)})") from None
    return PushResult(repo_id, str(repo_url), commit.commit_url, commit.oid, files, deleted, card_path, written)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (huggingface_hub 2.x: httpx2; older: requests, an OSError)."""
    try:
        import httpx2
    except ImportError:
        return ()
    return (httpx2.TransportError,)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
