"""DDT adapter: a tiny upstream DDT in its Lightning checkpoint layout loads and matches upstream.

Made by scripts/fixtures/make_ddt.py (run it with --upstream PATH; see scripts/fixtures/README.md).
Fixtures (tests/fixtures/ddt/) were produced OUTSIDE this repository with the upstream code,
MCG-NJU/DDT at commit 1d1b4d291325939dd98f6b91687af95c98c34d5c, class
`src.models.denoiser.decoupled_improved_dit.DDT(in_channels=4, num_groups=2, hidden_size=48,
num_blocks=4, num_encoder_blocks=3, patch_size=2, num_classes=10)`, torch 2.14.1, CPU, float32:
- weights: torch.manual_seed(0), then for each state-dict entry in order: matrices
  N(0, 1) / sqrt(fan_in), the label table N(0, 1), RMSNorm weights 1 + 0.2 N(0, 1), biases
  0.2 N(0, 1) (upstream's own init zeroes the output layer, which would hide bugs);
- `ddt_tiny_lightning.ckpt` = torch.save of {"epoch": 3, "global_step": 1234,
  "pytorch-lightning_version": "2.4.0", "state_dict", "loops", "optimizer_states": [],
  "lr_schedulers": []}; state_dict has `ema_denoiser.*` (those weights), `denoiser.*` (the same
  shapes as views one element further into the same flat storage, so the online copy differs
  but the file stores the weights once) and `diffusion_trainer.proj.0.0.{weight,bias}`;
- `expected.pt`: inputs from torch.Generator().manual_seed(1): x_8x8 = randn(4, 4, 8, 8), then
  x_6x10 = randn(4, 4, 6, 10); t = [0, 0.3, 0.77, 1]; y = [0, 3, 9, 10] (10 = null class);
  out_* = upstream `DDT.forward(x, t, y)[0]` with the EMA weights, num_encoder_blocks 3
  (out_8x8, out_6x10) and num_encoder_blocks 2 (out_*_enc2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import ucgm_convert as uc
from ucgm_convert.adapters import ddt as ddt_adapter
from ucgm_convert.adapters import detect_family
from ucgm_convert.errors import UCGMError
from ucgm_convert.nets.ddt import DDT

FIXTURES = Path(__file__).parent / "fixtures" / "ddt"
CKPT = FIXTURES / "ddt_tiny_lightning.ckpt"
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def model() -> uc.GenerativeModel:
    return uc.load(CKPT)


def _lightning_state() -> dict[str, torch.Tensor]:
    return dict(torch.load(CKPT, weights_only=True)["state_dict"])


def _save_lightning(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A Lightning-style checkpoint with independent (cloned) tensors."""
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {k: v.clone() for k, v in state.items()}}, path)
    return path


def _forward(m: uc.GenerativeModel, expected: dict[str, torch.Tensor], size: str) -> torch.Tensor:
    with torch.no_grad():
        return m(expected[f"x_{size}"], expected["t"], expected["y"])


# --- fidelity against upstream -----------------------------------------------------------------


@pytest.mark.parametrize("size", ["8x8", "6x10"])
def test_matches_upstream_default_split(model, expected, size):
    """Default split for 4 blocks is round(4 * 22/28) = 3 encoder + 1 decoder, as upstream ran."""
    assert model.cfg.arch_kwargs["encoder_depth"] == 3
    torch.testing.assert_close(_forward(model, expected, size), expected[f"out_{size}"], **TOL)


@pytest.mark.parametrize("size", ["8x8", "6x10"])
def test_encoder_depth_override_matches_upstream(model, expected, size):
    m = uc.load(CKPT, encoder_depth=2)
    assert m.cfg.arch_kwargs["encoder_depth"] == 2
    out = _forward(m, expected, size)
    torch.testing.assert_close(out, expected[f"out_{size}_enc2"], **TOL)
    assert (out - _forward(model, expected, size)).abs().max() > 1e-2


def test_default_encoder_depth_scales_published_split():
    assert ddt_adapter.default_encoder_depth(28) == 22
    assert ddt_adapter.default_encoder_depth(4) == 3
    assert ddt_adapter.default_encoder_depth(14) == 11
    assert ddt_adapter.default_encoder_depth(2) == 1


