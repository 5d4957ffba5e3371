"""`ucgm sample`: UCGM-S sampling of any loaded model to an .npz and a PNG grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import UCGMError
from ..generate import balanced_labels, batches, generate_batch
from ..images import save_grid, save_npz
from ..loading import load
from ..model import GenerativeModel
from ..vae import load_model_vae
from ..recipe import Recipe, SamplingSettings, apply_overrides, load_recipe
from .common import clean_errors, console, parse_classes
from .convert import ENCODER_DEPTH, LATENT_STATS, NUM_HEADS, RESOLUTION, arch_overrides

DEFAULT_RECIPE = "demo"

# Options shared with `ucgm eval fid` (every sampling flag of `ucgm sample`).
FROM = typer.Option(None, "--from", help="Recipe name (see `ucgm recipes list`). Default: demo, unless --checkpoint stores its own settings.")
CHECKPOINT = typer.Option(None, "--checkpoint", help="Checkpoint file, folder, or Hub repo id. Default: the recipe's.")
FAMILY = typer.Option(None, "--family", help="Source family; detected from the file's contents when omitted.")
VAE = typer.Option(None, "--vae", help="VAE weights: file (.pt/.ckpt/.safetensors), diffusers folder or Hub repo id. Default: the VAE stored with the model, else the one its config names.")
STEPS = typer.Option(None, help="Sampling steps. Default: the recipe's.")
ORDER = typer.Option(None, help="Solver order, 1 or 2. Default: the recipe's.")
CFG = typer.Option(None, "--cfg", help="Classifier-free guidance scale; 1.0 = off. Default: the recipe's.")
CFG_INTERVAL = typer.Option(None, "--cfg-interval", help="'lo,hi': times (model convention, 0..1) where guidance applies.")
CFG_CHANNELS = typer.Option(None, "--cfg-channels", help="'model': the channels the family's published guidance touches (LightningDiT: the first 3); 'all': every channel. Default: the recipe's (model).")
EXTRAPOLATION = typer.Option(None, help="Extrapolation ratio lambda (>= 0). Default: the recipe's.")
STOCHASTICITY = typer.Option(None, help="Stochasticity rho in [0, 1] or 'auto'. Default: the recipe's.")
TIME_DIST = typer.Option(None, "--time-dist", help="'a,b,c' Kumaraswamy warp of the time grid.")
GAPS = typer.Option(None, help="'start,end' gaps of the time grid (each >= 0).")


def resolve_model_and_settings(
    recipe_name: str | None, checkpoint: str | None, family: str | None, device: str,
    overrides: dict[str, Any] | None = None,
) -> tuple[GenerativeModel, SamplingSettings | None, str]:
    """Load the model (with `uc.load` architecture `overrides`) and pick base sampling settings:
    --from recipe, else the checkpoint's own."""
    recipe: Recipe | None = None
    if recipe_name is not None or checkpoint is None:
        recipe = load_recipe(recipe_name or DEFAULT_RECIPE)
    source = checkpoint or (recipe.checkpoint if recipe else None)
    if source is None:
        raise UCGMError(f"recipe {recipe.name!r} has no default checkpoint: pass --checkpoint FILE")  # type: ignore[union-attr]
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise UCGMError(f"--device: not a torch device: {device!r}") from None
    given = recipe.load_overrides(overrides) if recipe is not None else (overrides or {})
    model = load(source, family=family, device=torch_device, **given)
    if recipe is not None:
        return model, recipe.sampling, f"recipe {recipe.name}"
    if model.cfg.sampling:
        try:
            return model, SamplingSettings(**model.cfg.sampling), f"{source} config.json"
        except (TypeError, ValueError) as err:
            raise UCGMError(f"{source}: config.json sampling: {err}") from None
    return model, None, "built-in defaults"


def settings_table(settings: SamplingSettings, origin: str, extra: dict[str, object]) -> Table:
    """A two-column table of the effective settings."""
    table = Table(title=f"Effective settings (base: {origin}; flags override)", show_header=False)
    for field in dataclasses.fields(settings):
        table.add_row(field.name, str(getattr(settings, field.name)))
    for key, value in extra.items():
        table.add_row(key, str(value))
    return table


