"""Pieces shared by the source-family adapters (installed as ucgm_convert.adapters.common).

Only logic that is the same in several adapters lives here; what a family's files look like,
and how its architecture and latents are read, stays in that family's module.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ucgm_convert.adapters.family import PASS_HEADS
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.statedict import load_state_dict_strict
from ucgm_convert.formats.torch_files import is_torch_zip, read_torch, tensor_dict
from ucgm_convert.model import GenerativeModel, ModelConfig
from ucgm_convert.nets.sit import SiT

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Upstream DiT / SiT / REPA size tables (DiT_models, SiT_models): name -> (hidden, heads); patch after the slash.
DIT_SIZES = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "XL": (1152, 16)}
_SIZE_NAME = re.compile(r"^(SiT|DiT)-(S|B|L|XL)/(\d+)$")
# SD-VAE latents as DiT, SiT, REPA and DDT sample them: decode z = m / 0.18215 with stabilityai/sd-vae-ft-ema.
SD_VAE = {"name": "sd-vae", "source": "stabilityai/sd-vae-ft-ema", "latent_mean": 0.0,
          "latent_std": 1 / 0.18215, "pixel_range": "-1,1"}
SD_VAE_DEFAULTS = {k: v for k, v in SD_VAE.items() if k != "source"}  # a Family's vae_defaults for SD-VAE latents
SD_VAE_FACTOR = 8  # image side / latent side
# DiT's and SiT's forward_with_cfg guide eps[:, :3] only ("for exact reproducibility"), the rest unguided.
DIT_GUIDED_CHANNELS = 3
# Keys every DiT-style transformer (DiT, SiT, REPA, REPA-E) has.
DIT_CORE_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight",
                 "blocks.0.mlp.fc1.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight")


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


def sampling_weights(obj: Any) -> tuple[Any, str]:
    """The weights upstream samples: `ema` of a train.py container, else the file itself; and where they are."""
    if isinstance(obj, Mapping) and "ema" in obj:
        return obj["ema"], " ['ema']"
    return obj, ""


def saved_args(obj: Any) -> argparse.Namespace | None:
    """The argparse `args` a DiT / SiT / REPA train.py container stores (None for a bare state dict)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    return args if isinstance(args, argparse.Namespace) else None


def require_released_path(path: Path, args: argparse.Namespace | None, path_type: str, prediction: str,
                          family: str) -> None:
    """Refuse a train.py checkpoint whose args.path_type / args.prediction differ from the released setting
    (a missing args, or field, means the released one): another path or target is another transport."""
    given = getattr(args, "path_type", path_type), getattr(args, "prediction", prediction)
    if given != (path_type, prediction):
        raise UCGMError(f"{path}: args.path_type is {given[0]!r} and args.prediction {given[1]!r}; only {family}'s "
                        f"path_type {path_type!r} with prediction {prediction!r} (the released setting) is supported")


def require_null_class(path: Path, args: argparse.Namespace | None) -> None:
    """Refuse a REPA / REPA-E SiT trained with args.cfg_prob 0: its label table has no null-class row."""
    if getattr(args, "cfg_prob", 0.1) == 0:
        raise UCGMError(f"{path}: trained with cfg_prob 0 (args.cfg_prob), so its label table has no null-class row; "
                        "such unguided SiTs are not supported")


def dit_style_state(obj: Any) -> Mapping[str, Any] | None:
    """The sampling weights when they have DiT's core keys and 6-way adaLN (GELU MLP), else None."""
    state, _ = sampling_weights(obj)
    if not isinstance(state, Mapping) or not all(isinstance(state.get(k), Tensor) for k in DIT_CORE_KEYS):
        return None
    hidden = state["x_embedder.proj.weight"].shape[0]
    return state if state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else None


def drop_training_only(path: Path, state: Mapping[str, Tensor],
                       prefixes: Mapping[str, str]) -> tuple[dict[str, Tensor], str | None]:
    """`state` without the keys under `prefixes` (prefix -> what they are), and the line saying what went
    (None: nothing), to print once the model has loaded (a failed load then stays one error line)."""
    dropped = {p: [k for k in state if k.startswith(p)] for p in prefixes}
    said = [f"{len(keys)} {p}* tensors ({prefixes[p]})" for p, keys in dropped.items() if keys]
    kept = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    return kept, (f"{path}: dropped {', '.join(said)}; sampling does not use them" if said else None)


def model_heads(path: Path, hidden: int, patch: int, model_name: Any, requested: int | None) -> int:
    """Heads from a saved args.model (upstream size table), else `requested`, else head size 64 (XL: 72)."""
    match = _SIZE_NAME.match(model_name) if isinstance(model_name, str) else None
    if match:
        size_hidden, heads = DIT_SIZES[match.group(2)]
        if (size_hidden, int(match.group(3))) != (hidden, patch):
            raise UCGMError(f"{path}: args.model is {model_name!r} (hidden {size_hidden}, patch {match.group(3)}) but "
                            f"the weights have hidden {hidden}, patch {patch}")
        if requested is not None and requested != heads:
            raise UCGMError(f"{path}: num_heads={requested} contradicts args.model {model_name!r} ({heads} heads)")
        return heads
    if requested is not None:
        if requested < 1 or hidden % requested:
            raise UCGMError(f"{path}: num_heads={requested} does not divide the hidden size {hidden}")
        return int(requested)
    heads = size_table_heads(hidden)
    if heads is None:
        raise UCGMError(f"{path}: cannot tell the number of attention heads of hidden size {hidden} (no upstream "
                        f"size in args.model: {model_name!r}); " + PASS_HEADS)
    return heads


