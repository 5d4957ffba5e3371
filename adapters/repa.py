"""REPA (sihyun-yu/REPA): SiT checkpoints of train.py, or the released bare EMA state dict.

Files: a torch zip, train.py's container {"model", "ema", "opt", "args", "steps"} (`args` an argparse
Namespace: model "SiT-XL/2", enc_type, encoder_depth, path_type, prediction, ...), or the released
`last.pt`: the EMA SiT state dict itself. Sampling uses `ema` (generate.py). Every file carries the
REPA projection MLPs `projectors.N.*` (alignment loss only): they are dropped, with a note saying so.
Older files ("legacy", utils.load_legacy_checkpoints) store the blocks after the projector's depth as
`decoder_blocks.N`: they become blocks.(N + encoder blocks).

Transport: path_type "linear", x_t = (1 - t) x + t eps with velocity target eps - x (loss.py; samplers.py
integrates t from 1 to 0), i.e. Linear exactly, t fed raw. Latents: SD-VAE ft-EMA (generate.py default
--vae ema), z = m / 0.18215 (latents_scale 0.18215, latents_bias 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ucgm_convert.adapters.common import (
    SD_VAE_DEFAULTS,
    block_count,
    dit_style_model,
    dit_style_state,
    drop_training_only,
    given_overrides,
    probe_torch,
    require_null_class,
    require_released_path,
    sampling_weights,
    saved_args,
)
from ucgm_convert.adapters.family import IMAGENET, Family, License
from ucgm_convert.console import note
from ucgm_convert.formats.torch_files import read_torch, tensor_dict
from ucgm_convert.model import GenerativeModel

NAME = "repa"
OVERRIDES = ("num_heads",)
TRAINING_ONLY = {"projectors.": "REPA projection MLPs, used by the alignment loss only"}
_LEGACY_BLOCK = re.compile(r"^decoder_blocks\.(\d+)\.(.*)$")
MODEL = "a REPA SiT"  # completes the shape errors' "expected ... for"


def _legacy_renamed(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`decoder_blocks.N.*` -> `blocks.(N + encoder blocks).*` (utils.load_legacy_checkpoints); others as-is."""
    offset = block_count(state)
    renamed = {}
    for key, value in state.items():
        match = _LEGACY_BLOCK.match(key)
        renamed[f"blocks.{int(match.group(1)) + offset}.{match.group(2)}" if match else key] = value
    return renamed


def _weights(obj: Any) -> Mapping[str, Any] | None:
    """The DiT-style sampling weights of a REPA file, legacy block names renamed (None if not DiT-shaped)."""
    state, _ = sampling_weights(obj)
    if isinstance(state, Mapping) and any(isinstance(k, str) and k.startswith("decoder_blocks.") for k in state):
        state = _legacy_renamed(state)
    return dit_style_state(state)


def detect(path: Path) -> bool:
    """A SiT with `projectors.*` and no REPA-E latent BatchNorm (`bn.*`) or REPA-E `args.vae`."""
    obj = probe_torch(path)
    state = _weights(obj)
    if state is None or "projectors.0.0.weight" not in state or any(k.startswith("bn.") for k in state):
        return False
    args = saved_args(obj)
    return args is None or not hasattr(args, "vae")  # REPA-E's train_ldm_only.py args name its VAE


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load the EMA SiT of a REPA file as a Linear model on SD-VAE latents (projector weights dropped)."""
    path = Path(path)
    overrides = given_overrides(path, overrides, OVERRIDES, "REPA")
    obj = read_torch(path)
    weights, where = sampling_weights(obj)
    state = tensor_dict(weights, str(path) + where)
    if any(k.startswith("decoder_blocks.") for k in state):
        state = _legacy_renamed(state)
    args = saved_args(obj)
    require_released_path(path, args, "linear", "v", "REPA")  # a Linear model only with these
    require_null_class(path, args)
    state, dropped = drop_training_only(path, state, TRAINING_ONLY)
    model = dit_style_model(path, state, args, where, family=NAME, model=MODEL, transport="Linear", recipe="repa",
                            num_heads=overrides.get("num_heads"), learn_sigma=False, device=device, dtype=dtype)
    if dropped:
        note(dropped)
    return model


FAMILY = Family(
    name=NAME,
    title="REPA",
    detect=detect,
    load=load,
    license=License("mit", "REPA (sihyun-yu/REPA, LICENSE @67f7145) is released under the MIT license."),
    dataset=IMAGENET,
    default_recipe="repa",
    overrides=OVERRIDES,
    vae_defaults=SD_VAE_DEFAULTS,
)
