"""SiT (willisma/SiT): the released SiT-XL/2 256x256 state dict, or a train.py checkpoint.

Files: a torch zip, the released `SiT-XL-2-256.pt` (a bare EMA state dict with DiT's keys), or
train.py's container {"model", "ema", "opt", "args"} (`args.model` "SiT-XL/2", path_type, prediction).
Sampling uses `ema` (download.find_model). The released 256x256 model has a learned sigma
(sample.py: learn_sigma = image_size == 256): the final layer has 2C outputs and SiT's forward keeps
the first C (the velocity), as ours does. DiT files have the same keys and shapes: a bare file is told
apart by its name (SiT*), else `--family sit` / `--family dit` decides.

Transport: path_type "Linear", prediction "velocity": x_t = t x + (1 - t) eps (t = 0 noise, t = 1 data;
transport/path.py ICPlan) with target x - eps, i.e. our ReLinear exactly, t fed raw. Latents:
SD-VAE ft-EMA (sample_ddp.py default --vae ema), z = m / 0.18215.
Guidance: upstream's forward_with_cfg guides the first 3 latent channels only (guidance_channels 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ucgm_convert.adapters.common import DIT_GUIDED_CHANNELS, SD_VAE_DEFAULTS, is_plain_dit, load_plain_dit
from ucgm_convert.adapters.family import IMAGENET, Family, License
from ucgm_convert.model import GenerativeModel

NAME = "sit"
OVERRIDES = ("num_heads",)
MODEL = "a SiT"  # completes the shape errors' "expected ... for"


def detect(path: Path) -> bool:
    """A plain DiT-style file that args.model or its name says is a SiT (or that nothing says is a DiT)."""
    return is_plain_dit(path, "SiT")


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load the EMA SiT as a ReLinear model on SD-VAE latents (a learned sigma's channels dropped); a train.py
    container of another path_type / prediction (GVP / VP, score / noise: other transports) is refused."""
    return load_plain_dit(path, overrides, OVERRIDES, kind="SiT", family=NAME, model=MODEL, transport="ReLinear",
                          recipe="sit", released_path=("Linear", "velocity"), device=device, dtype=dtype)


FAMILY = Family(
    name=NAME,
    title="SiT",
    detect=detect,
    load=load,
    license=License("mit", "SiT (willisma/SiT, LICENSE.txt @947f95b) is released under the MIT license."),
    dataset=IMAGENET,
    default_recipe="sit",
    overrides=OVERRIDES,
    vae_defaults=SD_VAE_DEFAULTS,
    guidance_channels=DIT_GUIDED_CHANNELS,
    confusable_with=("dit",),
)
