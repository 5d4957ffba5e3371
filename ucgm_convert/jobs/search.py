"""`ucgm search` as a library: `run(SearchConfig) -> SearchResult` finds UCGM-S settings per NFE budget.

For each budget N it runs `uc.search` on the model (labels balanced over the classes, noise and
labels fixed across trials) and writes OUT/nfe-N.yaml: the base recipe with `sampling` replaced
by the found settings, so `--from OUT/nfe-N.yaml` works on sample, eval fid and tune. Then it
measures, on FRESH noise (seed + 1), the found settings, the base settings moved to N evaluations
and the diffusers baselines against a many-step reference drawn from that fresh noise, and writes
OUT/table.csv, OUT/table.json and OUT/distance.png.

Objective: the Frechet distance to `--reference-steps` Euler steps of the same model with the
base settings' guidance (`features`: the latents, or the decoded pixels). With --search-guidance
the guidance scale and interval are searched as well, against the same target: the base
settings' guided distribution at many steps (not the unguided one, which guidance would move away from).
With --encoder-evals E (a network that shares its condition encoder, e.g. DDT) `encoder_refresh` is searched
too, within E encoder evaluations per sample; the table reports encoder and decoder evaluations separately.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from ..baselines import run_baseline
from ..console import SILENT, Reporter
from ..errors import UCGMError
from ..foundation import (
    SAMPLE_DTYPES,
    output_folder,
    resolve_device,
    sampling_dtype,
    write_file_atomic,
    write_text_atomic,
)
from ..generation import balanced_labels, batches, model_fn
from ..metrics.dinov2 import load_dinov2
from ..metrics.inception import load_inception
from ..model import GenerativeModel
from ..recipe import Recipe
from ..sampler import ModelFn
from ..searcher import Objective, at_nfe, encoder_evals_of, latent_features, nfe_of, search_outcome
from ..settings import SamplingSettings
from ..settings.base import Bool, Int, Settings, choice
from ..vae import decode, to_uint8
from .source import ArchOverrides, ModelSource, Resolved, resolve

OWNED = ("nfe-*.yaml", "trials-nfe-*.jsonl", "table.csv", "table.json", "distance.png")
MAX_NFE = 1000
FEATURES = ("latent", "pixel", "inception", "dinov2")
DECODE_BATCH = 64
BASELINES = {"UniPC": "unipc", "DPM-Solver++ 2M": "dpm++2m"}  # diffusers' schedulers (ucgm_convert.baselines)


def _nfe_list(value: object) -> object:
    """'2,4,8' -> [2, 4, 8]."""
    if isinstance(value, str):
        try:
            return [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            return value
    return value


NfeList = Annotated[list[Annotated[int, Field(ge=1, le=MAX_NFE)]], BeforeValidator(_nfe_list)]


class SearchConfig(Settings):
    """Everything `ucgm search` needs; see `ucgm search --help` for each field."""

    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    nfe: NfeList = Field(default=[2, 4, 8, 16], min_length=1,
                         description="Comma-separated NFE budgets (network evaluations per sample, CFG not doubled).")
    trials: Int = Field(default=200, ge=1, le=100_000, description="Trials per budget (grid + CMA-ES).")
    num_samples: Int = Field(default=4096, ge=16, le=1_000_000, description="Samples per trial (fixed noise).")
    reference_steps: Int = Field(default=256, ge=2, le=10_000,
                                 description="Euler steps of the reference set the distance is measured to.")
    features: choice(*FEATURES) = Field(default="latent",  # type: ignore[valid-type]
                                        description="Feature space of the Frechet distance: the latents, the "
                                                    "VAE-decoded pixels, or Inception pool3 / DINOv2 features "
                                                    "of the decoded images.")
    feature_weights: Path | None = Field(default=None, description="Inception (torch-fidelity) or DINOv2 weights "
                                         "for --features inception|dinov2. Default: the cached download.")
    search_guidance: Bool = Field(default=False, description="Also search the guidance scale and interval "
                                  "(target: the base settings' guided samples at many steps).")
    encoder_evals: Int | None = Field(default=None, ge=1, le=MAX_NFE, description="Budget of condition-encoder "
                                      "evaluations per sample (models whose network shares its encoder, e.g. DDT): "
                                      "the encoder refresh rate is searched within it. Default: every evaluation.")
    seed: Int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the search noise (seed + 1: the table's).")
    batch_size: Int = Field(default=1024, ge=1, le=65_536, description="Samples per batch (does not change results).")
    out: Path = Field(default=Path("search"), description="Output folder for nfe-N.yaml, table.csv/json, "
                      "distance.png and the trial logs (an interrupted search resumes from them).")
    overwrite: Bool = Field(default=False, description="Delete the trial logs of a previous search in --out first.")
    device: str | None = Field(default=None, description="Torch device (cpu, cuda, cuda:N). Default: cuda if "
                               "available, else cpu.")
    dtype: choice(*SAMPLE_DTYPES) = Field(default="auto", description="Network precision: float32, tf32 (float32 "  # type: ignore[valid-type]
                                          "weights, TF32 matmuls on CUDA), or bfloat16 / float16 autocast. auto: tf32 "
                                          "on CUDA (the reference samples with TF32), float32 elsewhere.")


@dataclass
class SearchResult:
    """What `run` wrote: a recipe per budget, the measured table and its plot."""

    recipes: dict[int, Path]
    found: dict[int, dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    table: Path | None = None
    plot: Path | None = None


def base_recipe(resolved: Resolved) -> Recipe:
    """The recipe the found settings are written into: the source's, else one made from the model's config."""
    model = resolved.model
    if resolved.recipe is not None:
        recipe = resolved.recipe
        return recipe.replace(checkpoint=resolved.source) if recipe.checkpoint != resolved.source else recipe
    cfg = model.cfg
    return Recipe(name=f"{cfg.arch}-searched", family=model.family, model=cfg.arch,
                  resolution=cfg.latent_shape[-1], transport=model.transport.name, num_classes=model.num_classes,
                  vae=cfg.vae.source or cfg.vae.name, checkpoint=resolved.source,
                  sampling=resolved.sampling or SamplingSettings(steps=16))


def feature_fn(model: GenerativeModel, config: SearchConfig, vae_source: str | None,
               device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
    """Latent features; or of the decoded images: their pixels in [0, 1] (projected above 2048 dimensions),
    Inception pool3 (2048) or DINOv2 CLS (1024) features of their uint8 values."""
    flat = latent_features()
    if config.features == "latent":
        return flat
    vae_module = model.load_vae(vae_source)
    network: Callable[[torch.Tensor], Any] | None = None
    if config.features == "inception":
        inception = load_inception(config.feature_weights, device)
        network = lambda images: inception(images)[0]  # noqa: E731  (pool3 of the (pool, logits) pair)
    elif config.features == "dinov2":
        network = load_dinov2(config.feature_weights, device)

    def decoded(x: torch.Tensor) -> np.ndarray:
        parts = []
        for i in range(0, x.shape[0], DECODE_BATCH):
            images = decode(x[i : i + DECODE_BATCH].to(model.device), model.cfg.vae, vae_module).float().cpu()
            parts.append(flat(images) if network is None else np.asarray(network(to_uint8(images)), np.float64))
        return np.concatenate(parts)

    return decoded


def _guided(model: GenerativeModel, base: SamplingSettings, dtype: str) -> Callable[[float, tuple[float, float]],
                                                                                        ModelFn]:
    def make(scale: float, interval: tuple[float, float]) -> ModelFn:
        return model_fn(model, base.replace(cfg_scale=scale, cfg_interval=interval), dtype)

    return make


def run(config: SearchConfig, reporter: Reporter = SILENT) -> SearchResult:
    """Search every budget of `config.nfe`, write a recipe per budget, then the fresh-noise table and plot."""
    out = output_folder(config.out, OWNED, "search", overwrite=config.overwrite, resume=True)
    if config.overwrite:
        for log in out.glob("trials-nfe-*.jsonl"):
            log.unlink()
    device = resolve_device(config.device)
    config = config.replace(dtype=sampling_dtype(config.dtype, device.type))  # what runs (and what the logs record)
    resolved = resolve(config.source, config.arch, device)
    model, recipe = resolved.model, base_recipe(resolved)
    if config.encoder_evals is not None and not model.shares_encoder:
        raise UCGMError(f"--encoder-evals: {resolved.source} ({model.family}) has no shareable condition encoder; "
                        "drop the flag")
    base = recipe.sampling
    fn = model_fn(model, base, config.dtype)
    labels = torch.as_tensor(balanced_labels(config.num_samples, range(model.num_classes)), device=device)
    features = feature_fn(model, config, config.source.vae, device)
    reporter.table(f"Search (base: {resolved.origin})", {
        "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})", "budgets (NFE)": config.nfe,
        "trials / samples": f"{config.trials} / {config.num_samples}",
        "objective": f"Frechet distance ({config.features}) to {config.reference_steps} Euler steps"
                     + (f" with CFG {base.cfg_scale}" if base.uses_guidance else ""),
        "searched": "sampler" + (" + guidance scale and interval" if config.search_guidance else "")
                    + (f" + encoder refresh (<= {config.encoder_evals} encoder evaluations)"
                       if config.encoder_evals is not None else "")})
    reference = {"steps": config.reference_steps, "order": 1}
    guidance = {"cfg_scale": base.cfg_scale, "cfg_interval": base.cfg_interval} if config.search_guidance else {}
    starts = [{**base.as_sample_kwargs(), **guidance}] + ([recipe.few_step_sampling.as_sample_kwargs()]
                                                          if recipe.few_step_sampling is not None else [])
    result, ref = SearchResult({}, {}), []
    for nfe in config.nfe:
        outcome = search_outcome(
            fn, model.latent_shape, model.transport, nfe, config.num_samples, config.seed, trials=config.trials,
            reference=reference, features=features, start=[at_nfe(s, nfe) for s in starts],
            guided_fn=_guided(model, base, config.dtype) if config.search_guidance else None,
            log=out / f"trials-nfe-{nfe}.jsonl", fingerprint={"source": resolved.source, "features": config.features,
                                                             "dtype": config.dtype},
            batch_size=config.batch_size, device=device, show_progress=reporter.enabled, reference_stats=ref,
            encoder_evals=config.encoder_evals, y=labels)
        ref = outcome.reference_stats
        assert nfe_of(outcome.settings) == nfe
        settings = base.replace(**{"encoder_refresh": 1, **outcome.settings})  # what was measured, exactly
        path = out / f"nfe-{nfe}.yaml"
        # the recipe's own name: everything but `sampling` behaves as the base recipe (e.g. tune's demo data)
        found = recipe.replace(description=f"{recipe.description} (sampling: `ucgm search`, {nfe} NFE)".strip(),
                               sampling=settings)
        write_text_atomic(path, found.to_yaml())
        result.recipes[nfe], result.found[nfe] = path, outcome.settings
        reporter.info(f"NFE {nfe}: distance {outcome.distance:.4g} on the search noise "
                      f"({encoder_evals_of(outcome.settings)} encoder evaluations); wrote {path}")
    result.rows = measure(model, base, result.found, config, features, reference, reporter)
    result.table, result.plot = write_table(out, result.rows)
    return result


def measure(model: GenerativeModel, base: SamplingSettings, found: dict[int, dict[str, Any]], config: SearchConfig,
            features: Callable[[torch.Tensor], np.ndarray], reference: dict[str, Any],
            reporter: Reporter) -> list[dict[str, Any]]:
    """Distance to the many-step reference on fresh noise (seed + 1) of the found settings, the base settings
    moved to N evaluations and diffusers' UniPC and DPM-Solver++ 2M (every transport: baselines.py maps
    the flow sigma to the transport time of equal SNR; exact for Linear and ReLinear)."""
    fn = model_fn(model, base, config.dtype)
    seed = config.seed + 1
    noise = torch.randn((config.num_samples, *model.latent_shape),
                        generator=torch.Generator().manual_seed(seed)).to(model.device)
    labels = torch.as_tensor(balanced_labels(config.num_samples, range(model.num_classes)), device=model.device)
    objective = Objective(fn, noise, model.transport, seed, features, reference,
                          _guided(model, base, config.dtype), config.batch_size, {"y": labels})
    rows = []
    for nfe, settings in found.items():
        counts = {"encoder_evals": nfe, "decoder_evals": nfe}  # per sample, CFG not doubled
        rows.append({"nfe": nfe, "method": "searched", "distance": objective(settings),
                     **counts, "encoder_evals": encoder_evals_of(settings)})
        rows.append({"nfe": nfe, "method": "base settings", "distance": objective(at_nfe(base.as_sample_kwargs(),
                                                                                        nfe)), **counts})
        for method, name in BASELINES.items():
            samples = torch.cat([run_baseline(name, fn, noise[r], nfe=nfe, transport=model.transport,
                                              y=labels[r]).samples.cpu()
                                 for r in batches(config.num_samples, config.batch_size)])
            rows.append({"nfe": nfe, "method": method, "distance": objective.distance(samples), **counts})
    reporter.table("Frechet distance to the many-step reference, fresh noise (lower is better)", {
        f"NFE {nfe}": "   ".join(f"{r['method']} {r['distance']:.4g}"
                                  + (f" (encoder {r['encoder_evals']})" if r["encoder_evals"] != nfe else "")
                                  for r in rows if r["nfe"] == nfe)
        for nfe in found})
    return rows


def write_table(out: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """OUT/table.csv, OUT/table.json and OUT/distance.png (distance against NFE, one line per method)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["nfe", "method", "distance", "encoder_evals", "decoder_evals"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "table.csv", buffer.getvalue())
    write_text_atomic(out / "table.json", json.dumps({"rows": rows}, indent=2, allow_nan=True) + "\n")
    return out / "table.csv", plot(out / "distance.png", rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A log-scale plot of distance against NFE per method, written atomically."""
    import matplotlib  # a heavy optional import, only for the plot

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["nfe"], r["distance"]) for r in rows if r["method"] == method and np.isfinite(r["distance"]))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set(xlabel="NFE", ylabel="Frechet distance to the many-step reference", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    write_file_atomic(path, buffer.getvalue())
    return path
