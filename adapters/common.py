"""Pieces shared by the source-family adapters (installed as ucgm_convert.adapters.common).

Only logic that is the same in several adapters lives here; what a family's files look like,
and how its architecture and latents are read, stays in that family's module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.statedict import load_state_dict_strict
from ucgm_convert.formats.torch_files import read_torch
from ucgm_convert.model import GenerativeModel, ModelConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def given_overrides(path: Path, overrides: Mapping[str, Any], accepted: tuple[str, ...], family: str,
                    drop_none: bool = True) -> dict[str, Any]:
    """The overrides (None values dropped as "not given" unless `drop_none` is False); unknown names raise."""
    given = {k: v for k, v in overrides.items() if v is not None or not drop_none}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise UCGMError(f"{path}: unknown override(s) {', '.join(unknown)} for {family}; "
                        f"accepted: {', '.join(accepted)}")
    return given


def find_checkpoint(path: Path, accepts: Callable[[Path], bool], family: str,
                    suffixes: tuple[str, ...] | None = None) -> Path | None:
    """`path` if `accepts` it, or the one accepted file (with one of `suffixes`) directly inside a folder."""
    if not path.is_dir():
        return path if accepts(path) else None
    found = [f for f in sorted(path.iterdir()) if (suffixes is None or f.suffix in suffixes) and accepts(f)]
    if len(found) > 1:
        raise UCGMError(f"{path}: several {family} checkpoints ({', '.join(f.name for f in found)}); pass one file")
    return found[0] if found else None


def checkpoint_to_load(path: Path, accepts: Callable[[Path], bool], family: str,
                       suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` itself, or for a folder the one checkpoint `find_checkpoint` finds in it (else a UCGMError)."""
    if not path.is_dir():
        return path
    found = find_checkpoint(path, accepts, family, suffixes)
    if found is None:
        listed = f" ({', '.join(suffixes)})" if suffixes else ""
        raise UCGMError(f"{path}: no {family} checkpoint{listed} in this folder")
    return found


def shape_error(path: Path, key: str, tensor: Tensor, expected: str, model: str) -> UCGMError:
    """A UCGMError naming the file, the tensor, its shape and the shape `model` needs there."""
    return UCGMError(f"{path}: tensor {key} has shape {list(tensor.shape)}; expected {expected} for {model}")


def require_keys(state: Mapping[str, Any], keys: tuple[str, ...], where: str, what: str) -> None:
    """Raise a UCGMError listing the `keys` missing from `state` ("{where}: not a {what}; missing keys: ...")."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise UCGMError(f"{where}: not a {what}; missing keys: {', '.join(missing)}")


def dit_geometry(path: Path, state: Mapping[str, Tensor], model: str) -> dict[str, int]:
    """DiT sizes (input_size .. depth) from the conv `x_embedder.proj.weight`, square `pos_embed` and `blocks.N`."""
    proj = state["x_embedder.proj.weight"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise shape_error(path, "x_embedder.proj.weight", proj, "[hidden, channels, patch, patch]", model)
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    pos = state["pos_embed"]
    grid = math.isqrt(pos.shape[1]) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or grid * grid != pos.shape[1] or pos.shape[2] != hidden:
        raise shape_error(path, "pos_embed", pos, f"[1, side^2, {hidden}] (a square token grid)", model)
    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": channels,
        "hidden_size": hidden,
        "depth": block_count(state),
    }


def label_classes(path: Path, state: Mapping[str, Tensor], model: str) -> int:
    """num_classes of a DiT label table `y_embedder.embedding_table.weight`, whose last row is the null class."""
    table = state["y_embedder.embedding_table.weight"]
    if table.shape[0] < 2:
        raise shape_error(path, "y_embedder.embedding_table.weight", table, "[num_classes + 1 (null class), hidden]",
                          model)
    return table.shape[0] - 1


def block_count(state: Mapping[str, Any]) -> int:
    """1 + the largest N of the `blocks.N.*` keys (0 when there are none)."""
    return 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)


def size_table_heads(hidden: int) -> int | None:
    """Heads of upstream DiT/SiT sizes: 16 for XL (hidden 1152), else heads of 64; None if 64 does not divide."""
    if hidden == 1152:  # XL: 16 heads of 72 (upstream size table); every other size uses heads of 64
        return 16
    return None if hidden % 64 else hidden // 64


def channel_stats(stats_path: Path, keys: tuple[str, ...], channels: int, what: str) -> dict[str, Tensor]:
    """The per-channel float64 vectors `keys` of a latent statistics file, each with `channels` values."""
    obj = read_torch(stats_path)
    values = {}
    for key in keys:
        tensor = obj.get(key) if isinstance(obj, Mapping) else None
        if not isinstance(tensor, Tensor) or tensor.numel() != channels:
            raise UCGMError(f"{stats_path}: expected {what} {{{', '.join(map(repr, keys))}}} with {channels} "
                            f"values each (shape [1, {channels}, 1, 1]); {key!r} is "
                            f"{list(tensor.shape) if isinstance(tensor, Tensor) else 'missing'}")
        values[key] = tensor.double().flatten()
    return values


def meta_network(net_class: Callable[..., nn.Module], kwargs: Mapping[str, Any], state: Mapping[str, Tensor],
                 source: str) -> nn.Module:
    """`net_class(**kwargs)` built on the meta device, adopting `state` (strictly: every key and shape)."""
    with torch.device("meta"):
        net = net_class(**kwargs)
    load_state_dict_strict(net, state, source, assign=True)
    return net


def dit_config(family: str, arch: str, kwargs: dict[str, Any], transport: str, side: int, vae: dict[str, Any],
               recipe: str | None, guidance_channels: int | None = None) -> ModelConfig:
    """ModelConfig of a class-conditional DiT: (in_channels, side, side) latents, null class = the last label row."""
    return ModelConfig(
        family=family,
        arch=arch,
        arch_kwargs=kwargs,
        transport=transport,
        num_classes=kwargs["num_classes"],
        latent_shape=(kwargs["in_channels"], side, side),
        null_class=kwargs["num_classes"],
        guidance_channels=guidance_channels,
        vae=vae,
        recipe=recipe,
    )


def frozen_model(net: nn.Module, config: ModelConfig, device: torch.device | str,
                 dtype: torch.dtype | None) -> GenerativeModel:
    """The GenerativeModel of `net` and `config` on `device` (and `dtype`, None: as is), in eval mode, frozen."""
    return GenerativeModel(net, config).to(device=device, dtype=dtype).eval().requires_grad_(False)
