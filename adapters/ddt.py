"""DDT (MCG-NJU/DDT): PyTorch-Lightning checkpoints, sampled from the EMA copy `ema_denoiser.*`.

Files: a Lightning `.ckpt` (torch zip; MCG-NJU/DDT-XL-22en6de-R256 / -R512), or a folder holding one,
whose `state_dict` holds the online network (`denoiser.*`), its EMA (`ema_denoiser.*`) and the REPA
projector (`diffusion_trainer.*`), keys possibly with torch.compile's `_orig_mod.`; only the EMA is loaded.

DDT's convention is ours as ReLinear: x_t = t x + (1 - t) z (t=0 noise, t=1 data), F = x - z; guidance on
all channels. Latents are SD-VAE ft-EMA latents times 0.18215.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ucgm_convert.adapters.common import (
    SD_VAE,
    SD_VAE_DEFAULTS,
    block_count,
    checkpoint_to_load,
    dit_config,
    find_checkpoint,
    frozen_model,
    given_overrides,
    meta_network,
)
from ucgm_convert.adapters.family import IMAGENET, Family, License
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.torch_files import is_torch_zip, read_torch, strip_prefix
from ucgm_convert.model import GenerativeModel
from ucgm_convert.nets.ddt import DDT

NAME = "ddt"
ARCH = "ddt"
EMA_PREFIX = "ema_denoiser."
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper, stripped wherever it appears
SIGNATURE = "s_embedder.proj.weight"  # the encoder stream's patch embedding exists only in DDT
ACCEPTED_OVERRIDES = ("encoder_depth", "in_channels", "resolution")
PUBLISHED_SPLIT = (22, 6)  # DDT-XL/2 22en6de: encoder and decoder blocks
DEFAULT_CHANNELS = 4  # SD-VAE latents; C*p*p = 16 is also 16 channels with patch 1
DEFAULT_RESOLUTION = 256
VAE_DOWNSAMPLE = 8
RECIPES = {256: "ddt-256", 512: "ddt-512"}
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _state_dict(path: Path) -> Mapping[str, Any] | None:
    """The Lightning `state_dict` of `path`, or None when the file is not shaped like one."""
    obj = read_torch(path)
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    return state if isinstance(state, Mapping) else None


def _uncompiled(key: str) -> str:
    """`key` without torch.compile's `_orig_mod.` segments."""
    return key.replace(COMPILED_PREFIX, "")


def _is_ddt_file(path: Path) -> bool:
    """A torch file whose `state_dict` has DDT's EMA encoder embedding `ema_denoiser.s_embedder.*`."""
    if not is_torch_zip(path):
        return False
    state = _state_dict(path)
    return state is not None and any(_uncompiled(k) == EMA_PREFIX + SIGNATURE for k in state)


def detect(path: Path) -> bool:
    """True for a DDT Lightning checkpoint, or a folder (a Hub snapshot) holding exactly one."""
    return find_checkpoint(Path(path), _is_ddt_file, "DDT", CHECKPOINT_SUFFIXES) is not None


def default_encoder_depth(depth: int) -> int:
    """The published 22/6 split scaled to `depth`: round(depth * 22 / 28), kept in [1, depth - 1]."""
    encoder, decoder = PUBLISHED_SPLIT
    return min(max(round(depth * encoder / (encoder + decoder)), 1), max(depth - 1, 1))


def _ema_weights(path: Path) -> dict[str, Tensor]:
    """`ema_denoiser.*` of the Lightning checkpoint, prefixes (and `_orig_mod.`) removed."""
    state = _state_dict(path)
    if state is None:
        raise UCGMError(f"{path}: expected a PyTorch-Lightning checkpoint (a dict with 'state_dict')")
    weights = strip_prefix({_uncompiled(k): v for k, v in state.items()}, EMA_PREFIX)
    if not weights:
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        raise UCGMError(f"{path}: no '{EMA_PREFIX}*' weights in 'state_dict' (found prefixes: "
                        f"{', '.join(prefixes) or 'none'})")
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor)]
    if bad:
        raise UCGMError(f"{path}: 'state_dict' entries are not tensors: {', '.join(bad[:5])}")
    return weights


def _tensor(weights: Mapping[str, Tensor], key: str, ndim: int, path: Path) -> Tensor:
    """weights[key] with `ndim` dimensions, else an error naming the file and the tensor."""
    if key not in weights:
        raise UCGMError(f"{path}: missing tensor '{EMA_PREFIX}{key}' (not a DDT checkpoint?)")
    value = weights[key]
    if value.ndim != ndim:
        raise UCGMError(f"{path}: '{EMA_PREFIX}{key}' has shape {list(value.shape)}, expected {ndim} dimensions")
    return value