def test_online_copy_and_trainer_keys_ignored(tmp_path, expected):
    """Only ema_denoiser.* matters: dropping denoiser.* and diffusion_trainer.* changes nothing."""
    state = {k: v for k, v in _lightning_state().items() if k.startswith("ema_denoiser.")}
    m = uc.load(_save_lightning(tmp_path / "ema_only.ckpt", state))
    torch.testing.assert_close(_forward(m, expected, "8x8"), expected["out_8x8"], **TOL)


def test_compiled_prefix_stripped(tmp_path, expected):
    state = {k.replace("ema_denoiser.", "ema_denoiser._orig_mod."): v for k, v in _lightning_state().items()}
    path = _save_lightning(tmp_path / "compiled.ckpt", state)
    assert ddt_adapter.detect(path)
    torch.testing.assert_close(_forward(uc.load(path), expected, "8x8"), expected["out_8x8"], **TOL)


# --- configuration ---------------------------------------------------------------------------


def test_config_and_conventions(model):
    assert model.family == "ddt"
    assert model.transport.name == "ReLinear"
    assert model.cfg.arch_kwargs == {"in_channels": 4, "patch_size": 2, "hidden_size": 48, "depth": 4,
                                     "encoder_depth": 3, "num_heads": 2, "mlp_hidden": 128, "num_classes": 10}
    assert model.num_classes == 10 and model.null_class == 10
    assert model.guidance_channels is None
    assert model.latent_shape == (4, 32, 32) and model.recipe == "ddt-256"
    assert model.cfg.vae.to_dict() == {"norm_groups": 32, "name": "sd-vae", "source": "stabilityai/sd-vae-ft-ema", "latent_mean": 0.0,
                             "latent_std": pytest.approx(1 / 0.18215), "pixel_range": "-1,1"}
    assert all(not p.requires_grad for p in model.parameters())


def test_resolution_512():
    m = uc.load(CKPT, resolution=512)
    assert m.latent_shape == (4, 64, 64) and m.recipe == "ddt-512"


def test_in_channels_override_reads_patch_one(expected):
    """16 inputs per patch as 16 channels x patch 1 instead of SD-VAE's 4 x 2."""
    m = uc.load(CKPT, in_channels=16)
    assert (m.cfg.arch_kwargs["in_channels"], m.cfg.arch_kwargs["patch_size"]) == (16, 1)
    with torch.no_grad():
        out = m(torch.randn(2, 16, 4, 6), expected["t"][:2], expected["y"][:2])
    assert out.shape == (2, 16, 4, 6)


def test_unset_overrides_ignored():
    """The CLI passes flags it was not given as None: they mean "use the default"."""
    m = uc.load(CKPT, encoder_depth=None, resolution=None, num_heads=None)
    assert m.cfg.arch_kwargs["encoder_depth"] == 3 and m.latent_shape == (4, 32, 32)


def test_bad_overrides(tmp_path):
    with pytest.raises(UCGMError, match="accepted: encoder_depth, in_channels, resolution"):
        uc.load(CKPT, num_heads=4)
    with pytest.raises(UCGMError, match="in_channels"):
        uc.load(CKPT, in_channels=3)
    with pytest.raises(UCGMError, match="encoder_depth=5"):
        uc.load(CKPT, encoder_depth=5)
    with pytest.raises(UCGMError, match="resolution 100"):
        uc.load(CKPT, resolution=100)


def test_second_size_inferred(tmp_path):
    """Another size in the same layout: hidden 32, 2 heads of 16, 3 blocks, 7 classes, patch 1."""
    torch.manual_seed(3)
    net = DDT(in_channels=4, patch_size=1, hidden_size=32, depth=3, encoder_depth=1, num_heads=2,
              mlp_hidden=85, num_classes=7)
    state = {}
    for k, v in net.state_dict().items():
        state[f"ema_denoiser.{k}"] = torch.randn_like(v) * 0.2
        state[f"denoiser.{k}"] = torch.randn_like(v)
    m = uc.load(_save_lightning(tmp_path / "small.ckpt", state))
    assert m.cfg.arch_kwargs == {"in_channels": 4, "patch_size": 1, "hidden_size": 32, "depth": 3,
                                 "encoder_depth": 2, "num_heads": 2, "mlp_hidden": 85, "num_classes": 7}
    with torch.no_grad():
        out = m(torch.randn(2, 4, 5, 5), torch.rand(2), torch.tensor([0, 7]))
    assert out.shape == (2, 4, 5, 5) and torch.isfinite(out).all()


