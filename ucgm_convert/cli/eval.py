"""`ucgm eval fid` (sample + Inception features + FID/IS, sharded and resumable) and `ucgm eval ref`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..distributed import (
    Context,
    launched_by_torchrun,
    relaunch_with_torchrun,
    setup,
    teardown,
)
from ..errors import UCGMError
from ..evaluate import (
    CLASS_SAMPLING,
    RESULTS_NAME,
    EvalConfig,
    chunk_ranges,
    class_labels,
    compute_chunks,
    finalize,
    reference_from_images,
    sampler,
    settings_record,
    state_sha256,
    versions,
)
from ..fid import FEATURE_DIM, load_reference, save_reference
from ..inception import WEIGHTS_ENV, WEIGHTS_FILENAME, load_inception
from ..vae import load_model_vae
from .common import clean_errors, console
from .convert import ENCODER_DEPTH, LATENT_STATS, NUM_HEADS, RESOLUTION, arch_overrides
from .sample import (
    CFG, CFG_CHANNELS, CFG_INTERVAL, CHECKPOINT, EXTRAPOLATION, FAMILY, FROM, GAPS, ORDER, STEPS, STOCHASTICITY,
    TIME_DIST, VAE, effective_settings, resolve_model_and_settings, settings_table,
)

eval_app = typer.Typer(
    help="Measure FID / Inception Score the way papers report them (torch-fidelity's Inception, ADM reference stats).",
    no_args_is_help=True,
)

_DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WEIGHTS_HELP = (f"torch-fidelity's {WEIGHTS_FILENAME} (offline clusters). Default: ${WEIGHTS_ENV}, else torch-fidelity's "
                 "cache ($TORCH_HOME/hub/checkpoints/), else downloaded there.")


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console)


def _context(device: str) -> Context:
    try:
        torch.device(device)
    except RuntimeError:
        raise UCGMError(f"--device: not a torch device: {device!r}") from None
    ctx = setup(device)
    if not ctx.distributed:
        return Context(device=torch.device(device))
    return ctx


@eval_app.command("fid")
@clean_errors
def fid_command(
    ref: Path = typer.Option(..., "--ref", help="Reference statistics: an .npz with mu/sigma (ADM VIRTUAL_imagenet256_labeled.npz, `ucgm eval ref` output), torch-fidelity's *-stat-fid-2048.pt, or EDM2's dataset-refs/*.pkl."),
    recipe: Optional[str] = FROM,
    checkpoint: Optional[str] = CHECKPOINT,
    family: Optional[str] = FAMILY,
    num_heads: Optional[int] = NUM_HEADS,
    encoder_depth: Optional[int] = ENCODER_DEPTH,
    resolution: Optional[int] = RESOLUTION,
    latent_stats: Optional[Path] = LATENT_STATS,
    vae: Optional[str] = VAE,
    steps: Optional[int] = STEPS,
    order: Optional[int] = ORDER,
    cfg: Optional[float] = CFG,
    cfg_interval: Optional[str] = CFG_INTERVAL,
    cfg_channels: Optional[str] = CFG_CHANNELS,
    extrapolation: Optional[float] = EXTRAPOLATION,
    stochasticity: Optional[str] = STOCHASTICITY,
    time_dist: Optional[str] = TIME_DIST,
    gaps: Optional[str] = GAPS,
    num: int = typer.Option(50000, "--num", min=1, help="Number of samples (papers: 50000). Sample i has class i % num_classes."),
    allow_unbalanced: bool = typer.Option(False, "--allow-unbalanced", help="Allow --num that is not a multiple of the number of classes."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per sampler batch within a chunk (fixed per --out: on GPUs the batch shape can change the last bits)."),
    chunk_size: int = typer.Option(250, "--chunk-size", min=1, help="Samples per chunk: the unit of work, of resumption and of one Inception forward (changing it changes the last bits; fixed per --out)."),
    seed: int = typer.Option(0, help="Seed; sample i depends only on (seed, i)."),
    out: Path = typer.Option(Path("eval"), help="Output folder: results.json, eval.json, features/ (resume by rerunning the same command)."),
    device: str = typer.Option(_DEFAULT_DEVICE, help="Torch device (under torchrun: cuda uses cuda:LOCAL_RANK)."),
    dtype: str = typer.Option("float32", help="Network precision: float32, bfloat16 or float16 (autocast). Inception always runs in float32."),
    save_images: bool = typer.Option(False, "--save-images", help="Also write OUT/images/XXXXXX.png (chunks then keep their images)."),
    save_npz: bool = typer.Option(False, "--save-npz", help="Also write OUT/samples.npz for the ADM evaluator (arr_0 uint8 NHWC, arr_1 labels)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) on this machine: relaunches under torchrun. Results do not depend on it."),
) -> None:
    """Sample NUM images with UCGM-S and report FID and Inception Score against --ref; writes OUT/results.json."""
    reference = load_reference(ref, FEATURE_DIM)  # bad input fails before anything slow
    chunk_ranges(num, chunk_size)
    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc))
    ctx = _context(device)
    try:
        _fid(ctx, reference, out, num, allow_unbalanced, chunk_size, seed, batch_size, dtype, save_images, save_npz,
             inception_weights, recipe, checkpoint, family, vae,
             arch_overrides(num_heads, encoder_depth, resolution, latent_stats),
             dict(steps=steps, order=order, cfg=cfg, cfg_interval=cfg_interval, cfg_channels=cfg_channels,
                  extrapolation=extrapolation,
                  stochasticity=stochasticity, time_dist=time_dist, gaps=gaps))
    finally:
        teardown(ctx)


def _fid(ctx: Context, reference: Any, out: Path, num: int, allow_unbalanced: bool, chunk_size: int, seed: int,
         batch_size: int, dtype: str, save_images: bool, save_npz: bool, inception_weights: Path | None,
         recipe: str | None, checkpoint: str | None, family: str | None, vae: str | None,
         overrides: dict[str, Any], flags: dict[str, Any]) -> None:
    model, base, origin = resolve_model_and_settings(recipe, checkpoint, family, str(ctx.device), overrides)
    settings = effective_settings(base, checkpoint, **flags)
    class_labels(num, model.num_classes, allow_unbalanced)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UCGMError(f"--out {out}: cannot create folder ({err.strerror})") from None
    vae_module = load_model_vae(model, path=vae)
    inception = load_inception(inception_weights, ctx.device)
    model_hash = state_sha256(model)
    vae_hash = state_sha256(vae_module)
    vers = versions()
    fingerprint = {
        "model_state_sha256": model_hash, "vae_state_sha256": vae_hash, "model_config": model.config,
        "settings": settings_record(settings), "dtype": dtype, "seed": seed, "num": num, "chunk_size": chunk_size,
        "batch_size": batch_size, "class_sampling": CLASS_SAMPLING,
        "inception_weights_sha256": inception.weights_sha256, "device_type": ctx.device.type,
        "versions": {k: vers[k] for k in ("ucgm-convert", "torch", "torch-fidelity")},
    }
    if ctx.is_main:
        console.print(settings_table(settings, origin, {
            "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})",
            "num / chunk / batch size / seed": f"{num} / {chunk_size} / {batch_size} / {seed}",
            "processes / device / dtype": f"{ctx.world_size} / {ctx.device} / {dtype}",
            "NFE per sample": settings.nfe_label,
            "reference": f"{reference.path} ({reference.format})",
        }))
    config = EvalConfig(out_dir=out, num=num, num_classes=model.num_classes, seed=seed, chunk_size=chunk_size,
                        allow_unbalanced=allow_unbalanced, save_images=save_images, save_npz=save_npz)
    generate = sampler(model, settings, seed, dtype, batch_size, vae_module)
    if ctx.is_main:
        with _progress() as progress:
            task = progress.add_task("sampling + Inception", total=num, rate="")
            start: list[int] = []  # samples already done when this run started

            def on_progress(done: int, total: int) -> None:
                if not start:
                    start.append(done)
                elapsed = progress.tasks[task].elapsed or 1e-9
                progress.update(task, completed=done, rate=f"{(done - start[0]) / elapsed:.1f} samples/s")

            store = compute_chunks(config, fingerprint, generate, inception, ctx, reference, on_progress)
    else:
        compute_chunks(config, fingerprint, generate, inception, ctx, reference)
        return
    record = {
        "seed": seed,
        "sampling": {"settings": settings_record(settings), "origin": origin, "dtype": dtype,
                     "nfe_per_sample": settings.nfe_label},
        "model": {"checkpoint": checkpoint, "recipe": recipe, "family": model.family, "arch": model.cfg.arch,
                  "transport": model.transport.name, "state_sha256": model_hash, "overrides": overrides,
                  "config": model.config},
        "vae": {"name": model.cfg.vae.get("name"), "weights": vae or model.cfg.vae.get("source")
                or ("stored with the model" if model.vae_state else None), "state_sha256": vae_hash},
        "evaluator": inception.describe(),
        "batch_size": batch_size,
        "num_processes": ctx.world_size,
        "device": str(ctx.device),
    }
    results = finalize(config, store, reference, record)
    table = Table(title="Evaluation", show_header=False)
    table.add_row("FID", f"{results['fid']:.4f}")
    score = results["inception_score"]
    if score["mean"] is not None:
        table.add_row("Inception Score", f"{score['mean']:.3f} ± {score['std']:.3f}")
    table.add_row("samples", f"{results['num_samples']} ({results['class_sampling']['rule']})")
    table.add_row("reference", f"{reference.path} (sha256 {reference.sha256[:12]}…)")
    console.print(table)
    console.print(f"wrote {out / RESULTS_NAME}")


@eval_app.command("ref")
@clean_errors
def ref_command(
    source: Path = typer.Argument(..., help="A folder of images (searched recursively; all at the evaluation resolution) or an .npz sample batch (arr_0 uint8 NHWC)."),
    out: Path = typer.Option(..., "--out", help="Output .npz: mu, sigma (float64, 2048-d) plus num_images, resolution, evaluator."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per Inception forward."),
    device: str = typer.Option(_DEFAULT_DEVICE, help="Torch device."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_WEIGHTS_HELP),
) -> None:
    """Build reference statistics (mu, sigma of Inception pool3 features) from images; images are not resized."""
    if not source.exists():
        raise UCGMError(f"{source}: no such folder or file")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise UCGMError(f"--device: not a torch device: {device!r}") from None
    inception = load_inception(inception_weights, torch_device)
    with _progress() as progress:
        task = progress.add_task("Inception features", total=None, rate="")
        mu, sigma, meta = reference_from_images(source, inception, batch_size,
                                                lambda n: progress.update(task, completed=n))
    save_reference(out, mu, sigma, **meta)
    console.print(f"wrote {out}: {meta['num_images']} images at {meta['resolution'][0]}x{meta['resolution'][1]}")
