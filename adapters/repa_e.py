"""REPA-E (End2End-Diffusion/REPA-E): SiT checkpoints of train_repae.py, train_ldm_only.py, or a bare EMA state dict.

Files: a torch zip, end-to-end {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args",
"steps"} or LDM-only {"model", "ema", "opt", "args", "steps"} (`args` an argparse Namespace), or the bare EMA:
a SiT state dict (`x_embedder.*`, `pos_embed`, `blocks.N.*`) plus `bn.*` latent statistics and `projectors.*`.
Sampling uses `ema` (generate.py).

Transport: x_t = (1 - t) x + t eps with velocity target eps - x (samplers.py, SiT.interpolant
"linear"), i.e. Linear exactly. Latents: generate.py decodes z = m / latents_scale + latents_bias with
latents_scale = rsqrt(bn.running_var) (no BatchNorm eps) and latents_bias = bn.running_mean of the EMA
for end-to-end files, else the VAE's `<vae>-latents-stats.pt`; so mean = bias, std = 1 / scale.
End-to-end files carry the jointly tuned VAE (`vae`, latent-diffusion names): it becomes `vae_state`.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ucgm_convert.adapters.common import (
    DIT_CORE_KEYS,
    channel_stats,
    dit_config,
    dit_style_state,
    frozen_model,
    given_overrides,
    meta_network,
    probe_torch,
    require_keys,
    require_null_class,
    sampling_weights,
    saved_args,
    sit_arch_kwargs,
)
from ucgm_convert.adapters.family import IMAGENET, PASS_STATS, Family, License
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.torch_files import read_torch, tensor_dict
from ucgm_convert.model import GenerativeModel
from ucgm_convert.nets.sit import SiT
from ucgm_convert.vae import vae_only

NAME = "repa-e"
ARCH = "sit"
OVERRIDES = ("num_heads", "latent_stats")
STATS_SUFFIX = "-latents-stats.pt"  # save_vae_weights.py: <vae>.pt next to <vae>-latents-stats.pt
# Upstream SiT entries our SiT does not have: training-only parts, dropped from the network weights.
TRAINING_ONLY = {
    "projectors.": "REPA projection MLPs (alignment loss only)",
    "bn.running_mean": "latent mean, moved into the VAE spec",
    "bn.running_var": "latent variance, moved into the VAE spec",
    "bn.num_batches_tracked": "BatchNorm step counter",
}
VAE_NAMES = {"f8d4": "sd-vae", "f16d32": "ldm-f16d32"}  # args.vae -> our VAE spec name
MODEL = "a REPA-E SiT"  # completes the shape errors' "expected ... for"


def _training_only(key: str) -> bool:
    return key in TRAINING_ONLY or key.startswith("projectors.")


def _end_to_end(obj: Any) -> bool:
    """A train_repae.py container: the EMA SiT together with the jointly tuned VAE."""
    return isinstance(obj, Mapping) and "ema" in obj and "vae" in obj


def detect(path: Path) -> bool:
    """A plain SiT state dict (GELU MLP, 6-way adaLN) with REPA-E's `bn` / `projectors` or a SiT `args`."""
    obj = probe_torch(path)
    state = dit_style_state(obj)
    if state is None:
        return False
    model = getattr(saved_args(obj), "model", None)
    return "bn.running_var" in state or "projectors.0.0.weight" in state or (
        isinstance(model, str) and model.startswith("SiT-"))


def _arch_kwargs(path: Path, state: Mapping[str, Tensor], args: argparse.Namespace | None,
                 num_heads: int | None) -> dict[str, Any]:
    """Constructor arguments of our SiT, read from tensor shapes (heads from args / override / size table)."""
    require_null_class(path, args)
    return sit_arch_kwargs(path, state, getattr(args, "model", None), num_heads, MODEL)


def _stats_file(stats_path: Path, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) = (latents_bias, 1 / latents_scale) of a `<vae>-latents-stats.pt`."""
    values = channel_stats(stats_path, ("latents_bias", "latents_scale"), channels, "REPA-E latent statistics")
    if (values["latents_scale"] <= 0).any():
        raise UCGMError(f"{stats_path}: latents_scale must be positive")
    return values["latents_bias"].tolist(), (1 / values["latents_scale"]).tolist()


def _bn_stats(path: Path, state: Mapping[str, Tensor], channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) = (bn.running_mean, 1 / rsqrt(bn.running_var)) of the EMA, as generate.py decodes."""
    for key in ("bn.running_mean", "bn.running_var"):
        if key not in state or state[key].numel() != channels:
            raise UCGMError(f"{path}: expected the latent statistics {key} with {channels} values in the EMA weights; "
                            f"found {list(state[key].shape) if key in state else 'none'}")
    var = state["bn.running_var"].double()
    if (var <= 0).any():
        raise UCGMError(f"{path}: bn.running_var must be positive")
    return state["bn.running_mean"].double().tolist(), var.sqrt().tolist()


