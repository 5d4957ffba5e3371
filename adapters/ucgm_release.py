"""UCGM's own checkpoints (LINs-lab/UCGM main.py, and the releases on the Hub, sp12138sp/UCGM).

Files: a torch zip {"model", "ema", "opt", "unigen", "config"}: the online and EMA weights of the reference's
network, its optimizer, the UCGMTS state (its frozen teacher `mod.*`, or nothing) and the run's resolved YAML
`config`. Sampling uses `ema`, as the reference's eval.py. What the config says is honoured and checked:
model.type names the network (the reference's NETWORKS) and, by its size letter, the heads; model.in_chans,
data.image_size / vae.downsample_ratio and data.num_classes must match the weights; transport.type is the
transport; vae.type with data.latent_norm / latent_multiplier gives the latents (latent_norm needs the
reference's statistics file buffers/vaes/stat/<vae>_<res>.pt, pass --latent-stats); sample (type UNI) becomes
the stored UCGM-S settings (cfg_scale 0, the reference's "no guidance", is 1.0 here). Depth and width are read
from the weights. Networks whose keys equal ours: SiT-*, LightningDiT-*, TiT-* (our LightningDiT with
norm_weights=False), DDT-* and EDM2-* (UCGM's UNet: t -> 2.68 t - 1.59 inside, as our edm2-unet); UNet+ is
refused by name.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, ConfigDict, Field
from torch import Tensor

from ucgm_convert.adapters import edm2, lightningdit
from ucgm_convert.adapters.common import (
    block_count,
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
)
from ucgm_convert.adapters.ddt import RECIPES as DDT_RECIPES
from ucgm_convert.adapters.ddt import default_encoder_depth
from ucgm_convert.adapters.family import IMAGENET, PASS_STATS, Family, License
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.torch_files import read_torch, tensor_dict
from ucgm_convert.model import GenerativeModel
from ucgm_convert.nets import ARCHITECTURES
from ucgm_convert.settings import SamplingSettings
from ucgm_convert.settings.base import Bool, Float, Int, Settings
from ucgm_convert.transports import get_transport

NAME = "ucgm-release"
OVERRIDES = ("latent_stats",)
CONTAINER_KEYS = ("model", "ema", "opt", "unigen", "config")
_TYPE = re.compile(r"^(?P<net>SiT|LightningDiT|DDT|TiT|EDM2|UNet\+)(?:-(?P<size>[A-Za-z0-9]+)(?:/(?P<patch>\d+))?)?$")
SUPPORTED = ("SiT", "LightningDiT", "TiT", "DDT", "EDM2")
ARCHS = {"SiT": "sit", "LightningDiT": "lightningdit", "TiT": "lightningdit", "DDT": "ddt", "EDM2": "edm2-unet"}
# UCGM's TiT is its LightningDiT with q/k norm and weightless RMSNorms (networks/tit.py): switches the keys hide.
TIT_SWITCHES = {"use_qknorm": True, "use_rmsnorm": True, "norm_weights": False}
HEADS = {"S": 6, "B": 12, "L": 16, "XL": 16, "1p0B": 24}  # the reference's size tables (networks/*.py)
DDT_PUBLISHED = (28, 22)  # DDT-XL: 28 blocks, 22 of them the encoder
# vae.type -> (our VAE name, weights, pixel range of its decoder), from the reference's autoencs/*.py.
VAES = {
    "sdvae_f8c4": ("sd-vae", "stabilityai/sd-vae-ft-mse", "-1,1"),
    "sdvae_ema_f8c4": ("sd-vae", "stabilityai/sd-vae-ft-ema", "-1,1"),
    "edm2_sdvae_f8c4": ("sd-vae", "stabilityai/sd-vae-ft-mse", "0,1"),
    "edm2_sdvae_ema_f8c4": ("sd-vae", "stabilityai/sd-vae-ft-ema", "0,1"),
    "vavae_f16d32": ("ldm-f16d32", "hustvl/vavae-imagenet256-f16d32-dinov2", "-1,1"),
    "e2evavae_f16d32": ("ldm-f16d32", None, "-1,1"),
    "dcae_f32c32": ("dc-ae", None, "-1,1"),
    "idae_f1c3": ("identity", None, "-1,1"),
}
# Which of our families and recipes a network on a VAE continues (so --from that recipe, tuning and cards agree).
# The recipes are keyed by image size (EDM2: by model_channels, its size).
SOURCES = {("LightningDiT", "vavae_f16d32"): ("lightningdit", {256: "lightningdit"}),
           ("SiT", "e2evavae_f16d32"): ("repa-e", {256: "repa-e"}),
           ("SiT", "sdvae_ema_f8c4"): ("repa", {256: "repa"}), ("DDT", "sdvae_ema_f8c4"): ("ddt", DDT_RECIPES),
           ("EDM2", "edm2_sdvae_f8c4"): ("edm2", edm2.RECIPES)}
GUIDED_CHANNELS = {"LightningDiT": 3}  # its forward_with_cfg guides model_out[:, :3]; the others every channel


class _Section(Settings):
    """A part of the stored config: only the fields read here are checked, the rest is the run's own business."""

    model_config = ConfigDict(extra="ignore")


