"""DiT (facebookresearch/DiT): the released DiT-XL/2 256x256 / 512x512 state dicts, or a train.py checkpoint.

Files: a torch zip, the released `DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt` (bare EMA state dicts), or
train.py's container {"model", "ema", "opt", "args"} (`args.model` "DiT-XL/2", image_size). Sampling uses
`ema` (download.find_model). The network is SiT's (same keys, shapes and forward; DiT was first): it
outputs 2C channels, epsilon and the learned variance interpolation; the variance half is dropped (UCGM
samples deterministically from the epsilon prediction). SiT files have the same keys and shapes: a bare
file is told apart by its name (DiT*), else `--family dit` / `--family sit` decides.

Transport: DDPM's discrete VP schedule, betas linear in [1e-4, 0.02] over 1000 steps, x_t =
sqrt(abar_i) x + sqrt(1 - abar_i) eps with target eps (diffusion/gaussian_diffusion.py): the DiscreteVP
transport: DiT's timestep k sits at t = (k + 1) / 1000 (t = 0 clean data), and the network receives
DiscreteVP.network_time(t) = clamp(1000 t - 1, 0, 999), DiT's own timestep input.
Latents: SD-VAE ft-EMA (sample_ddp.py default --vae ema), z = m / 0.18215.
Guidance: upstream's forward_with_cfg guides the first 3 latent channels only (guidance_channels 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ucgm_convert.adapters.common import DIT_GUIDED_CHANNELS, SD_VAE_DEFAULTS, is_plain_dit, load_plain_dit
from ucgm_convert.adapters.family import IMAGENET, Family, License
from ucgm_convert.model import GenerativeModel

NAME = "dit"
OVERRIDES = ("num_heads",)
TRANSPORT = "DiscreteVP"
RECIPES = {256: "dit-256", 512: "dit-512"}  # image resolution (SD-VAE: 8 x the latent side) -> recipe
MODEL = "a DiT"  # completes the shape errors' "expected ... for"


def detect(path: Path) -> bool:
    """A plain DiT-style file that args.model or its name says is a DiT (or that nothing says is a SiT)."""
    return is_plain_dit(path, "DiT")


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load the EMA DiT as a DiscreteVP epsilon model on SD-VAE latents (the learned-sigma channels dropped)."""
    return load_plain_dit(path, overrides, OVERRIDES, kind="DiT", family=NAME, model=MODEL, transport=TRANSPORT,
                          recipe=RECIPES, released_path=None, device=device, dtype=dtype)


FAMILY = Family(
    name=NAME,
    title="DiT",
    detect=detect,
    load=load,
    license=License("cc-by-nc-4.0", "DiT (facebookresearch/DiT, LICENSE.txt @ed81ce2) is released under CC BY-NC "
                    "4.0: non-commercial use only."),
    dataset=IMAGENET,
    default_recipe="dit-256",
    overrides=OVERRIDES,
    vae_defaults=SD_VAE_DEFAULTS,
    guidance_channels=DIT_GUIDED_CHANNELS,
    confusable_with=("sit",),
)