@clean_errors
def sample_command(
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
    classes: Optional[str] = typer.Option(None, help="Comma-separated class ids, cycled over the samples. Default: all classes."),
    num: int = typer.Option(16, min=1, help="Number of samples."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Samples per batch (does not change any image)."),
    seed: int = typer.Option(0, help="Seed; sample i depends only on (seed, i)."),
    out: Path = typer.Option(Path("samples"), help="Output folder for samples.npz and grid.png."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Torch device."),
    dtype: str = typer.Option("float32", help="Network precision: float32, bfloat16 or float16 (autocast)."),
) -> None:
    """Sample a model with UCGM-S and write OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels) and OUT/grid.png."""
    model, base, origin = resolve_model_and_settings(
        recipe, checkpoint, family, device, arch_overrides(num_heads, encoder_depth, resolution, latent_stats))
    settings = effective_settings(base, checkpoint, steps=steps, order=order, cfg=cfg, cfg_interval=cfg_interval,
                                  cfg_channels=cfg_channels, extrapolation=extrapolation,
                                  stochasticity=stochasticity, time_dist=time_dist,
                                  gaps=gaps)
    class_ids = parse_classes(classes, model.num_classes)
    labels = balanced_labels(num, class_ids)
    console.print(settings_table(settings, origin, {
        "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})",
        "num / batch size / seed": f"{num} / {batch_size} / {seed}",
        "device / dtype": f"{device} / {dtype}",
        "NFE per sample": settings.nfe_label,
    }))
    try:
        vae_module = load_model_vae(model, path=vae)
    except UCGMError as err:
        raise UCGMError(f"{vae or checkpoint or recipe or DEFAULT_RECIPE}: {err}") from None
    batches_out: list[np.ndarray] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("sampling", total=num, rate="")
        for index_range in batches(num, batch_size):
            def on_step(i: int, _: torch.Tensor, start: int = index_range.start) -> None:
                progress.update(task, description=f"sampling (batch at {start}, step {i + 1})")
            _, images = generate_batch(model, settings, [labels[i] for i in index_range], index_range, seed,
                                       dtype, on_step, vae_module)
            batches_out.append(images.numpy())
            done = progress.tasks[task].completed + len(index_range)
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, completed=done, rate=f"{done / elapsed:.1f} samples/s")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UCGMError(f"--out {out}: cannot create folder ({err.strerror})") from None
    all_images = np.concatenate(batches_out)
    save_npz(out / "samples.npz", all_images, np.asarray(labels, dtype=np.int64))
    save_grid(out / "grid.png", all_images)
    console.print(f"wrote {out / 'samples.npz'} and {out / 'grid.png'}")


def effective_settings(
    base: SamplingSettings | None, checkpoint: str | None, *, steps: int | None, order: int | None,
    cfg: float | None, cfg_interval: str | None, cfg_channels: str | None, extrapolation: float | None,
    stochasticity: str | None, time_dist: str | None, gaps: str | None,
) -> SamplingSettings:
    """The base settings (recipe / checkpoint / none) with the sampling flags applied (shared with `ucgm eval fid`)."""
    if base is None:
        if steps is None:
            raise UCGMError(f"{checkpoint}: stores no sampling defaults; pass --from RECIPE or --steps")
        base = SamplingSettings(steps=steps)
    return apply_overrides(
        base,
        steps=steps,
        order=order,
        cfg_scale=cfg,
        cfg_interval=cfg_interval,
        cfg_channels=cfg_channels,
        extrapolation=extrapolation,
        stochasticity=_parse_stochasticity(stochasticity),
        time_dist=time_dist,
        gaps=gaps,
        flag_names={"cfg_scale": "--cfg"},
    )


def _parse_stochasticity(text: str | None) -> float | str | None:
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UCGMError(f"--stochasticity: expected a number in [0, 1] or 'auto', got {text!r}") from None