class _Data(_Section):
    image_size: Int = Field(ge=1, le=1 << 16)
    num_classes: Int = Field(ge=1, le=1 << 20)
    latent_norm: Bool = False
    latent_multiplier: Float = Field(default=1.0, gt=0.0)


class _Vae(_Section):
    type: Annotated[str, AfterValidator(lambda v: _known(v, VAES, "VAE"))]
    downsample_ratio: Int = Field(ge=1, le=64)


class _Model(_Section):
    type: str
    in_chans: Int = Field(ge=1, le=4096)


class _Transport(_Section):
    type: Annotated[str, AfterValidator(lambda v: get_transport(v).name)]


class _Sample(_Section):
    type: str = "UNI"
    cfg_scale: Float = Field(ge=0.0)
    cfg_interval: list[Float]
    sampling_steps: Int
    stochast_ratio: Float | str
    extrapol_ratio: Float
    sampling_order: Int
    time_dist_ctrl: list[Float]
    rfba_gap_steps: list[Float]


class ReleaseConfig(_Section):
    """The fields of a UCGM run's resolved config that loading and sampling its checkpoint depend on."""

    data: _Data
    vae: _Vae
    model: _Model
    transport: _Transport
    sample: _Sample | None = None


def _known(value: str, table: Mapping[str, Any], what: str) -> str:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(table)}")
    return value


def _is_release(path: Path) -> bool:
    """A torch file holding the five entries main.py saves, its config naming a model type and a transport."""
    obj = probe_torch(path, zip_only=True)
    if not isinstance(obj, Mapping) or not all(k in obj for k in CONTAINER_KEYS):
        return False
    config = obj["config"]
    return isinstance(config, Mapping) and isinstance(config.get("model"), Mapping) and "transport" in config


def detect(path: Path) -> bool:
    """True for a UCGM reference checkpoint, or a folder (a Hub snapshot) holding exactly one."""
    return find_checkpoint(Path(path), _is_release, "UCGM release", (".pt", ".pth")) is not None


def _network(path: Path, model_type: str) -> tuple[str, int | None, int | None]:
    """(network, heads, patch) that config.model.type names; UCGMError for a network without a reimplementation."""
    match = _TYPE.match(model_type)
    if match is None:
        raise UCGMError(f"{path}: config.model.type: unknown network {model_type!r}; the reference names "
                        "SiT-*, LightningDiT-*, DDT-*, TiT-*, EDM2-* or UNet+")
    net, size, patch = match["net"], match["size"], match["patch"]
    if net not in SUPPORTED:
        raise UCGMError(f"{path}: config.model.type {model_type!r}: the reference's {net} network is not "
                        f"supported (supported: {', '.join(n + '-*' for n in SUPPORTED)})")
    if net == "EDM2":  # EDM2-XS .. EDM2-XXL: only model_channels differs, and the weights tell it
        return net, None, None
    if size not in HEADS or patch is None:
        raise UCGMError(f"{path}: config.model.type {model_type!r}: expected {net}-SIZE/PATCH with SIZE one of "
                        f"{', '.join(HEADS)}")
    return net, HEADS[size], int(patch)


