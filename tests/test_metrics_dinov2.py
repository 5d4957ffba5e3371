"""DINOv2 features for FD_DINOv2: official-layout weights -> timm, checked against a forward written from the official code.

The real ViT-L/14 (300M parameters) is too big for a unit test: a tiny ViT in the same official
layout (embed 128 = 2 heads of 64, depth 2, patch 14, 37 x 37 position grid) is written to a file,
loaded through load_dinov2, and its features compared with `reference_features` below, a direct
forward following facebookresearch/dinov2 (models/vision_transformer.py, layers/*) and EDM2's
DINOv2Detector preprocessing. The ViT-L layout itself is checked on the meta device against timm.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frechet_direct import direct_fd_low_rank

from ucgm_convert.errors import UCGMError
from ucgm_convert.metrics import frechet_from_stats
from ucgm_convert.metrics.dinov2 import (
    WEIGHTS_ENV,
    interpolate_pos_embed,
    load_dinov2,
    read_edm2_dinov2_stats,
    timm_state_dict,
)
from ucgm_convert.metrics.fid import FeatureStats

BLOCK_SHAPES = {  # official per-block keys -> shape, for embed D and MLP hidden H
    "norm1.weight": ("D",), "norm1.bias": ("D",), "attn.qkv.weight": ("3D", "D"), "attn.qkv.bias": ("3D",),
    "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",), "ls1.gamma": ("D",),
    "norm2.weight": ("D",), "norm2.bias": ("D",), "mlp.fc1.weight": ("H", "D"), "mlp.fc1.bias": ("H",),
    "mlp.fc2.weight": ("D", "H"), "mlp.fc2.bias": ("D",), "ls2.gamma": ("D",),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def official_shapes(dim: int, depth: int, hidden: int, patch: int = 14, grid: int = 37) -> dict[str, tuple[int, ...]]:
    """dinov2_vit*14_pretrain.pth layout: ViT-L/14 is dim 1024, depth 24, hidden 4096."""
    sizes = {"D": dim, "3D": 3 * dim, "H": hidden}
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{k}": tuple(sizes[s] for s in v) for k, v in BLOCK_SHAPES.items()})
    return shapes


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(dim=128, depth=2, hidden=512).items():
        scale = 1.0 if key in ("cls_token", "pos_embed") else 0.5 if key.endswith("gamma") else 0.08
        value = torch.randn(shape, generator=g) * scale
        state[key] = value + 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else value
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(tiny_state(), path)
    return path


def layer_norm(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * state[f"{name}.weight"] + state[f"{name}.bias"]


def reference_features(images: np.ndarray, state: dict[str, torch.Tensor], heads: int) -> np.ndarray:
    """EDM2's DINOv2Detector ('torch' resize) + the hub ViT forward, written out with plain tensor ops."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    b, dim = tokens.shape[:2]
    tokens = torch.cat([state["cls_token"].expand(b, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
    pos = state["pos_embed"]  # interpolate_pos_encoding with interpolate_offset=0.1, antialias False
    m = int(math.sqrt(pos.shape[1] - 1))
    grid = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(16.1 / m, 16.1 / m),
                         mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 256, dim)
    h = tokens + torch.cat([pos[:, :1], grid], dim=1)
    depth = len([k for k in state if k.endswith(".norm1.weight")])
    for i in range(depth):
        p = f"blocks.{i}"
        y = layer_norm(h, state, f"{p}.norm1")
        qkv = (y @ state[f"{p}.attn.qkv.weight"].T + state[f"{p}.attn.qkv.bias"]).reshape(b, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(b, -1, dim) @ state[f"{p}.attn.proj.weight"].T + state[f"{p}.attn.proj.bias"]
        h = h + state[f"{p}.ls1.gamma"] * o
        y = layer_norm(h, state, f"{p}.norm2")
        y = F.gelu(y @ state[f"{p}.mlp.fc1.weight"].T + state[f"{p}.mlp.fc1.bias"])
        h = h + state[f"{p}.ls2.gamma"] * (y @ state[f"{p}.mlp.fc2.weight"].T + state[f"{p}.mlp.fc2.bias"])
    return layer_norm(h, state, "norm")[:, 0].numpy()  # x_norm_clstoken


def test_features_equal_the_official_forward(weights: Path) -> None:
    extractor = load_dinov2(weights)
    rng = np.random.default_rng(1)
    for size in [(64, 64), (256, 256), (40, 56)]:  # upsampled, downsampled (as 256 / 512 px samples), non-square
        images = rng.integers(0, 256, size=(3, *size, 3), dtype=np.uint8)
        got = extractor(images)
        want = reference_features(images, tiny_state(), heads=2)
        assert got.shape == (3, 128) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.abs(got[0] - got[1]).max() > 0.05  # features depend on the image
    assert extractor.describe()["features"] == "CLS token after the final LayerNorm"


def test_position_grid_is_resized_like_the_hub_model_not_like_timms_loader() -> None:
    from timm.layers import resample_abs_pos_embed

    pos = tiny_state()["pos_embed"]
    ours = interpolate_pos_embed(pos, 16)
    assert ours.shape == (1, 257, 128) and torch.equal(ours[:, 0], pos[:, 0])
    timm_default = resample_abs_pos_embed(pos, new_size=(16, 16), num_prefix_tokens=1)  # size=, antialias=True
    assert (ours - timm_default).abs().max() > 1e-2
    assert interpolate_pos_embed(pos, 37) is pos  # at 518 px the hub model uses the grid as is


def test_vit_l14_layout_converts_to_timms_vit_large_patch14_dinov2() -> None:
    import timm

    shapes = official_shapes(dim=1024, depth=24, hidden=4096)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    arch, converted = timm_state_dict(state, "ViT-L/14")
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size, arch.mlp_hidden, arch.grid) == (
        1024, 24, 16, 14, 4096, 37)
    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=224, num_classes=0, device="meta")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert want["pos_embed"] == (1, 257, 1024) and "mask_token" not in want


def test_weights_from_the_environment_variable(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    assert load_dinov2().weights_path == str(weights)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("garbage", "not readable DINOv2 weights"),
    ("pickled_code", "refused to load DINOv2 weights"),
    ("inception", "not the official DINOv2 ViT layout"),
    ("registers", r"unexpected \['register_tokens'\]"),
    ("no_mask_token", r"missing \['mask_token'\]"),
    ("bad_heads", "do not form a ViT with 64-d heads"),
])
def test_bad_weights_are_one_line_errors_naming_the_file(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "w.pth"
    state = tiny_state()
    if case == "garbage":
        path.write_bytes(b"\x00garbage")
    elif case == "pickled_code":
        torch.save({"cls_token": torch.zeros(1), "x": Evil()}, path)
    elif case == "inception":
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
    elif case == "registers":
        torch.save({**state, "register_tokens": torch.zeros(1, 4, 128)}, path)
    elif case == "no_mask_token":
        torch.save({k: v for k, v in state.items() if k != "mask_token"}, path)
    elif case == "bad_heads":
        torch.save({k: v[..., :100] if k == "cls_token" else v for k, v in state.items()}, path)
    with pytest.raises(UCGMError, match=message) as info:
        load_dinov2(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_weights_say_where_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UCGMError, match=f"dinov2_vitl14_pretrain.pth.*{WEIGHTS_ENV}.*{tmp_path}"):
        load_dinov2()


def test_fd_dinov2_matches_a_direct_computation_on_edm2s_statistics() -> None:
    """EDM2 accumulates float64 sum(x) and sum(x x^T): mu = sum / n, sigma = (sum x x^T - n mu mu^T) / (n - 1)."""
    rng = np.random.default_rng(2)
    dim = 1024
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    samples = (rng.normal(size=(300, dim)) @ mixing).astype(np.float32)  # rank 299, as a small --num
    reference = rng.normal(size=(1100, dim)) @ mixing * 1.1 + 0.05  # full rank, as a real reference
    stats = FeatureStats(dim)
    for part in np.array_split(samples, 5):
        stats.update(part)
    n = len(reference)
    mu_ref = reference.sum(axis=0) / n
    sigma_ref = (reference.T @ reference - n * np.outer(mu_ref, mu_ref)) / (n - 1)
    got = frechet_from_stats(stats, mu_ref, sigma_ref)
    assert got == pytest.approx(direct_fd_low_rank(samples.astype(np.float64), reference), rel=1e-7)
    assert got > 1.0


def test_reads_edm2_fd_dinov2_reference_statistics(tmp_path: Path) -> None:
    import pickle

    rng = np.random.default_rng(3)
    mu, a = rng.normal(size=1024), rng.normal(size=(1024, 8))
    path = tmp_path / "img512.pkl"
    with open(path, "wb") as f:  # calculate_metrics.py save_stats: a plain pickle of numpy statistics
        pickle.dump({"num_images": 1281167, "fid": {"mu": np.zeros(2048), "sigma": np.eye(2048)},
                     "fd_dinov2": {"mu": mu.astype(np.float32), "sigma": a @ a.T}}, f)
    got_mu, got_sigma = read_edm2_dinov2_stats(path)
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu.astype(np.float32)) and got_sigma.shape == (1024,) * 2
    with open(path, "wb") as f:
        pickle.dump({"num_images": 3, "fid": {"mu": np.zeros(2), "sigma": np.eye(2)}}, f)
    with pytest.raises(UCGMError, match="no FD_DINOv2 statistics.*found fid, num_images"):
        read_edm2_dinov2_stats(path)
