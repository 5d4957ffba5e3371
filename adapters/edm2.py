"""EDM2 (NVlabs/edm2) post-hoc EMA snapshots: `edm2-img{512,64}-{xs..xxl}[-uncond]-*.pkl`.

Files: a plain pickle of {"ema": Precond, "encoder", "dataset_kwargs", "loss_fn"} whose classes carry
their own source code (torch_utils.persistence); the weights are the Precond's `unet.*` tensors (its
`logvar_*` head is dropped). It is read with ucgm_convert.safe_pickle (no stored code is imported or run).
The architecture comes from the tensor shapes, the scalar hyperparameters from the stored constructor
arguments. The network plugs into the EDM transport: it receives x_t = c_in x_sigma and t with
c_noise = 2.68 t - 1.59, and returns the raw F (Precond's c_skip / c_out combination is the transport's).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ucgm_convert.adapters.common import frozen_model, given_overrides, meta_network
from ucgm_convert.adapters.family import IMAGENET, Family, License
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.safe_pickle import PersistentRecord, clear_pickle_cache, module_tensors, read_pickle
from ucgm_convert.model import GenerativeModel, ModelConfig
from ucgm_convert.nets.edm2 import EDM2UNet

NAME = "edm2"
ARCH = "edm2-unet"

# Constructor arguments that tensor shapes cannot tell: EDM2's defaults (training/networks_edm2.py),
# replaced by the values stored in the snapshot's UNet init kwargs, replaced by user overrides.
SCALAR_DEFAULTS: dict[str, Any] = {
    "channels_per_head": 64,
    "label_balance": 0.5,
    "concat_balance": 0.5,
    "res_balance": 0.3,
    "attn_balance": 0.3,
    "clip_act": 256,
    "resample_filter": [1, 1],
}
ACCEPTED_OVERRIDES = tuple(SCALAR_DEFAULTS)

# Precond's uncertainty head (training-loss weighting only), dropped when loading for sampling.
UNUSED_PREFIXES = ("logvar_fourier.", "logvar_linear.")

# Released sizes with a published recipe, by model_channels (S 192, L 320, XXL 448).
RECIPES = {192: "edm2-s", 320: "edm2-l", 448: "edm2-xxl"}
DEFAULT_RECIPE = "edm2-s"

# StabilityVAEEncoder defaults (training/encoders.py): final latents = (raw - raw_mean) / raw_std * 0.5.
SD_VAE = "stabilityai/sd-vae-ft-mse"
RAW_MEAN = [5.81, 3.25, 0.12, -2.15]
RAW_STD = [4.17, 4.62, 3.71, 3.28]
FINAL_STD = 0.5

# Persistence pickles of other NVIDIA projects share the container; these bytes are the EDM2 markers.
_HEAD_BYTES = 1 << 20
_MARKERS = (b"torch_utils.persistence", b"_reconstruct_persistent_obj")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def detect(path: Path) -> bool:
    """True for a pickle that references NVIDIA's persistence reconstructor and holds an EDM2 `ema` Precond.

    A file whose header looks like a snapshot but cannot be fully read is still claimed, so that
    `load` reports why (e.g. truncation) instead of "unknown family".
    """
    path = Path(path)
    if not path.is_file():
        return False
    head = _head(path)
    if not (head[:1] == b"\x80" and all(m in head for m in _MARKERS)):
        return False
    try:
        data = read_pickle(path)
    except UCGMError:
        return True
    ema = data.get("ema") if isinstance(data, Mapping) else None
    return isinstance(ema, PersistentRecord) and ema.class_name == "Precond"


def _encoder_info(record: Any) -> dict[str, Any] | None:
    """The pickled `encoder`'s class name, VAE name and latent scale/bias (None if absent)."""
    if not isinstance(record, PersistentRecord):
        return None
    state = record.state
    info: dict[str, Any] = {"class_name": record.class_name, "vae_name": state.get("vae_name")}
    for key in ("scale", "bias"):
        info[key] = None if state.get(key) is None else [float(v) for v in torch.as_tensor(state[key]).flatten()]
    return info


