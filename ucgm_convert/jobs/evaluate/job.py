"""One `ucgm eval fid` evaluation as a library: `run_one(EvalConfig) -> results dict`, also under torchrun (every
rank calls it); `jobs.evaluate.run` adds sweeps on top.

Metrics (`--metrics`, default the recipe's `metrics`) and the uint8 rule (`--uint8`, default the
recipe's `uint8`) decide which networks run and how pixels are made (metrics/extract.py).

Sample i has class i % num_classes and its own noise from (seed, i); chunks of `chunk_size`
samples are the unit of work and of resumption (jobs/evaluate/chunks.py). OUT/eval.json
fingerprints everything that determines the features; rerunning the same command resumes,
anything different is refused (or started over with `overwrite`). results.json appears only
when every chunk exists.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ... import distributed
from ...checkpoint import RESULTS_NAME
from ...console import SILENT, Reporter
from ...formats.statedict import state_sha256
from ...foundation import SAMPLE_DTYPES, output_folder, precision_label, resolve_device, sampling_dtype
from ...generation import batches, generate_batch
from ...metrics.extract import Extractors, load_extractors
from ...metrics.reference import ReferenceSet, load_reference_set
from ...recipe import Recipe
from ...settings import SamplingSettings
from ...settings.base import Bool, Int, Settings, choice
from ...settings.evaluation import DEFAULT_METRICS, UINT8_DEFAULT, MetricList, Uint8Rule
from ...settings.sweep import as_sweep
from ..source import ArchOverrides, ModelSource, Resolved, SamplingSweep, resolve
from .chunks import (
    CLASS_SAMPLING,
    FEATURES_DIR,
    MANIFEST_NAME,
    ChunkPlan,
    Generator,
    chunk_ranges,
    class_labels,
    compute_chunks,
)
from .results import IMAGES_DIR, SAMPLES_NPZ, Outputs, finalize, versions

OWNED = (MANIFEST_NAME, RESULTS_NAME, FEATURES_DIR, IMAGES_DIR, SAMPLES_NPZ)


class EvalConfig(Settings):
    """Everything `ucgm eval fid` needs; see `ucgm eval fid --help` for each field."""

    ref: Path = Field(description="Reference statistics: an .npz with mu/sigma (ADM VIRTUAL_imagenet256_labeled.npz, "
                      "`ucgm eval ref` output), torch-fidelity's *-stat-fid-2048.pt, or EDM2's dataset-refs/*.pkl.")
    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    sampling: SamplingSweep = SamplingSweep()  # type: ignore[valid-type]
    num: Int = Field(default=50_000, ge=1, le=10_000_000,
                     description="Number of samples (papers: 50000). Sample i has class i % num_classes.")
    allow_unbalanced: Bool = Field(default=False, description="Allow --num that is not a multiple of the number of "
                                   "classes.")
    batch_size: Int = Field(default=64, ge=1, le=65_536, description="Samples per sampler batch within a chunk "
                            "(fixed per --out: on GPUs the batch shape can change the last bits).")
    chunk_size: Int = Field(default=250, ge=1, le=100_000, description="Samples per chunk: the unit of work, of "
                            "resumption and of one forward per feature network (fixed per --out).")
    seed: Int = Field(default=0, ge=0, le=2**63 - 1, description="Seed; sample i depends only on (seed, i).")
    out: Path = Field(default=Path("eval"), description="Output folder: results.json, eval.json, features/ (rerun "
                      "the same command to resume).")
    overwrite: Bool = Field(default=False, description="Start over in --out, deleting a previous evaluation there.")
    device: str | None = Field(default=None, description="Torch device (under torchrun: cuda uses cuda:LOCAL_RANK). "
                               "Default: cuda if available, else cpu.")
    dtype: choice(*SAMPLE_DTYPES) = Field(default="auto", description="Network precision: float32, tf32 (float32 "  # type: ignore[valid-type]
                                          "weights, TF32 matmuls on CUDA), or bfloat16 / float16 autocast. auto: tf32 "
                                          "on CUDA (the reference samples with TF32), float32 elsewhere. Inception "
                                          "and DINOv2 always run in float32.")
    compile: Bool = Field(default=False, description="Compile the network with torch.compile: faster sampling after a "
                          "one-off compilation of tens of seconds (measured by `ucgm bench --only precision`).")
    save_images: Bool = Field(default=False, description="Also write OUT/images/XXXXXX.png.")
    save_npz: Bool = Field(default=False, description="Also write OUT/samples.npz for the ADM evaluator (arr_0 uint8 "
                           "NHWC, arr_1 labels).")
    inception_weights: Path | None = Field(default=None, description="torch-fidelity's Inception weights file "
                                           "(offline clusters); default: $UCGM_INCEPTION_WEIGHTS, else its cache.")
    dinov2_weights: Path | None = Field(default=None, description="Official DINOv2 ViT-L/14 weights "
                                        "(dinov2_vitl14_pretrain.pth) for fd_dinov2; default: $UCGM_DINOV2_WEIGHTS, "
                                        "else torch hub's cache. Never downloaded.")
    metrics: MetricList | None = Field(default=None, description="Comma-separated metrics: fid, is, sfid, prec, "
                                       "rec, fd_dinov2. Default: what the recipe's paper reports, else fid,is.")
    uint8: Uint8Rule | None = Field(default=None, description="How decoded images become uint8: 'round' "  # type: ignore[valid-type]
                                    "(floor(255 x + 0.5)) or 'truncate' (floor(255 x), LINs-lab/UCGM's FID). "
                                    "Default: the recipe's (the pipeline behind its published numbers), else round.")


    @field_validator("sampling", mode="before")
    @classmethod
    def _sweep(cls, value: Any) -> Any:
        return as_sweep(SamplingSweep, value)  # a SamplingOverrides instance is one point


def sampler(resolved: Resolved, settings: SamplingSettings, config: EvalConfig, vae_module: Any,
            uint8: str = UINT8_DEFAULT) -> Generator:
    """Images for chunk indices: UCGM-S in batches of `config.batch_size`, decoded through the VAE."""

    def generate(indices: range, labels: Sequence[int]) -> np.ndarray:
        out = []
        for sub in batches(len(indices), config.batch_size):
            _, images = generate_batch(resolved.model, settings, [labels[j] for j in sub],
                                       indices[sub.start:sub.stop], config.seed, config.dtype, vae_module=vae_module,
                                       uint8=uint8)
            out.append(images.numpy())
        return np.concatenate(out)

    return generate


def _clear(out: Path) -> None:
    """Remove a previous evaluation's files from `out` (--overwrite)."""
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_one(config: EvalConfig, reporter: Reporter = SILENT) -> dict[str, Any] | None:
    """One evaluation: sample, extract features, compute the metrics; results.json's content (None on ranks > 0)."""
    chunk_ranges(config.num, config.chunk_size)
    if config.metrics is not None:  # bad input fails before anything slow
        load_reference_set(config.ref, config.metrics, rows=False)
    with distributed.session(str(resolve_device(config.device))) as ctx:
        return _run(config, ctx, reporter)


