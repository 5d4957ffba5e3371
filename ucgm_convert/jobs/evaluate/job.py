"""`ucgm eval fid` as a library: `run(EvalConfig) -> results dict`, also under torchrun (every rank calls it).

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
from pydantic import Field

from ... import distributed
from ...checkpoint import RESULTS_NAME
from ...console import SILENT, Reporter
from ...formats.statedict import state_sha256
from ...foundation import DTYPES, output_folder, resolve_device
from ...generation import batches, generate_batch
from ...metrics.fid import FEATURE_DIM, load_reference
from ...metrics.inception import load_inception
from ...settings import SamplingSettings
from ...settings.base import Bool, Int, Settings, choice
from ..source import ArchOverrides, ModelSource, Resolved, SamplingOverrides, resolve
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
from .results import IMAGES_DIR, SAMPLES_NPZ, finalize, versions

OWNED = (MANIFEST_NAME, RESULTS_NAME, FEATURES_DIR, IMAGES_DIR, SAMPLES_NPZ)


class EvalConfig(Settings):
    """Everything `ucgm eval fid` needs; see `ucgm eval fid --help` for each field."""

    ref: Path = Field(description="Reference statistics: an .npz with mu/sigma (ADM VIRTUAL_imagenet256_labeled.npz, "
                      "`ucgm eval ref` output), torch-fidelity's *-stat-fid-2048.pt, or EDM2's dataset-refs/*.pkl.")
    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    sampling: SamplingOverrides = SamplingOverrides()  # type: ignore[valid-type]
    num: Int = Field(default=50_000, ge=1, le=10_000_000,
                     description="Number of samples (papers: 50000). Sample i has class i % num_classes.")
    allow_unbalanced: Bool = Field(default=False, description="Allow --num that is not a multiple of the number of "
                                   "classes.")
    batch_size: Int = Field(default=64, ge=1, le=65_536, description="Samples per sampler batch within a chunk "
                            "(fixed per --out: on GPUs the batch shape can change the last bits).")
    chunk_size: Int = Field(default=250, ge=1, le=100_000, description="Samples per chunk: the unit of work, of "
                            "resumption and of one Inception forward (fixed per --out).")
    seed: Int = Field(default=0, ge=0, le=2**63 - 1, description="Seed; sample i depends only on (seed, i).")
    out: Path = Field(default=Path("eval"), description="Output folder: results.json, eval.json, features/ (rerun "
                      "the same command to resume).")
    overwrite: Bool = Field(default=False, description="Start over in --out, deleting a previous evaluation there.")
    device: str | None = Field(default=None, description="Torch device (under torchrun: cuda uses cuda:LOCAL_RANK). "
                               "Default: cuda if available, else cpu.")
    dtype: choice(*DTYPES) = Field(default="float32", description="Network precision: float32, or bfloat16 / "  # type: ignore[valid-type]
                                   "float16 autocast. Inception always runs in float32.")
    compile: Bool = Field(default=False, description="Compile the network with torch.compile: faster sampling after a "
                          "one-off compilation of tens of seconds (measured by `ucgm bench --only precision`).")
    save_images: Bool = Field(default=False, description="Also write OUT/images/XXXXXX.png.")
    save_npz: Bool = Field(default=False, description="Also write OUT/samples.npz for the ADM evaluator (arr_0 uint8 "
                           "NHWC, arr_1 labels).")
    inception_weights: Path | None = Field(default=None, description="torch-fidelity's Inception weights file "
                                           "(offline clusters); default: $UCGM_INCEPTION_WEIGHTS, else its cache.")


def sampler(resolved: Resolved, settings: SamplingSettings, config: EvalConfig, vae_module: Any) -> Generator:
    """Images for chunk indices: UCGM-S in batches of `config.batch_size`, decoded through the VAE."""

    def generate(indices: range, labels: Sequence[int]) -> np.ndarray:
        out = []
        for sub in batches(len(indices), config.batch_size):
            _, images = generate_batch(resolved.model, settings, [labels[j] for j in sub],
                                       indices[sub.start:sub.stop], config.seed, config.dtype, vae_module=vae_module)
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


def run(config: EvalConfig, reporter: Reporter = SILENT) -> dict[str, Any] | None:
    """Sample, extract features and compute FID / IS; returns results.json's content (None on ranks > 0)."""
    reference = load_reference(config.ref, FEATURE_DIM)  # bad input fails before anything slow
    chunk_ranges(config.num, config.chunk_size)
    with distributed.session(str(resolve_device(config.device))) as ctx:
        return _run(config, reference, ctx, reporter)