def _check(path: Path, what: str, stored: Any, found: Any) -> None:
    """One error line when the config's value and the weights' disagree."""
    if stored != found:
        raise UCGMError(f"{path}: config.{what} is {stored!r} but the 'ema' weights have {found!r}")


def _ddt_kwargs(path: Path, state: Mapping[str, Tensor], channels: int) -> dict[str, Any]:
    """DDT constructor arguments from the shapes (channels from the config, the encoder share as published)."""
    require_keys(state, ("x_embedder.proj.weight", "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w1.weight",
                         "y_embedder.embedding_table.weight"), f"{path} ['ema']", "DDT state dict")
    hidden, per_patch = state["x_embedder.proj.weight"].shape
    patch = round((per_patch / channels) ** 0.5)
    depth = block_count(state)
    return {"in_channels": channels, "patch_size": patch, "hidden_size": hidden, "depth": depth,
            "encoder_depth": DDT_PUBLISHED[1] if depth == DDT_PUBLISHED[0] else default_encoder_depth(depth),
            "num_heads": hidden // state["blocks.0.attn.q_norm.weight"].shape[0],
            "mlp_hidden": state["blocks.0.mlp.w1.weight"].shape[0],
            "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1}


def _sit_kwargs(path: Path, state: Mapping[str, Tensor], heads: int) -> dict[str, Any]:
    """SiT constructor arguments: sizes from the shapes, heads from the model type (the weights cannot tell)."""
    require_keys(state, ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                         "blocks.0.mlp.fc1.weight"), f"{path} ['ema']", "SiT state dict")
    geometry = dit_geometry(path, state, "a SiT")
    return {**geometry, "num_heads": heads, "num_classes": label_classes(path, state, "a SiT"),
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / geometry["hidden_size"]}


