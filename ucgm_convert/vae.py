"""Model-space latents <-> images through the source family's VAE (diffusers), described by a VaeSpec.

The spec (ucgm_convert.settings.VaeSpec, config.json "vae") names the VAE ("identity", "sd-vae",
"ldm-f16d32", "dc-ae"), its weights ("source": Hub id or path), the latent statistics and the
pixel range. Model-space latents are m = (z - mean) / std; decoding computes z = m * std + mean, runs the VAE
and maps its output range to [0, 1]. `identity` is pixel space ([-1, 1] data, the demo model).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from torch import Tensor, nn

from .errors import UCGMError
from .formats.safetensors_file import read_safetensors
from .formats.statedict import load_state_dict_strict
from .formats.torch_files import read_torch, tensor_dict
from .foundation import looks_like_hub_id, one_line
from .nets.ldm_vae import build_autoencoder_kl, diffusers_naming
from .settings import SettingsError, VaeSpec
from .settings.evaluation import UINT8_DEFAULT, UINT8_RULES

# The diffusers class each name decodes with (f16d32 is an AutoencoderKL with attention levels).
DIFFUSERS_CLASS = {"sd-vae": "AutoencoderKL", "ldm-f16d32": "AutoencoderKL", "dc-ae": "AutoencoderDC"}
# Top-level parts of training checkpoints that are not the VAE: the latent-diffusion / VA-VAE
# Lightning module keeps LPIPS + discriminator under `loss.`, VA-VAE its DINOv2 under
# `foundation_model.` and the alignment projection under `linear_proj.`.
NON_VAE_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
# Files next to released VAE weights that are not the VAE (REPA-E, LightningDiT repos).
AUXILIARY_MARKERS = ("stats", "discriminator")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.pt", "*.pth", "*.ckpt"]
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
Spec = VaeSpec | Mapping[str, Any]


def as_spec(spec: Spec) -> VaeSpec:
    """A VaeSpec from a VaeSpec or its dict form; a bad field is a UCGMError naming it."""
    if isinstance(spec, VaeSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise UCGMError(f"vae spec: expected a mapping, got {type(spec).__name__}")
    try:
        return VaeSpec(**spec)
    except SettingsError as err:
        raise UCGMError(f"vae spec: {err}") from None


def _stat(spec: VaeSpec, field: str, like: Tensor) -> Tensor:
    """latent_mean / latent_std as a [1, C, 1, 1] tensor matching `like` [B, C, H, W]."""
    values = spec.channel_values(field, like.shape[1])
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _to_unit(x: Tensor, pixel_range: str) -> Tensor:
    """Decoder output -> [0, 1]: "-1,1" maps (x + 1) / 2, "0,1" only clamps."""
    return ((x + 1) / 2).clamp(0, 1) if pixel_range == "-1,1" else x.clamp(0, 1)


def _module(spec: VaeSpec, vae_module: nn.Module | None) -> nn.Module:
    if vae_module is None:
        raise UCGMError(f"VAE {spec.name!r} needs its network: load it with load_vae(spec, path) "
                        "(on the command line: --vae PATH)")
    return vae_module


def decode(latents: Tensor, spec: Spec, vae_module: nn.Module | None = None) -> Tensor:
    """Model-space latents [B, C, H, W] -> float32 images in [0, 1] (z = m * std + mean, then the VAE)."""
    spec = as_spec(spec)
    x = latents.float()
    z = x * _stat(spec, "latent_std", x) + _stat(spec, "latent_mean", x)
    if spec.name != "identity":
        module = _module(spec, vae_module)
        weight = next(module.parameters())
        with torch.no_grad():
            z = module.decode(z.to(weight.device, weight.dtype)).sample.float()
    return _to_unit(z, spec.pixel_range)


def encode(
    images: Tensor,
    spec: Spec,
    vae_module: nn.Module | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Images in the VAE's pixel_range [B, 3, H, W] -> float32 model-space latents m = (z - mean) / std.

    z is the KL posterior's mean, or with `noise` (standard normal, the latent's shape) the draw
    z = mean + std * noise, which is what diffusers' `latent_dist.sample()` computes from its own noise;
    the caller seeds it (per image, so results do not depend on batching). DC-AE and pixel space have no
    posterior: `noise` is not used there.
    """
    spec = as_spec(spec)
    if spec.name == "identity":
        z = images.float()
    else:
        module = _module(spec, vae_module)
        weight = next(module.parameters())
        with torch.no_grad():
            out = module.encode(images.to(weight.device, weight.dtype))
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            z = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        else:
            z = out.latent
        z = z.float()
    return (z - _stat(spec, "latent_mean", z)) / _stat(spec, "latent_std", z)