def _run(config: EvalConfig, reference: Any, ctx: distributed.Context, reporter: Reporter) -> dict[str, Any] | None:
    out = config.out
    if ctx.is_main:
        output_folder(out, OWNED, "evaluation", overwrite=config.overwrite, resume=True)
        if config.overwrite:
            _clear(out)
    distributed.barrier(ctx)
    resolved = resolve(config.source, config.arch, ctx.device)
    model = resolved.model
    if config.compile:
        model.net.compile()  # in place: the state-dict keys (and so the model hash) stay as they are
    settings = resolved.sampling_with(config.sampling)
    labels = class_labels(config.num, model.num_classes, config.allow_unbalanced)
    vae_module = model.load_vae(config.source.vae)
    inception = load_inception(config.inception_weights, ctx.device)
    model_hash, vae_hash = state_sha256(model), state_sha256(vae_module)
    vers = versions()
    fingerprint = {
        "model_state_sha256": model_hash, "vae_state_sha256": vae_hash, "model_config": model.config,
        "settings": settings.to_dict(), "dtype": config.dtype, "seed": config.seed, "num": config.num,
        "chunk_size": config.chunk_size, "batch_size": config.batch_size, "class_sampling": CLASS_SAMPLING,
        "inception_weights_sha256": inception.weights_sha256, "device_type": ctx.device.type,
        "versions": {k: vers[k] for k in ("ucgm-convert", "torch", "torch-fidelity")},
        **({"compile": True} if config.compile else {}),  # compiled kernels round differently
    }
    reporter.table(f"Effective settings (base: {resolved.origin}; flags override)", {
        **settings.to_dict(),
        "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})",
        "num / chunk / batch size / seed": f"{config.num} / {config.chunk_size} / {config.batch_size} / {config.seed}",
        "processes / device / dtype": f"{ctx.world_size} / {ctx.device} / {config.dtype}",
        "NFE per sample": settings.nfe_label,
        "reference": f"{reference.path} ({reference.format})",
    })
    plan = ChunkPlan(out, labels, config.chunk_size, config.save_images or config.save_npz, reference.resolution)
    generate = sampler(resolved, settings, config, vae_module)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        pool, logits = inception(images)
        return {"pool": pool, "logits": logits}

    with reporter.progress("samples") as bar:
        task = bar.add_task("sampling + Inception", total=config.num)
        store = compute_chunks(plan, fingerprint, generate, features, ctx,
                               lambda done: bar.update(task, completed=done))
    if not ctx.is_main:
        return None
    record = {
        "seed": config.seed,
        "sampling": {"settings": settings.to_dict(), "origin": resolved.origin, "dtype": config.dtype,
                     "nfe_per_sample": settings.nfe_label},
        "model": {"checkpoint": config.source.checkpoint, "recipe": config.source.recipe, "family": model.family,
                  "arch": model.cfg.arch, "transport": model.transport.name, "state_sha256": model_hash,
                  "overrides": config.arch.given(), "config": model.config},
        "vae": {"name": model.cfg.vae.name, "weights": config.source.vae or model.cfg.vae.source
                or ("stored with the model" if model.vae_state else None), "state_sha256": vae_hash},
        "evaluator": inception.describe(),
        "batch_size": config.batch_size,
        "num_processes": ctx.world_size,
        "device": str(ctx.device),
    }
    results = finalize(plan, store, reference, record, model.num_classes, config.save_npz, config.save_images)
    score = results["inception_score"]
    reporter.table("Evaluation", {
        "FID": f"{results['fid']:.4f}",
        **({"Inception Score": f"{score['mean']:.3f} ± {score['std']:.3f}"} if score["mean"] is not None else {}),
        "samples": f"{results['num_samples']} ({results['class_sampling']['rule']})",
        "reference": f"{reference.path} (sha256 {reference.sha256[:12]}…)",
    })
    reporter.info(f"wrote {out / RESULTS_NAME}")
    return results
