"""DINOv2 ViT-L/14 features for FD_DINOv2 (Stein et al. 2023) exactly as EDM2 computes them, on timm.

EDM2 (NVlabs/edm2 calculate_metrics.py L52-80, DINOv2Detector, default resize_mode='torch'):
uint8 NCHW -> float32 -> F.interpolate(size=(224, 224), mode='bicubic', antialias=True) (always,
no clamping or rounding) -> / 255 -> (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] ->
torch.hub 'facebookresearch/dinov2:main' 'dinov2_vitl14' in eval mode, whose forward returns
head(x_norm_clstoken) with head = Identity: the CLS token after the final LayerNorm, 1024-d.
Statistics are float64 mean / unbiased covariance (L171-200), FD as for FID (L267-269).

The hub model (facebookresearch/dinov2 dinov2/hub/backbones.py, _make_dinov2_model): vit_large,
img_size=518, patch 14, init_values=1.0 (LayerScale), ffn 'mlp', block_chunks=0,
num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1. Its weights file
`dinov2_vitl14_pretrain.pth` is a plain state dict: cls_token [1, 1, 1024], pos_embed
[1, 1370, 1024] (CLS + 37 x 37), mask_token [1, 1024] (unused at inference),
patch_embed.proj.{weight [1024, 3, 14, 14], bias}, blocks.N.{norm1, attn.qkv [3072, 1024],
attn.proj, ls1.gamma [1024], norm2, mlp.fc1 [4096, 1024], mlp.fc2, ls2.gamma} for N < 24,
norm.{weight, bias}; LayerNorm eps 1e-6, exact GELU, 16 heads of 64.

Position embeddings at 224 px (dinov2/models/vision_transformer.py interpolate_pos_encoding): the
37 x 37 grid (float32) is resized to 16 x 16 by F.interpolate(mode='bicubic', antialias=False,
scale_factor=((16 + 0.1) / 37,) * 2) -- a scale factor, not a size, so the sampling positions use
16.1 / 37; the CLS entry is kept. timm's own loader (checkpoint_filter_fn -> resample_abs_pos_embed)
resizes with size=(16, 16) and antialias=True, which differs; we do the hub model's resize once at
load time and build timm's VisionTransformer at img_size=224 (same blocks as timm's
vit_large_patch14_dinov2; timm's keys equal the official ones once mask_token is dropped, as its
_convert_dinov2 does).

Weights are never downloaded: `weights_path`, else $UCGM_DINOV2_WEIGHTS, else torch hub's cache
file; read with torch.load(weights_only=True).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import UCGMError
from ..formats.safe_pickle import read_pickle
from ..formats.torch_files import safe_load
from ..foundation import one_line, sha256_file
from .inception import no_tf32

WEIGHTS_FILENAME = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{WEIGHTS_FILENAME}"
WEIGHTS_ENV = "UCGM_DINOV2_WEIGHTS"
INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINOv2 ViT (S/B/L/g) uses 64-d heads: ViT-L/14 = 1024 / 16
POS_OFFSET = 0.1  # the hub model's interpolate_offset
_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")
_TOP_KEYS = ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "norm.weight", "norm.bias")


def cache_path() -> Path:
    """Where torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14') keeps the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def resolve_weights(weights_path: str | Path | None = None) -> Path:
    """The DINOv2 weights file: explicit path, $UCGM_DINOV2_WEIGHTS, or torch hub's cache (never a download)."""
    explicit = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        origin = "DINOv2 weights" if weights_path is not None else WEIGHTS_ENV
        if not path.is_file():
            raise UCGMError(f"{origin} {path}: no such file (expected the official {WEIGHTS_FILENAME})")
        return path
    if cache_path().is_file():
        return cache_path()
    raise UCGMError(f"DINOv2 weights: not found; download {WEIGHTS_URL} and pass its path, set {WEIGHTS_ENV}=PATH, "
                    f"or place it at {cache_path()}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """An official-layout DINOv2 state dict, read without running pickled code."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not (head == b"PK" or (len(head) == 2 and head[0] == 0x80)):  # torch.save's zip, or a legacy pickle
        raise UCGMError(f"{path}: not readable DINOv2 weights: not a torch.save file (expected the official "
                        f"{WEIGHTS_FILENAME})")
    state = safe_load(path, "DINOv2 weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UCGMError(f"{path}: expected a state dict of tensors (the official {WEIGHTS_FILENAME} layout)")
    return state


@dataclass(frozen=True)
class Architecture:
    """What the state dict's shapes say about the ViT (heads: embed_dim / 64, as in every DINOv2 model)."""

    embed_dim: int
    depth: int
    patch_size: int
    mlp_hidden: int
    grid: int  # side of the pretrained position grid (37 for 518 px / 14)

    @property
    def num_heads(self) -> int:
        return self.embed_dim // HEAD_DIM


def architecture(state: dict[str, torch.Tensor], source: str) -> Architecture:
    """Infer the ViT from official key names and shapes; one-line UCGMError naming `source` if the layout differs."""
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.norm1\.weight$", k))})
    expected = set(_TOP_KEYS) | {f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected or not depth:
        hint = " (registers / SwiGLU / chunked-block checkpoints are not DINOv2 ViT-L/14)" if unexpected else ""
        raise UCGMError(f"{source}: not the official DINOv2 ViT layout ({WEIGHTS_FILENAME}): missing "
                        f"{missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}{hint}")
    cls, pos, proj = state["cls_token"], state["pos_embed"], state["patch_embed.proj.weight"]
    if (cls.ndim, pos.ndim, proj.ndim) != (3, 3, 4):
        raise UCGMError(f"{source}: DINOv2 cls_token / pos_embed / patch_embed.proj.weight must be 3-, 3- and "
                        f"4-d, got {list(cls.shape)}, {list(pos.shape)}, {list(proj.shape)}")
    dim, patch, tokens = cls.shape[-1], proj.shape[-1], pos.shape[1] - 1
    grid = math.isqrt(tokens)
    arch = Architecture(embed_dim=dim, depth=depth, patch_size=patch, grid=grid,
                        mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0])
    shapes_ok = (cls.shape == (1, 1, dim) and pos.shape == (1, tokens + 1, dim) and grid * grid == tokens
                 and proj.shape == (dim, 3, patch, patch) and dim % HEAD_DIM == 0
                 and state["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim))
    if not shapes_ok:
        raise UCGMError(f"{source}: DINOv2 tensor shapes do not form a ViT with {HEAD_DIM}-d heads: cls_token "
                        f"{list(cls.shape)}, pos_embed {list(pos.shape)}, patch_embed {list(proj.shape)}")
    return arch


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The hub model's position embeddings at a `grid` x `grid` patch grid (its interpolate_pos_encoding).

    [1, 1 + M^2, D] -> [1, 1 + grid^2, D]: CLS entry kept, the M x M grid resized in float32 by bicubic
    interpolation with scale factor (grid + 0.1) / M on both axes, antialias off, align_corners off.
    """
    m = math.isqrt(pos_embed.shape[1] - 1)
    if m == grid:
        return pos_embed
    pos = pos_embed.float()
    dim = pos.shape[-1]
    scale = float(grid + POS_OFFSET) / m
    patch = nn.functional.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                                      antialias=False, scale_factor=(scale, scale))
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patch], dim=1).to(pos_embed.dtype)


def timm_state_dict(state: dict[str, torch.Tensor], source: str) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Official keys -> timm's at 224 px: drop mask_token (timm's _convert_dinov2), float32, and pos_embed
    resized as the hub model resizes it."""
    arch = architecture(state, source)
    converted = {k: v.float() for k, v in state.items() if k != "mask_token"}
    converted["pos_embed"] = interpolate_pos_embed(converted["pos_embed"], INPUT_SIZE // arch.patch_size)
    return arch, converted


def build_network(state: dict[str, torch.Tensor], source: str = "DINOv2 weights") -> nn.Module:
    """timm's VisionTransformer (never pretrained=True) at 224 px with `state` loaded strictly, in eval mode."""

    arch, converted = timm_state_dict(state, source)
    # Built on the meta device (no random init of 300M parameters), then the tensors are assigned.
    network = VisionTransformer(img_size=INPUT_SIZE, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
                                depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_hidden / arch.embed_dim,
                                init_values=1.0, num_classes=0, global_pool="token", qkv_bias=True, device="meta")
    try:
        network.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as err:
        raise UCGMError(f"{source}: does not fit timm's VisionTransformer: {one_line(err)}") from None
    left = [name for name, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if left:
        raise UCGMError(f"{source}: timm's VisionTransformer has tensors the weights do not set: {left[:3]}")
    return network.eval().requires_grad_(False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> EDM2's DINOv2 input: bicubic antialiased resize to 224 on 0..255 floats, then / 255 and
    ImageNet mean/std."""
    x = nn.functional.interpolate(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic",
                                  antialias=True)
    x = x / 255
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


@dataclass
class DINOv2Features:
    """Callable feature extractor: uint8 [N, H, W, 3] -> CLS features [N, D] float32 numpy (D = 1024 for ViT-L/14)."""

    network: nn.Module
    weights_path: str
    weights_sha256: str
    device: torch.device

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise UCGMError(f"DINOv2 input: expected uint8 images [N, H, W, 3], got {x.dtype} {list(x.shape)}")
        x = x.permute(0, 3, 1, 2).to(self.device)
        with torch.no_grad(), no_tf32():
            features = self.network(preprocess(x))
        return features.cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What results.json records about the FD_DINOv2 evaluator."""
        import timm

        return {
            "name": "dinov2-vitl14 (EDM2 calculate_metrics.py DINOv2Detector, resize_mode='torch')",
            "network": f"timm {timm.__version__} VisionTransformer at {INPUT_SIZE} px, official DINOv2 weights",
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "features": "CLS token after the final LayerNorm",
            "preprocess": (f"bicubic antialias resize to {INPUT_SIZE} of uint8 values as float32, /255, "
                           f"mean {list(MEAN)}, std {list(STD)}"),
            "pos_embed": f"the hub model's interpolate_pos_encoding: bicubic, scale factor (grid + {POS_OFFSET}) / "
                         f"pretrained grid, no antialias",
            "precision": "float32, TF32 off",
        }


def load_dinov2(weights_path: str | Path | None = None, device: torch.device | str = "cpu") -> DINOv2Features:
    """Resolve, safely read and load the official DINOv2 weights onto `device` as a timm model."""
    path = resolve_weights(weights_path)
    network = build_network(read_weights(path), source=str(path)).to(device)
    return DINOv2Features(network, str(path), sha256_file(path), torch.device(device))


def read_edm2_dinov2_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """FD_DINOv2 reference mu [D], sigma [D, D] (float64) from EDM2's dataset refs (img512.pkl: {'fd_dinov2': ...})."""
    obj = read_pickle(path)  # restricted: numpy arrays and plain containers only, never code
    stats = obj.get("fd_dinov2") if isinstance(obj, dict) else None
    if not isinstance(stats, dict) or not {"mu", "sigma"} <= set(stats):
        found = ", ".join(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__
        raise UCGMError(f"{path}: no FD_DINOv2 statistics: expected EDM2's {{'fd_dinov2': {{'mu', 'sigma'}}}} "
                        f"(dataset-refs/img512.pkl), found {found}")
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UCGMError(f"{path}: fd_dinov2 mu/sigma must be finite [D] and [D, D], got {list(mu.shape)} and "
                        f"{list(sigma.shape)}")
    return mu, sigma
