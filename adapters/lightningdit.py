"""LightningDiT (hustvl/LightningDiT): torch checkpoints of train.py, or a bare state dict.

Files: a torch zip `{"model", "ema", "opt", "config"}` (train.py; config.model.model_type names the
model) or a bare DiT-style state dict (`x_embedder.*`, `pos_embed`, `blocks.N.*`, `final_layer.*`), or a
folder (Hub snapshot) holding one such file. Sampling uses `ema` when present, else the whole file.

Every switch of the architecture (RMSNorm, SwiGLU, RoPE, q/k norm, adaLN without shift, learn_sigma)
is read from the keys and shapes. Transport: upstream's Linear path x_t = t x + (1 - t) z with velocity
target x - z, i.e. ReLinear exactly (t = 0 noise, t = 1 data; no time or sign change).
Latents: m = (z - mean) / std with the VA-VAE's `latents_stats.pt` {"mean", "std"} (1, C, 1, 1).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ucgm_convert.adapters.common import (
    channel_stats,
    checkpoint_to_load,
    dit_config,
    dit_geometry,
    find_checkpoint,
    frozen_model,
    given_overrides,
    label_classes,
    meta_network,
    probe_torch,
    require_keys,
    shape_error,
    size_table_heads,
)
from ucgm_convert.adapters.family import IMAGENET, PASS_HEADS, PASS_STATS, Family, License
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.torch_files import read_torch, tensor_dict
from ucgm_convert.model import GenerativeModel
from ucgm_convert.nets.lightningdit import LightningDiT

NAME = "lightningdit"
ARCH = "lightningdit"
OVERRIDES = ("num_heads", "latent_stats")
STATS_NAME = "latents_stats.pt"  # next to the VA-VAE on the Hub (hustvl/vavae-imagenet256-f16d32-dinov2)
GUIDED_CHANNELS = 3  # upstream forward_with_cfg guides model_out[:, :3] only
# Keys every LightningDiT has, and keys only LightningDiT's extra parts have (SiT/DiT lack them).
CORE_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
             "blocks.0.attn.qkv.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight")
FEATURE_KEYS = ("feat_rope.freqs_cos", "blocks.0.norm1.weight", "blocks.0.mlp.w12.weight",
                "final_layer.norm_final.weight")
MODEL = "a LightningDiT"  # completes the shape errors' "expected ... for"
Stats = list[float] | float  # per-channel values, or one value for all channels


def _weights(obj: Any) -> Mapping[str, Any] | None:
    """The sampling weights: `ema` of a train.py file, else the file itself (None if neither fits)."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("ema", obj)
    return state if isinstance(state, Mapping) else None


def _named_lightningdit(obj: Any) -> bool:
    """True when a train.py container's `config` names a LightningDiT model."""
    config = obj.get("config") if isinstance(obj, Mapping) else None
    model = config.get("model") if isinstance(config, Mapping) else None
    model_type = model.get("model_type") if isinstance(model, Mapping) else None
    return isinstance(model_type, str) and model_type.startswith("LightningDiT")


def _is_lightningdit(path: Path) -> bool:
    """A torch file with DiT core keys plus a LightningDiT-only part (or a train.py config naming it)."""
    obj = probe_torch(path, zip_only=True)
    state = _weights(obj)
    if state is None or not all(isinstance(state.get(k), Tensor) for k in CORE_KEYS):
        return False
    hidden = state["x_embedder.proj.weight"].shape[0]
    wo_shift = state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden
    return wo_shift or any(k in state for k in FEATURE_KEYS) or _named_lightningdit(obj)


def detect(path: Path) -> bool:
    """True for a LightningDiT checkpoint file, or a folder (a Hub snapshot) holding exactly one."""
    return find_checkpoint(Path(path), _is_lightningdit, "LightningDiT") is not None


_shape_error = functools.partial(shape_error, model=MODEL)


def _num_heads(path: Path, state: Mapping[str, Tensor], hidden: int, requested: int | None) -> int:
    """Heads from the head size the RoPE table or q/k norm stores, else the request, else the size table."""
    head_dim = None
    if "feat_rope.freqs_cos" in state:
        head_dim = state["feat_rope.freqs_cos"].shape[1]
    elif "blocks.0.attn.q_norm.weight" in state:
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    if head_dim is not None:
        if hidden % head_dim:
            raise UCGMError(f"{path}: head size {head_dim} (from the RoPE / q-k norm tensors) does not divide "
                            f"the hidden size {hidden}")
        if requested is not None and requested != hidden // head_dim:
            raise UCGMError(f"{path}: num_heads={requested} contradicts the checkpoint, whose head size "
                            f"{head_dim} means {hidden // head_dim} heads")
        return hidden // head_dim
    if requested is not None:
        return int(requested)
    heads = size_table_heads(hidden)
    if heads is None:
        raise UCGMError(f"{path}: cannot tell the number of heads of a hidden size {hidden} without RoPE or "
                        "q/k norm; " + PASS_HEADS)
    return heads