# --- detection and errors --------------------------------------------------------------------


def test_detected_from_contents_when_renamed(tmp_path):
    renamed = tmp_path / "weights.bin"
    shutil.copy(CKPT, renamed)
    assert detect_family(renamed).name == "ddt"
    assert uc.load(renamed).family == "ddt"
    assert uc.load(renamed, family="ddt").family == "ddt"


def test_folder_with_one_checkpoint(tmp_path, expected):
    """A Hub snapshot is a folder: its one DDT checkpoint is found by contents, not by name."""
    shutil.copy(CKPT, tmp_path / "model.ckpt")
    (tmp_path / "README.md").write_text("DDT")
    assert detect_family(tmp_path).name == "ddt"
    torch.testing.assert_close(_forward(uc.load(tmp_path), expected, "8x8"), expected["out_8x8"], **TOL)
    shutil.copy(CKPT, tmp_path / "other.pt")
    with pytest.raises(UCGMError, match="several DDT checkpoints"):
        uc.load(tmp_path, family="ddt")


def test_other_files_not_detected(tmp_path, tiny_checkpoint):
    assert not ddt_adapter.detect(tiny_checkpoint)
    sit_like = tmp_path / "sit.pt"
    torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}}, sit_like)
    assert not ddt_adapter.detect(sit_like)
    online_only = {k: v for k, v in _lightning_state().items() if k.startswith("denoiser.")}
    online = _save_lightning(tmp_path / "online.ckpt", online_only)
    assert not ddt_adapter.detect(online)
    with pytest.raises(UCGMError, match=r"online\.ckpt: no 'ema_denoiser\.\*' weights .*denoiser"):
        ddt_adapter.load(online)


def test_wrong_family(tmp_path, tiny_checkpoint):
    with pytest.raises(UCGMError, match="does not look like a 'ucgm'"):
        uc.load(CKPT, family="ucgm")
    with pytest.raises(UCGMError, match="does not look like a 'ddt'"):
        uc.load(tiny_checkpoint, family="ddt")


def test_missing_and_unexpected_keys_named(tmp_path):
    state = _lightning_state()
    del state["ema_denoiser.blocks.1.mlp.w2.weight"]
    state["ema_denoiser.blocks.0.attn.qkv.bias"] = torch.zeros(144)
    path = _save_lightning(tmp_path / "broken.ckpt", state)
    with pytest.raises(UCGMError) as err:
        uc.load(path)
    message = str(err.value)
    assert "broken.ckpt" in message
    assert "blocks.1.mlp.w2.weight" in message and "blocks.0.attn.qkv.bias" in message


def test_missing_embedding_named(tmp_path):
    state = {k: v for k, v in _lightning_state().items() if "x_embedder" not in k}
    path = _save_lightning(tmp_path / "noembed.ckpt", state)
    with pytest.raises(UCGMError, match=r"noembed\.ckpt: missing tensor 'ema_denoiser\.x_embedder\.proj\.weight'"):
        ddt_adapter.load(path)


def test_truncated_file(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(CKPT.read_bytes()[: CKPT.stat().st_size // 2])
    with pytest.raises(UCGMError, match="truncated.ckpt"):
        ddt_adapter.load(truncated)
    with pytest.raises(UCGMError, match="truncated.ckpt"):
        uc.load(truncated)
    with pytest.raises(UCGMError, match="truncated.ckpt"):
        uc.load(truncated, family="ddt")


# --- sampling and our format -----------------------------------------------------------------


def test_guided_sampling_runs(model):
    noise = torch.randn(2, *model.latent_shape[:1], 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4])
    x = uc.sample(uc.guided(model, 2.0, (0, 1)), noise, transport=model.transport, steps=3, y=y)
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_roundtrip_through_our_format(tmp_path, model, expected):
    reloaded = uc.load(uc.save_checkpoint(model, tmp_path / "converted"))
    assert reloaded.config == model.config
    torch.testing.assert_close(_forward(reloaded, expected, "6x10"), expected["out_6x10"], **TOL)