def load_edm2_pickle(path: str | Path) -> dict[str, Any]:
    """Read a snapshot safely: {"ema": Precond state dict (`unet.*`, `logvar_*` keys), "init_kwargs":
    the UNet constructor arguments stored in the file, "sigma_data", "encoder": scale/bias info or None}.

    The pickle itself is cached (safe_pickle.read_pickle), so detect + load read the file once.
    """
    path = Path(path)
    data = read_pickle(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("ema"), PersistentRecord):
        found = ", ".join(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise UCGMError(f"{path}: not an EDM2 snapshot: expected a dict with an 'ema' network, found {found}")
    ema = data["ema"]
    unet = ema.state.get("_modules", {}).get("unet")
    if ema.class_name != "Precond" or not isinstance(unet, PersistentRecord):
        raise UCGMError(f"{path}: not an EDM2 snapshot: 'ema' is a {ema.class_name}, expected a Precond with a unet")
    init_kwargs: dict[str, Any] = {}
    for record in (ema, unet):  # Precond passes its extra kwargs on to UNet; UNet's own take precedence
        stored = record.state.get("_init_kwargs")
        if isinstance(stored, Mapping):
            init_kwargs.update(stored)
    return {
        "ema": module_tensors(ema, str(path)),
        "init_kwargs": init_kwargs,
        "sigma_data": float(ema.state.get("sigma_data", 0.5)),
        "encoder": _encoder_info(data.get("encoder")),
    }


def _tensor(state: Mapping[str, Tensor], key: str, ndim: int, path: Path) -> Tensor:
    if key not in state:
        raise UCGMError(f"{path}: missing tensor {key}; not an EDM2 U-Net")
    if state[key].ndim != ndim:
        raise UCGMError(f"{path}: tensor {key} has shape {list(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def infer_arch(state: Mapping[str, Tensor], path: Path) -> dict[str, Any]:
    """EDM2UNet's shape-determined constructor arguments from the `unet.*` tensors."""
    stems = [m for k in state if (m := re.fullmatch(r"unet\.enc\.(\d+)x\1_conv\.weight", k))]
    if len(stems) != 1:
        raise UCGMError(f"{path}: expected exactly one stem tensor unet.enc.<R>x<R>_conv.weight, found {len(stems)}")
    resolution = int(stems[0].group(1))
    stem = _tensor(state, stems[0].group(0), 4, path)
    model_channels = stem.shape[0]
    img_channels = _tensor(state, "unet.out_conv.weight", 4, path).shape[0]
    if stem.shape[1] != img_channels + 1:
        raise UCGMError(f"{path}: {stems[0].group(0)} has {stem.shape[1]} input channels, expected "
                        f"{img_channels + 1} (image channels + a constant channel)")
    blocks: dict[int, set[int]] = {}
    for key in state:
        if m := re.fullmatch(r"unet\.enc\.(\d+)x\1_block(\d+)\.conv_res1\.weight", key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    levels = sorted(blocks, reverse=True)
    if not levels or levels != [resolution >> i for i in range(len(levels))]:
        raise UCGMError(f"{path}: encoder block resolutions {levels} do not halve from {resolution}; not an EDM2 U-Net")
    num_blocks = len(blocks[resolution])
    channel_mult = []
    for res in levels:
        if blocks[res] != set(range(num_blocks)):
            raise UCGMError(f"{path}: resolution {res} has encoder blocks {sorted(blocks[res])}, "
                            f"expected 0..{num_blocks - 1} like resolution {resolution}")
        key = f"unet.enc.{res}x{res}_block0.conv_res1.weight"
        width = _tensor(state, key, 4, path).shape[0]
        if width % model_channels:
            raise UCGMError(f"{path}: {key} has {width} channels, not a multiple of model_channels {model_channels}")
        channel_mult.append(width // model_channels)
    attn_key = r"unet\.(?:enc|dec)\.(\d+)x\1_block\d+\.attn_qkv\.weight"
    attn = {int(m.group(1)) for k in state if (m := re.fullmatch(attn_key, k))}
    label = state.get("unet.emb_label.weight")
    return {
        "img_resolution": resolution,
        "img_channels": img_channels,
        "label_dim": 0 if label is None else label.shape[1],
        "model_channels": model_channels,
        "channel_mult": channel_mult,
        "noise_channels": _tensor(state, "unet.emb_fourier.freqs", 1, path).shape[0],
        "emb_channels": _tensor(state, "unet.emb_noise.weight", 2, path).shape[0],
        "num_blocks": num_blocks,
        "attn_resolutions": sorted(attn, reverse=True),
    }


def _scalars(init_kwargs: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Balances, clip_act, channels_per_head and resample filter: override > stored > default."""
    out = {}
    for name, default in SCALAR_DEFAULTS.items():
        value = overrides.get(name, init_kwargs.get(name, default))
        out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def vae_spec(encoder: Mapping[str, Any] | None, img_channels: int) -> dict[str, Any]:
    """Model-space latents m = (z - mean) / std with mean = -bias / scale, std = 1 / scale (z = raw latents)."""
    if encoder is not None and encoder["class_name"] == "StandardRGBEncoder":  # img64: pixels / 127.5 - 1
        return {"name": "identity", "source": None, "latent_mean": 0.0, "latent_std": 1.0, "pixel_range": "-1,1"}
    if img_channels != 4:
        raise UCGMError(f"EDM2 network has {img_channels} channels and no known encoder; expected 4 SD-VAE latents")
    source = SD_VAE
    mean, std = RAW_MEAN, [s / FINAL_STD for s in RAW_STD]
    if encoder is not None:
        source = encoder["vae_name"] if isinstance(encoder["vae_name"], str) else SD_VAE
        if encoder["scale"] is not None and encoder["bias"] is not None:
            # 6 significant digits undo the float32 round-off of the stored scale and bias.
            mean = [float(f"{-b / s:.6g}") for s, b in zip(encoder["scale"], encoder["bias"])]
            std = [float(f"{1 / s:.6g}") for s in encoder["scale"]]
    return {"name": "sd-vae", "source": source, "latent_mean": mean, "latent_std": std, "pixel_range": "0,1"}


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load an EDM2 snapshot as a model of the EDM transport (weights cast to `dtype`, default float32)."""
    path = Path(path)
    # None is a value here (clip_act=None: no clipping), so it is kept.
    overrides = given_overrides(path, overrides, ACCEPTED_OVERRIDES, "EDM2", drop_none=False)
    snapshot = load_edm2_pickle(path)
    if snapshot["sigma_data"] != 0.5:
        raise UCGMError(f"{path}: Precond sigma_data is {snapshot['sigma_data']}; the EDM transport assumes 0.5")
    state = snapshot["ema"]
    arch = infer_arch(state, path) | _scalars(snapshot["init_kwargs"], overrides)
    weights = {k[len("unet."):] if k.startswith("unet.") else k: v.to(dtype) for k, v in state.items()
               if not k.startswith(UNUSED_PREFIXES)}
    net = meta_network(EDM2UNet, arch, weights, str(path))
    clear_pickle_cache()  # the float16 snapshot would otherwise stay in RAM next to the loaded weights
    label_dim = arch["label_dim"]
    config = ModelConfig(
        family=NAME,
        arch=ARCH,
        arch_kwargs=arch,
        transport="EDM",
        # An unconditional net (label_dim 0) is a one-class model that ignores y.
        num_classes=label_dim or 1,
        latent_shape=(arch["img_channels"], arch["img_resolution"], arch["img_resolution"]),
        null_class=label_dim or 1,
        guidance_channels=None,
        vae=vae_spec(snapshot["encoder"], arch["img_channels"]),
        recipe=RECIPES.get(arch["model_channels"], DEFAULT_RECIPE),
    )
    return frozen_model(net, config, device, None)  # weights already cast to `dtype`


FAMILY = Family(
    name=NAME,
    title="EDM2",
    detect=detect,
    load=load,
    license=License(
        "cc-by-nc-sa-4.0",
        "EDM2 weights (NVlabs/edm2, LICENSE.txt @4bf8162) are CC BY-NC-SA 4.0: weights derived from them "
        "stay non-commercial and share-alike under the same license.",
    ),
    dataset=IMAGENET,
    default_recipe=DEFAULT_RECIPE,
    overrides=ACCEPTED_OVERRIDES,
    vae_defaults={k: v for k, v in vae_spec(None, 4).items() if k != "source"},
)