def choices(config: EvalConfig, recipe: Recipe | None) -> tuple[list[str], str, str]:
    """(metrics, uint8 rule, where they came from): the flags, else the recipe's, else fid,is and round."""
    name = f"recipe {recipe.name}" if recipe is not None else "default"
    metrics = config.metrics or (recipe.metrics if recipe is not None else list(DEFAULT_METRICS))
    uint8 = config.uint8 or (recipe.uint8 if recipe is not None else UINT8_DEFAULT)
    return metrics, uint8, (f"--metrics: {'flag' if config.metrics else name}; --uint8: "
                            f"{'flag' if config.uint8 else name}")


def reference_pool(reference: ReferenceSet, extract: Extractors, batch: int) -> np.ndarray | None:
    """The reference's pool rows for prec / rec: stored, or computed from its arr_0 images (as ADM does)."""
    if reference.pool is not None or reference.images is None or extract.inception is None:
        return reference.pool
    images = reference.images
    return np.concatenate([extract.inception(images[s:s + batch])[0] for s in range(0, len(images), batch)])


def _fingerprint(config: EvalConfig, model: Any, settings: SamplingSettings, hashes: tuple[str, str],
                 extract: Extractors, uint8: str, device_type: str) -> dict[str, Any]:
    vers = versions()
    return {
        "model_state_sha256": hashes[0], "vae_state_sha256": hashes[1], "model_config": model.config,
        "settings": settings.to_dict(), "dtype": config.dtype, "seed": config.seed, "num": config.num,
        "chunk_size": config.chunk_size, "batch_size": config.batch_size, "class_sampling": CLASS_SAMPLING,
        "features": extract.keys, "weights_sha256": extract.weights(), "uint8": uint8, "device_type": device_type,
        "versions": {k: vers[k] for k in ("ucgm-convert", "torch", "torch-fidelity", "timm")},
        **({"compile": True} if config.compile else {}),  # compiled kernels round differently
    }