def _int_override(overrides: Mapping[str, Any], name: str, default: int, minimum: int, path: Path) -> int:
    """An integer override >= minimum, or `default` when not given."""
    value = overrides.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UCGMError(f"{path}: override {name}={value!r} must be an integer >= {minimum}")
    return value


def infer_arch(weights: Mapping[str, Tensor], path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """DDT constructor arguments from tensor shapes; encoder_depth and channels from overrides."""
    embed = _tensor(weights, "x_embedder.proj.weight", 2, path)
    hidden, patch_values = embed.shape
    channels = _int_override(overrides, "in_channels", DEFAULT_CHANNELS, 1, path)
    patch = math.isqrt(patch_values // channels)
    if patch * patch * channels != patch_values:
        raise UCGMError(f"{path}: '{EMA_PREFIX}x_embedder.proj.weight' has {patch_values} inputs per patch, "
                        f"not {channels} channels x p x p; pass in_channels")
    head_dim = _tensor(weights, "blocks.0.attn.q_norm.weight", 1, path).shape[0]
    if hidden % head_dim or head_dim % 4:
        raise UCGMError(f"{path}: '{EMA_PREFIX}blocks.0.attn.q_norm.weight' gives head_dim {head_dim}, which "
                        f"must divide hidden size {hidden} and be a multiple of 4")
    depth = block_count(weights)
    if not depth:
        raise UCGMError(f"{path}: no '{EMA_PREFIX}blocks.N.*' tensors (not a DDT checkpoint?)")
    encoder_depth = _int_override(overrides, "encoder_depth", default_encoder_depth(depth), 0, path)
    if encoder_depth > depth:
        raise UCGMError(f"{path}: override encoder_depth={encoder_depth} exceeds the {depth} blocks in the file")
    return {
        "in_channels": channels,
        "patch_size": patch,
        "hidden_size": hidden,
        "depth": depth,
        "encoder_depth": encoder_depth,
        "num_heads": hidden // head_dim,
        "mlp_hidden": _tensor(weights, "blocks.0.mlp.w1.weight", 2, path).shape[0],
        "num_classes": _tensor(weights, "y_embedder.embedding_table.weight", 2, path).shape[0] - 1,
    }


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """The EMA DDT of a Lightning checkpoint (or of the one in a folder) as a ReLinear model on SD-VAE latents."""
    path = Path(path)
    overrides = given_overrides(path, overrides, ACCEPTED_OVERRIDES, "DDT")
    path = checkpoint_to_load(path, _is_ddt_file, "DDT", CHECKPOINT_SUFFIXES)
    if not is_torch_zip(path):
        raise UCGMError(f"{path}: not a PyTorch zip checkpoint (truncated, or not a DDT Lightning .ckpt)")
    weights = _ema_weights(path)
    arch = infer_arch(weights, path, overrides)
    resolution = _int_override(overrides, "resolution", DEFAULT_RESOLUTION, 1, path)
    side = resolution // VAE_DOWNSAMPLE
    if resolution % VAE_DOWNSAMPLE or side % arch["patch_size"]:
        raise UCGMError(f"{path}: resolution {resolution} must be a multiple of "
                        f"{VAE_DOWNSAMPLE * arch['patch_size']} (VAE factor {VAE_DOWNSAMPLE} x patch)")
    net = meta_network(DDT, arch, weights, f"{path} ['state_dict', {EMA_PREFIX}*]")
    vae = dict(SD_VAE) if arch["in_channels"] == DEFAULT_CHANNELS else {"name": "identity"}
    config = dit_config(NAME, ARCH, arch, "ReLinear", side, vae, RECIPES.get(resolution))
    return frozen_model(net, config, device, dtype)


FAMILY = Family(
    name=NAME,
    title="DDT",
    detect=detect,
    load=load,
    license=License(
        "other",
        "The DDT repository (MCG-NJU/DDT @1d1b4d2) declares no license; the terms of the source weights are "
        "those of their original release. Check them before reuse, and pass --license to record them.",
        name="upstream-unspecified",
        link="https://github.com/MCG-NJU/DDT",
    ),
    dataset=IMAGENET,
    default_recipe=RECIPES[DEFAULT_RESOLUTION],
    overrides=ACCEPTED_OVERRIDES,
    vae_defaults=SD_VAE_DEFAULTS,
)