def sit_arch_kwargs(path: Path, state: Mapping[str, Tensor], model_name: Any, num_heads: int | None, model: str,
                    learn_sigma: bool | None = False) -> dict[str, Any]:
    """Constructor arguments of our SiT read from DiT-style tensor shapes (heads: args / override / size table).

    `learn_sigma`: whether the final layer must have 2C outputs (DiT's learned variance); None accepts both.
    """
    geometry = dit_geometry(path, state, model)
    hidden, channels, patch = geometry["hidden_size"], geometry["in_channels"], geometry["patch_size"]
    final = state["final_layer.linear.weight"]
    factor = final.shape[0] // (patch * patch * channels) if final.shape[0] % (patch * patch * channels) == 0 else 0
    allowed = (1, 2) if learn_sigma is None else (2 if learn_sigma else 1,)
    if factor not in allowed:
        shapes = " or ".join(f"[{f * patch * patch * channels}, {hidden}]" for f in allowed)
        raise shape_error(path, "final_layer.linear.weight", final, shapes + (" (learned sigma: 2C outputs)"
                                                                              if 2 in allowed else ""), model)
    fc1 = state["blocks.0.mlp.fc1.weight"]
    mlp_ratio = fc1.shape[0] / hidden
    if int(hidden * mlp_ratio) != fc1.shape[0]:
        raise shape_error(path, "blocks.0.mlp.fc1.weight", fc1, f"[int({hidden} * mlp_ratio), {hidden}]", model)
    kwargs = {
        **geometry,
        "num_heads": model_heads(path, hidden, patch, model_name, num_heads),
        "mlp_ratio": mlp_ratio,
        "num_classes": label_classes(path, state, model),
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
    }
    return {**kwargs, "learn_sigma": True} if factor == 2 else kwargs


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


def plain_dit_kind(path: Path, obj: Any) -> str | None:
    """"SiT" / "DiT" for a plain DiT-style checkpoint (no REPA projectors, no REPA-E bn), else None.

    DiT and SiT weights have the same keys and shapes: a train.py container tells by args.model, a bare
    state dict only by its name (upstream releases: DiT-XL-2-256x256.pt, SiT-XL-2-256.pt); "" = no hint.
    """
    state = dit_style_state(obj)
    if state is None or any(k.startswith(("projectors.", "bn.")) for k in state):
        return None
    model = getattr(saved_args(obj), "model", None)
    if isinstance(model, str):
        return model[:3] if model[:4] in ("SiT-", "DiT-") else None
    name = path.name.lower()
    return "SiT" if name.startswith("sit") else "DiT" if name.startswith("dit") else ""


def probe_torch(path: Path, zip_only: bool = False) -> Any:
    """What a detect() looks at: the object a torch file holds, None where `path` does not load as one
    (with `zip_only`, also where it is not a torch zip, e.g. a legacy pickle)."""
    if zip_only and not is_torch_zip(path):
        return None
    try:
        return read_torch(path)
    except UCGMError:
        return None


def is_plain_dit(path: Path, kind: str) -> bool:
    """`path` is a plain DiT-style file that args.model or its name says is a `kind` ("DiT" / "SiT"), or
    that nothing says is the other one."""
    obj = probe_torch(path)
    return obj is not None and plain_dit_kind(path, obj) in (kind, "")


def load_plain_dit(path: Path, overrides: Mapping[str, Any], accepted: tuple[str, ...], *, kind: str, family: str,
                   model: str, transport: str, recipe: str | Mapping[int, str],
                   released_path: tuple[str, str] | None, device: torch.device | str,
                   dtype: torch.dtype) -> GenerativeModel:
    """A DiT / SiT release or train.py container: its EMA weights as a SiT network on SD-VAE latents (a learned
    sigma's channels dropped), the first 3 latent channels guided; `released_path` (path_type, prediction)
    refuses a train.py container trained for another transport; `accepted`: the family's override names."""
    path = Path(path)
    overrides = given_overrides(path, overrides, accepted, kind)
    obj = read_torch(path)
    weights, where = sampling_weights(obj)
    args = saved_args(obj)
    if released_path is not None:
        require_released_path(path, args, *released_path, kind)
    return dit_style_model(path, tensor_dict(weights, str(path) + where), args, where, family=family, model=model,
                           transport=transport, recipe=recipe, num_heads=overrides.get("num_heads"),
                           learn_sigma=None, guidance_channels=DIT_GUIDED_CHANNELS, device=device, dtype=dtype)


def dit_style_model(path: Path, state: Mapping[str, Tensor], args: argparse.Namespace | None, where: str, *,
                    family: str, model: str, transport: str, recipe: str | Mapping[int, str] | None,
                    num_heads: int | None, learn_sigma: bool | None, guidance_channels: int | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GenerativeModel:
    """The SiT network of a DiT-style `state` (training-only keys already dropped) on SD-VAE latents, frozen.

    `recipe` may map the image resolution (8 x the latent side) to the recipe name; `guidance_channels`: the
    leading channels the family's published guidance touches (None: all).
    """
    require_keys(state, DIT_CORE_KEYS, f"{path}{where}", f"{model} state dict")
    kwargs = sit_arch_kwargs(path, state, getattr(args, "model", None), num_heads, model, learn_sigma)
    net = meta_network(SiT, kwargs, state, str(path) + where)
    if isinstance(recipe, Mapping):
        recipe = recipe.get(SD_VAE_FACTOR * kwargs["input_size"])
    config = dit_config(family, "sit", kwargs, transport, kwargs["input_size"], dict(SD_VAE), recipe,
                        guidance_channels)
    return frozen_model(net, config, device, dtype)