def arch_kwargs(path: Path, state: Mapping[str, Tensor], num_heads: int | None) -> dict[str, Any]:
    """Constructor arguments of LightningDiT, all read from tensor shapes and key presence."""
    geometry = dit_geometry(path, state, MODEL)
    hidden, channels, patch = geometry["hidden_size"], geometry["in_channels"], geometry["patch_size"]
    grid = geometry["input_size"] // patch
    if "feat_rope.freqs_cos" in state:
        rope = state["feat_rope.freqs_cos"]
        if rope.ndim != 2 or rope.shape[0] != grid * grid:
            raise _shape_error(path, "feat_rope.freqs_cos", rope,
                               f"[{grid * grid}, head_dim]: one row per token of the {grid}x{grid} latent grid "
                               "that pos_embed implies")
    modulation = state["blocks.0.adaLN_modulation.1.weight"]
    if modulation.shape[0] not in (4 * hidden, 6 * hidden):
        raise _shape_error(path, "blocks.0.adaLN_modulation.1.weight", modulation,
                           f"[{6 * hidden} or {4 * hidden} (without shift), {hidden}]")
    final = state["final_layer.linear.weight"]
    if final.shape[0] not in (patch * patch * channels, 2 * patch * patch * channels):
        raise _shape_error(path, "final_layer.linear.weight", final,
                           f"[{patch * patch * channels} (or twice that with learn_sigma), {hidden}]")
    classes = label_classes(path, state, MODEL)
    swiglu = "blocks.0.mlp.w12.weight" in state
    mlp_key = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if mlp_key not in state:
        raise UCGMError(f"{path}: no MLP weights: expected blocks.0.mlp.w12.weight (SwiGLU) or "
                        "blocks.0.mlp.fc1.weight (GELU MLP)")
    return {
        **geometry,
        "num_heads": _num_heads(path, state, hidden, num_heads),
        "mlp_hidden": state[mlp_key].shape[0] // (2 if swiglu else 1),
        "num_classes": classes,
        "use_qknorm": "blocks.0.attn.q_norm.weight" in state,
        "use_swiglu": swiglu,
        "use_rope": "feat_rope.freqs_cos" in state,
        "use_rmsnorm": "blocks.0.norm1.weight" in state,
        "wo_shift": modulation.shape[0] == 4 * hidden,
        "learn_sigma": final.shape[0] == 2 * patch * patch * channels,
    }


def _latent_stats(path: Path, stats: str | Path | None, channels: int) -> tuple[Stats, Stats]:
    """(mean, std) per channel from `stats` or a latents_stats.pt beside `path`; (0, 1) with a warning."""
    stats_path = Path(stats).expanduser() if stats is not None else path.parent / STATS_NAME
    if stats is None and not stats_path.is_file():
        warnings.warn(
            f"{path}: no latent statistics found (no {STATS_NAME} next to the checkpoint, no {PASS_STATS}); "
            "storing mean 0 / std 1. Samples will NOT decode correctly with the VA-VAE: pass "
            f"{PASS_STATS} to the {STATS_NAME} of hustvl/vavae-imagenet256-f16d32-dinov2.",
            UserWarning, stacklevel=3)
        return 0.0, 1.0
    values = channel_stats(stats_path, ("mean", "std"), channels, "latent statistics")
    mean, std = values["mean"].tolist(), values["std"].tolist()
    if min(std) <= 0:
        raise UCGMError(f"{stats_path}: latent std must be positive, got min {min(std)}")
    return mean, std


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load the EMA LightningDiT of `path` (or of the one in a folder) as a ReLinear model guided on 3 channels."""
    path = Path(path)
    overrides = given_overrides(path, overrides, OVERRIDES, "LightningDiT")
    path = checkpoint_to_load(path, _is_lightningdit, "LightningDiT")
    obj = read_torch(path)
    weights = _weights(obj)
    state = tensor_dict(weights, str(path) + (" ['ema']" if weights is not obj else ""))
    require_keys(state, CORE_KEYS, str(path), "LightningDiT state dict")
    kwargs = arch_kwargs(path, state, overrides.get("num_heads"))
    net = meta_network(LightningDiT, kwargs, state, str(path))
    channels, side = kwargs["in_channels"], kwargs["input_size"]
    mean, std = _latent_stats(path, overrides.get("latent_stats"), channels)
    vae = {"name": "ldm-f16d32", "source": None, "latent_mean": mean, "latent_std": std, "pixel_range": "-1,1"}
    config = dit_config(NAME, ARCH, kwargs, "ReLinear", side, vae, "lightningdit",
                        guidance_channels=GUIDED_CHANNELS if channels > GUIDED_CHANNELS else None)
    return frozen_model(net, config, device, dtype)


FAMILY = Family(
    name=NAME,
    title="LightningDiT",
    detect=detect,
    load=load,
    license=License("mit", "LightningDiT (hustvl/LightningDiT, LICENSE @2725fed) is released under the MIT license."),
    dataset=IMAGENET,
    default_recipe="lightningdit",
    overrides=OVERRIDES,
    vae_defaults={"name": "ldm-f16d32", "pixel_range": "-1,1"},
    latent_stats_in_checkpoint=True,
    guidance_channels=GUIDED_CHANNELS,
)