def _run(config: EvalConfig, ctx: distributed.Context, reporter: Reporter) -> dict[str, Any] | None:
    out = config.out
    precision = precision_label(sampling_dtype(config.dtype, ctx.device.type), config.dtype)
    config = config.replace(dtype=sampling_dtype(config.dtype, ctx.device.type))  # the fingerprint: what ran
    if ctx.is_main:
        output_folder(out, OWNED, "evaluation", overwrite=config.overwrite, resume=True)
        if config.overwrite:
            _clear(out)
    distributed.barrier(ctx)
    resolved = resolve(config.source, config.arch, ctx.device)
    model = resolved.model
    if config.compile:
        model.net.compile()  # in place: the state-dict keys (and so the model hash) stay as they are
    metrics, uint8, origin = choices(config, resolved.recipe)
    reference = load_reference_set(config.ref, metrics, rows=ctx.is_main)  # only the main rank uses the rows
    settings = resolved.sampling_with(config.sampling.single())
    labels = class_labels(config.num, model.num_classes, config.allow_unbalanced)
    vae_module = model.load_vae(config.source.vae)
    extract = load_extractors(metrics, config.inception_weights, config.dinov2_weights, ctx.device)
    hashes = state_sha256(model), state_sha256(vae_module)
    fingerprint = _fingerprint(config, model, settings, hashes, extract, uint8, ctx.device.type)
    reporter.table(f"Effective settings (base: {resolved.origin}; flags override)", {
        **settings.to_dict(),
        "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})",
        "num / chunk / batch size / seed": f"{config.num} / {config.chunk_size} / {config.batch_size} / {config.seed}",
        "processes / device / dtype": f"{ctx.world_size} / {ctx.device} / {precision}",
        "NFE per sample": settings.nfe_label,
        "metrics / uint8": f"{','.join(metrics)} / {uint8} ({origin})",
        "reference": f"{reference.path} ({reference.format})",
    })
    plan = ChunkPlan(out, labels, config.chunk_size, config.save_images or config.save_npz, reference.resolution)
    generate = sampler(resolved, settings, config, vae_module, uint8)
    with reporter.progress("samples") as bar:
        task = bar.add_task("sampling + " + " + ".join(extract.networks), total=config.num)
        store = compute_chunks(plan, fingerprint, generate, extract, ctx, lambda done: bar.update(task, completed=done))
    if not ctx.is_main:
        return None
    record = {
        "seed": config.seed,
        "sampling": {"settings": settings.to_dict(), "origin": resolved.origin, "dtype": config.dtype,
                     "nfe_per_sample": settings.nfe_label},
        "model": {"checkpoint": config.source.checkpoint, "recipe": config.source.recipe, "family": model.family,
                  "arch": model.cfg.arch, "transport": model.transport.name, "state_sha256": hashes[0],
                  "overrides": config.arch.given(), "config": model.config},
        "vae": {"name": model.cfg.vae.name, "weights": config.source.vae or model.cfg.vae.source
                or ("stored with the model" if model.vae_state else None), "state_sha256": hashes[1]},
        "evaluator": extract.describe(metrics),
        "published": _published(resolved.recipe),
        "choices": origin,
        "batch_size": config.batch_size,
        "num_processes": ctx.world_size,
        "device": str(ctx.device),
    }
    outputs = Outputs(metrics, uint8, reference_pool(reference, extract, config.chunk_size), str(ctx.device),
                      config.save_npz, config.save_images)
    results = finalize(plan, store, reference, record, model.num_classes, outputs)
    reporter.table("Evaluation", {
        **{LABELS[name]: _shown(name, results) for name in metrics},
        "samples": f"{results['num_samples']} ({results['class_sampling']['rule']})",
        "reference": f"{reference.path} (sha256 {reference.sha256[:12]}…)",
    })
    reporter.info(f"wrote {out / RESULTS_NAME}")
    return results


def _published(recipe: Recipe | None) -> dict[str, Any]:
    """The recipe's published results (paper_before / paper_after / paper_tuned), for comparison."""
    if recipe is None:
        return {}
    return {key: getattr(recipe, key).to_dict() for key in ("paper_before", "paper_after", "paper_tuned")
            if getattr(recipe, key) is not None}


LABELS = {"fid": "FID", "is": "Inception Score", "sfid": "sFID", "prec": "Precision", "rec": "Recall",
          "fd_dinov2": "FD_DINOv2"}


def _shown(name: str, results: dict[str, Any]) -> str:
    value = results["metrics"][name]
    if value is None:
        return "n/a (fewer samples than IS splits)"
    if name == "is":
        return f"{value:.3f} ± {results['inception_score']['std']:.3f}"
    return f"{value:.4f}"