def to_uint8(images: Tensor, rule: str = UINT8_DEFAULT) -> Tensor:
    """[B, C, H, W] floats in [0, 1] -> [B, H, W, C] uint8 by `rule` (settings.evaluation.UINT8_RULES):
    round half up, floor(255 x + 0.5), or truncate, floor(255 x)."""
    if rule not in UINT8_RULES:
        raise UCGMError(f"uint8 rule: expected one of {', '.join(UINT8_RULES)}, got {rule!r}")
    scaled = images.clamp(0, 1) * 255
    pixels = scaled + 0.5 if rule == "round" else scaled
    return pixels.floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def vae_only(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The VAE's tensors of a (training) state dict: known non-VAE parts dropped, anything else named."""
    kept = {k: v for k, v in state.items() if not k.startswith(NON_VAE_PREFIXES)}
    unexpected = sorted(k for k in kept if not k.startswith(VAE_PREFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise UCGMError(f"{source}: unexpected keys that belong to no VAE part ({', '.join(VAE_PREFIXES)}): {shown}")
    if not kept:
        raise UCGMError(f"{source}: no VAE weights (no keys under {', '.join(VAE_PREFIXES)})")
    return kept


def read_vae_weights(path: Path) -> dict[str, Tensor]:
    """VAE tensors of one file: a bare state dict, a Lightning checkpoint (`state_dict`) or a
    REPA-E training checkpoint (`vae`), as .safetensors or a torch zip (read without pickled code)."""
    source = str(path)
    obj: Any = read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state = tensor_dict(obj, source, "state_dict")
    elif isinstance(obj, Mapping) and "vae" in obj and not isinstance(obj["vae"], Tensor):
        state = tensor_dict(obj, source, "vae")
    else:
        state = tensor_dict(obj, source)
    return vae_only(state, source)


def _diffusers_folder(name: str, folder: Path, dtype: torch.dtype) -> nn.Module:
    """A diffusers-format VAE folder (config.json + diffusion_pytorch_model.*), weights checked strictly."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UCGMError(f"{config_path}: not a readable JSON config: {err}") from None
    class_name = DIFFUSERS_CLASS[name]
    if config.get("_class_name") != class_name:
        raise UCGMError(f"{config_path}: _class_name is {config.get('_class_name')!r}, but VAE {name!r} "
                        f"needs a diffusers {class_name}")
    weights = next((folder / f for f in DIFFUSERS_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise UCGMError(f"{folder}: no VAE weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
    if weights.suffix == ".safetensors":
        state = read_safetensors(weights)
    else:
        state = tensor_dict(read_torch(weights), str(weights))
    if class_name == "AutoencoderKL":
        state = diffusers_naming(state, str(weights))
    cls = getattr(importlib.import_module("diffusers"), class_name)  # on use: diffusers imports slowly
    try:
        with torch.device("meta"):
            vae = cls.from_config(config)
    except (TypeError, ValueError) as err:
        raise UCGMError(f"{config_path}: not a valid {class_name} config: {err}") from None
    load_state_dict_strict(vae, {k: v.to(dtype) for k, v in state.items()}, str(weights), assign=True)
    return vae


def _from_state(name: str, state: Mapping[str, Tensor], source: str, norm_groups: int, dtype: torch.dtype) -> nn.Module:
    """A KL VAE from bare weights (latent-diffusion or diffusers names); the layout comes from the shapes."""
    if name == "dc-ae":
        raise UCGMError(f"{source}: a DC-AE needs its diffusers config: pass a diffusers folder "
                        "(config.json + diffusion_pytorch_model.safetensors) or a Hub repo id")
    return build_autoencoder_kl(vae_only(state, source), source, norm_groups, dtype)


def _from_folder(name: str, folder: Path, norm_groups: int, dtype: torch.dtype) -> nn.Module:
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return _diffusers_folder(name, candidate, dtype)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                   and not any(marker in p.name for marker in AUXILIARY_MARKERS))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise UCGMError(f"{folder}: expected a diffusers config.json or exactly one VAE weights file "
                        f"({', '.join(WEIGHT_SUFFIXES)}); found {found}")
    return _from_state(name, read_vae_weights(files[0]), str(files[0]), norm_groups, dtype)


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hub VAE repo (weights and configs only), from the cache when offline."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=["*discriminator*"]))
    except LocalEntryNotFoundError:
        raise UCGMError(f"VAE {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
                        f"(offline?): download the repo {repo_id} where the Hub is reachable (`hf download "
                        f"{repo_id}`) or pass --vae PATH to a local copy") from None
    except HfHubHTTPError as err:
        raise UCGMError(f"VAE {repo_id!r}: Hugging Face Hub error: {one_line(err)}") from None


def _from_source(name: str, source: str, norm_groups: int, dtype: torch.dtype) -> nn.Module:
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(name, path, norm_groups, dtype)
    if path.is_file():
        return _from_state(name, read_vae_weights(path), str(path), norm_groups, dtype)
    if looks_like_hub_id(source):
        return _from_folder(name, hub_folder(source), norm_groups, dtype)
    raise UCGMError(f"VAE {source}: no such file or folder (and not a Hugging Face repo id like user/name)")


def load_vae(
    spec: Spec,
    path: str | Path | None = None,
    state: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The VAE network for `spec`, in eval mode without gradients.

    Weights from `path` (file, folder or Hub id; overrides spec.source), else `state` (weights
    stored with the model, e.g. REPA-E's end-to-end tuned VAE), else spec.source.
    """
    spec = as_spec(spec)
    name = spec.name
    if name == "identity":
        return nn.Identity()
    groups = spec.norm_groups
    if path is not None:
        vae = _from_source(name, str(path), groups, dtype)
    elif state is not None:
        vae = _from_state(name, state, "VAE weights stored with the model", groups, dtype)
    elif spec.source:
        vae = _from_source(name, spec.source, groups, dtype)
    else:
        raise UCGMError(f"VAE {name!r}: the model names no VAE weights (vae.source is null and it stores none); "
                        "pass --vae PATH (a VAE checkpoint file, a folder, or a Hugging Face repo id)")
    return vae.to(device=device).eval().requires_grad_(False)  # already in dtype