def _stats_beside(path: Path, args: argparse.Namespace | None) -> Path | None:
    """The `<vae>-latents-stats.pt` next to `path`: the one args.vae_ckpt names, else the only one there."""
    vae_ckpt = getattr(args, "vae_ckpt", None)
    if isinstance(vae_ckpt, str) and vae_ckpt.endswith(".pt"):
        named = path.parent / (Path(vae_ckpt).name[: -len(".pt")] + STATS_SUFFIX)
        if named.is_file():
            return named
    found = sorted(path.parent.glob(f"*{STATS_SUFFIX}"))
    return found[0] if len(found) == 1 else None


def _latent_stats(path: Path, obj: Any, state: Mapping[str, Tensor], args: argparse.Namespace | None,
                  channels: int, requested: str | Path | None) -> tuple[list[float] | float, list[float] | float]:
    """The `latent_stats` file, else the EMA's bn (end-to-end), else a stats file beside `path`, else bn (warned)."""
    if requested is not None:
        return _stats_file(Path(requested).expanduser(), channels)
    if _end_to_end(obj):
        return _bn_stats(path, state, channels)
    beside = _stats_beside(path, args)
    if beside is not None:
        return _stats_file(beside, channels)
    if "bn.running_var" in state:
        warnings.warn(f"{path}: no *{STATS_SUFFIX} next to the checkpoint and no {PASS_STATS}; using the EMA's "
                      "bn running statistics, which REPA-E's generate.py uses only for end-to-end checkpoints: pass "
                      f"{PASS_STATS} to the VAE's {STATS_SUFFIX[1:]} to decode exactly as upstream",
                      UserWarning, stacklevel=3)
        return _bn_stats(path, state, channels)
    warnings.warn(f"{path}: no latent statistics (no bn.* weights, no *{STATS_SUFFIX} next to the checkpoint, no "
                  f"{PASS_STATS}); storing mean 0 / std 1, so samples will NOT decode correctly",
                  UserWarning, stacklevel=3)
    return 0.0, 1.0


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load the EMA SiT of `path` as a Linear model, with the checkpoint's tuned VAE when it has one."""
    path = Path(path)
    overrides = given_overrides(path, overrides, OVERRIDES, "REPA-E")
    obj = read_torch(path)
    weights, where = sampling_weights(obj)
    state = tensor_dict(weights, str(path) + where)
    require_keys(state, DIT_CORE_KEYS, f"{path}{where}", "REPA-E SiT state dict")
    args = saved_args(obj)
    kwargs = _arch_kwargs(path, state, args, overrides.get("num_heads"))
    net = meta_network(SiT, kwargs, {k: v for k, v in state.items() if not _training_only(k)}, str(path) + where)
    channels, side = kwargs["in_channels"], kwargs["input_size"]
    mean, std = _latent_stats(path, obj, state, args, channels, overrides.get("latent_stats"))
    vae_name = VAE_NAMES.get(getattr(args, "vae", None), "sd-vae" if channels == 4 else "ldm-f16d32")
    vae = {"name": vae_name, "source": None, "latent_mean": mean, "latent_std": std, "pixel_range": "-1,1"}
    config = dit_config(NAME, ARCH, kwargs, "Linear", side, vae, "repa-e")
    model = frozen_model(net, config, device, dtype)
    if _end_to_end(obj):
        model.vae_state = vae_only(tensor_dict(obj, str(path), "vae"), f"{path} ['vae']")
    return model


FAMILY = Family(
    name=NAME,
    title="REPA-E",
    detect=detect,
    load=load,
    license=License("mit", "REPA-E (End2End-Diffusion/REPA-E, LICENSE @3ad8046) is released under the MIT license."),
    dataset=IMAGENET,
    default_recipe="repa-e",
    overrides=OVERRIDES,
    vae_defaults={"name": "ldm-f16d32", "pixel_range": "-1,1"},
    latent_stats_in_checkpoint=True,
)
