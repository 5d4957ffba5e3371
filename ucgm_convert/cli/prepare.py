"""`ucgm prepare-data`: an image folder -> a prepared latent folder for `ucgm tune --data`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..distributed import launched_by_torchrun, relaunch_with_torchrun
from ..errors import UCGMError
from ..prepare_data import DEFAULT_SHARD_SIZE, DTYPES
from .common import console, fail


def prepare_command(
    images: Path = typer.Argument(..., help="Image folder: one sub-folder per class (ImageNet style; classes = "
                                  "sorted sub-folder names -> labels 0..K-1), or any folder with --labels."),
    out: Path = typer.Option(..., "--out", help="Output folder: shard-*.safetensors, meta.json, skipped.txt. "
                             "Rerunning into it resumes (finished shards are kept)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="'identity' (pixel-space models), a VAE file, a diffusers "
                                      "folder or a Hub repo id. With --from / --checkpoint: only the weights to "
                                      "load (the spec comes from them)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=1, help="Image side in pixels after the "
                                             "centre crop. Default: the recipe's (or the pixel model's size)."),
    recipe: Optional[str] = typer.Option(None, "--from", help="Recipe name or .yaml: its VAE, resolution and "
                                         "latent normalisation."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Model you will tune (file, folder or Hub "
                                             "id): the VAE spec and latent statistics from its config (and its "
                                             "stored VAE weights)."),
    family: Optional[str] = typer.Option(None, "--family", help="Source family of --checkpoint; detected when "
                                         "omitted."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file for a folder without class "
                                          "sub-folders: CSV rows 'file,label' or JSON {file: label}; file names "
                                          "relative to IMAGES."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Also store the horizontal mirror of every image "
                              "(doubles the samples)."),
    sample_posterior: bool = typer.Option(False, "--sample-posterior/--posterior-mean", help="Store a draw from the "
                                          "VAE posterior (seeded per shard) instead of its mean."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the posterior draws (--sample-posterior)."),
    shard_size: int = typer.Option(DEFAULT_SHARD_SIZE, "--shard-size", min=1, help="Source images per shard "
                                   "(images; x2 samples with --flip)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per VAE forward pass (images; does not "
                                   "change the result on CPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Threads decoding and cropping images "
                                          "(0 = in the main thread). Default: min(8, CPU cores)."),
    latent_mean: Optional[str] = typer.Option(None, "--latent-mean", help="Override the spec's latent mean: a number "
                                              "or one per channel, comma-separated (raw-latent units)."),
    latent_std: Optional[str] = typer.Option(None, "--latent-std", help="Override the spec's latent std: a number "
                                             "or one per channel, comma-separated (raw-latent units)."),
    pixel_range: Optional[str] = typer.Option(None, "--pixel-range", help="Override the VAE's input range: '-1,1' "
                                              "or '0,1'."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device of the VAE. Default: cuda (this "
                                         "process's GPU) if available, else cpu."),
    dtype: str = typer.Option("float32", "--dtype", help=f"VAE precision: {', '.join(DTYPES)} (latents are stored "
                              "as float32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-encode shards in --out that were made from other "
                                   "images or settings (otherwise that is an error)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) on this machine: relaunches under "
                              "torchrun; shards go round-robin to the processes. Ignored under torchrun."),
) -> None:
    """Encode an image folder with a VAE into latent shards (+ labels, statistics) for `ucgm tune --data OUT`."""
    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc))
    from ..prepare_data import prepare_data

    try:
        prepare_data(images, out, vae=vae, resolution=resolution, recipe=recipe, checkpoint=checkpoint,
                     family=family, labels=labels, flip=flip, sample_posterior=sample_posterior, seed=seed,
                     shard_size=shard_size, batch_size=batch_size, workers=workers, latent_mean=latent_mean,
                     latent_std=latent_std, pixel_range=pixel_range, device=device, dtype=dtype,
                     overwrite=overwrite, log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    except UCGMError as err:
        if os.environ.get("RANK", "0") != "0":  # rank 0 prints the message
            raise typer.Exit(2) from None
        fail(str(err))