def _edm2_kwargs(path: Path, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """EDM2UNet arguments: shapes as for an EDM2 snapshot (the UNet's keys), scalars at UCGM's (= EDM2's) defaults."""
    return edm2.infer_arch({f"unet.{k}": v for k, v in state.items()}, path) | copy.deepcopy(edm2.SCALAR_DEFAULTS)


def _arch(path: Path, net: str, heads: int | None, state: Mapping[str, Tensor],
          config: ReleaseConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our network's constructor arguments, its sizes in DiT names), checked against what the config states."""
    if net == "EDM2":
        kwargs = _edm2_kwargs(path, state)
        sizes = {"in_channels": kwargs["img_channels"], "num_classes": kwargs["label_dim"],
                 "input_size": kwargs["img_resolution"]}
    else:
        if net == "DDT":
            kwargs = _ddt_kwargs(path, state, config.model.in_chans)
        elif net == "SiT":
            kwargs = _sit_kwargs(path, state, heads)  # type: ignore[arg-type]
        else:
            kwargs = lightningdit.arch_kwargs(path, state, None)
            if net == "TiT":
                kwargs.update(TIT_SWITCHES)
        sizes = kwargs
        _check(path, f"model.type {config.model.type!r}: heads", heads, kwargs["num_heads"])
    _check(path, "model.in_chans", config.model.in_chans, sizes["in_channels"])
    _check(path, "data.num_classes", config.data.num_classes, sizes["num_classes"])
    if "input_size" in sizes:
        _check(path, "data.image_size / vae.downsample_ratio", config.data.image_size // config.vae.downsample_ratio,
               sizes["input_size"])
    return kwargs, sizes


def _latents(path: Path, config: ReleaseConfig, channels: int, stats: str | Path | None) -> dict[str, Any]:
    """The VAE spec: model-space latents m = multiplier (z - mean) / std, as the reference's ImgLatentDataset."""
    name, source, pixel_range = VAES[config.vae.type]
    scale = config.data.latent_multiplier
    mean: Any = 0.0
    std: Any = 1.0 / scale
    if config.data.latent_norm and stats is not None:
        values = channel_stats(Path(stats).expanduser(), ("mean", "std"), channels, "latent statistics")
        mean, std = values["mean"].tolist(), (values["std"] / scale).tolist()
    elif config.data.latent_norm:
        warnings.warn(f"{path}: config.data.latent_norm is true but no statistics were given; storing mean 0 / std "
                      f"{std:g}. Samples will NOT decode correctly: pass {PASS_STATS} to the reference's "
                      f"buffers/vaes/stat/{config.vae.type}_{config.data.image_size}.pt", UserWarning, stacklevel=4)
    return {"name": name, "source": source, "latent_mean": mean, "latent_std": std, "pixel_range": pixel_range}


def _sampling(path: Path, sample: _Sample | None) -> SamplingSettings | None:
    """The stored UCGM-S settings (UNI); None, with a warning, for the reference's other sampler (ODE)."""
    if sample is None:
        return None
    if sample.type != "UNI":
        warnings.warn(f"{path}: config.sample.type is {sample.type!r}, not UCGM-S ('UNI'): its settings are not "
                      "used; pass --from RECIPE or --steps", UserWarning, stacklevel=4)
        return None
    values = {"steps": sample.sampling_steps, "order": sample.sampling_order,
              "stochasticity": sample.stochast_ratio.lower() if isinstance(sample.stochast_ratio, str)
              else sample.stochast_ratio, "extrapolation": sample.extrapol_ratio,
              "time_dist": sample.time_dist_ctrl, "gaps": sample.rfba_gap_steps,
              "cfg_scale": sample.cfg_scale or 1.0, "cfg_interval": sample.cfg_interval}
    try:
        return SamplingSettings(**values)
    except UCGMError as err:
        raise UCGMError(f"{path}: config.sample (as UCGM-S settings): {err}") from None


def read_release(path: Path) -> tuple[ReleaseConfig, dict[str, Tensor]]:
    """The validated stored config and the `ema` state dict of a UCGM checkpoint."""
    obj = read_torch(path)
    if not isinstance(obj, Mapping) or "config" not in obj:
        raise UCGMError(f"{path}: expected UCGM's checkpoint dict with {', '.join(map(repr, CONTAINER_KEYS))}")
    config = ReleaseConfig.parse(obj["config"], f"{path}: config")
    return config, tensor_dict(obj.get("ema"), f"{path} ['ema']")


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """The EMA network of a UCGM checkpoint with the transport, latents and sampling settings its config stores."""
    path = Path(path)
    overrides = given_overrides(path, overrides, OVERRIDES, "UCGM release")
    path = checkpoint_to_load(path, _is_release, "UCGM release", (".pt", ".pth"))
    config, state = read_release(path)
    net_name, heads, patch = _network(path, config.model.type)
    kwargs, sizes = _arch(path, net_name, heads, state, config)
    if patch is not None:
        _check(path, f"model.type {config.model.type!r}: patch size", patch, kwargs["patch_size"])
    arch = ARCHS[net_name]
    net = meta_network(ARCHITECTURES[arch], kwargs, state, f"{path} ['ema']")
    side = config.data.image_size // config.vae.downsample_ratio
    family, recipes = SOURCES.get((net_name, config.vae.type), (NAME, {}))
    recipe = recipes.get(kwargs["model_channels"] if net_name == "EDM2" else config.data.image_size)
    model_config = dit_config(family, arch, {**kwargs, **sizes}, config.transport.type, side,
                              _latents(path, config, sizes["in_channels"], overrides.get("latent_stats")), recipe,
                              guidance_channels=GUIDED_CHANNELS.get(net_name))
    # arch_kwargs: the constructor's own arguments only (the DiT-style size names were for dit_config)
    model_config = model_config.replace(arch_kwargs=kwargs, sampling=_sampling(path, config.sample))
    return frozen_model(net, model_config, device, dtype)


FAMILY = Family(
    name=NAME,
    title="UCGM (reference training checkpoints)",
    detect=detect,
    load=load,
    license=License("apache-2.0", "UCGM (LINs-lab/UCGM) is released under the Apache-2.0 license; a checkpoint "
                    "tuned from another family's weights also carries that family's terms."),
    dataset=IMAGENET,
    overrides=OVERRIDES,
)
