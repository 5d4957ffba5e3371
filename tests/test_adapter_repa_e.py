"""REPA-E adapter: outputs equal upstream's on tiny random SiTs saved in upstream's own containers.

The fixtures in tests/fixtures/repa_e/ are made by scripts/fixtures/make_repa_e.py with the upstream
code (End2End-Diffusion/REPA-E at commit 3ad80468e78ec4fc93e6e70aa08e7b3b8303a171; models/sit.py `SiT`,
models/autoencoder.py, samplers.py `euler_sampler`, utils.py `denormalize_latents`); its docstring is
the exact procedure. In short: e2e.pt is train_repae.py's container for "SiT-T/2" (depth 2, hidden 32,
2 heads, patch 2, 4 channels, 8x8 latents, 10 classes) with a tiny upstream VAE whose latent statistics
are the EMA's bn buffers (`model`'s are shifted, so decoding with them is detected); ldm.pt is
train_ldm_only.py's container for "SiT-T/1" (depth 1, hidden 64, 1 head, patch 1, 8 channels, 4x4
latents, mlp_ratio 2, qk_norm) with tiny-e2e-vae-latents-stats.pt beside it. `model` keeps the EMA's
tensors except final_layer.linear.* and y_embedder.* (so sampling from `model` is detected).
<name>_expected.pt holds upstream's `inference`, linear interpolant, 2-step `euler_sampler` and (e2e)
VAE decode of de-normalised latents, as generate.py runs them.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.adapters import common, detect_family, get_family
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.vae import decode, load_vae

FIXTURES = Path(__file__).parent / "fixtures" / "repa_e"
ATOL = 1e-5
E2E_HEADS = {"num_heads": 2}  # hidden 32 is no upstream size: heads cannot come from args or the table
ARCH = {
    "e2e": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
            "mlp_ratio": 4.0, "num_classes": 10, "qk_norm": False},
    "ldm": {"input_size": 4, "patch_size": 1, "in_channels": 8, "hidden_size": 64, "depth": 1, "num_heads": 1,
            "mlp_ratio": 2.0, "num_classes": 10, "qk_norm": True},
}
OVERRIDES = {"e2e": E2E_HEADS, "ldm": {}}
STATS = FIXTURES / "tiny-e2e-vae-latents-stats.pt"


def read(path: Path) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def expected(name: str) -> dict[str, torch.Tensor]:
    return read(FIXTURES / f"{name}_expected.pt")


@pytest.fixture(scope="module")
def models() -> dict[str, uc.GenerativeModel]:
    return {name: uc.load(FIXTURES / f"{name}.pt", **OVERRIDES[name]) for name in ARCH}


def rewrite(name: str, folder: Path, edit: Any) -> Path:
    """A copy of fixture `name` after `edit(container)` (in place), written to `folder`."""
    ckpt = read(FIXTURES / f"{name}.pt")
    edit(ckpt)
    path = folder / f"{name}.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("name", list(ARCH))
def test_matches_upstream(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    model, fx = models[name], expected(name)
    assert model.family == "repa-e" and model.cfg.arch == "sit" and model.cfg.arch_kwargs == ARCH[name]
    assert model.transport.name == "Linear" and model.recipe == "repa-e"
    assert model.num_classes == 10 and model.null_class == 10 and model.guidance_channels is None
    assert model.latent_shape == (ARCH[name]["in_channels"], ARCH[name]["input_size"], ARCH[name]["input_size"])
    torch.testing.assert_close(model(fx["x"], fx["t"], fx["y"]), fx["out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(ARCH))
def test_samples_from_ema(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    ckpt = read(FIXTURES / f"{name}.pt")
    weight = models[name].net.final_layer.linear.weight
    assert torch.equal(weight, ckpt["ema"]["final_layer.linear.weight"])
    assert not torch.equal(weight, ckpt["model"]["final_layer.linear.weight"])


@pytest.mark.parametrize("name", list(ARCH))
def test_transport_and_euler_steps_match_upstream(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    """Upstream's interpolant is our Linear path, and 2 UCGM-S steps without gaps are its Euler sampler."""
    model, fx = models[name], expected(name)
    t, T = fx["t"].view(-1, 1, 1, 1), model.transport
    torch.testing.assert_close(T.alpha_in(t) * fx["noise"] + T.gamma_in(t) * fx["x"], fx["path_in"])
    torch.testing.assert_close(T.alpha_to(t) * fx["noise"] + T.gamma_to(t) * fx["x"], fx["path_target"])
    got = uc.sample(model, fx["euler_noise"], transport=T, steps=2, gaps=(0.0, 0.0), y=fx["euler_y"])
    torch.testing.assert_close(got, fx["euler"], atol=ATOL, rtol=0)


def test_e2e_vae_and_statistics_decode_as_generate_py(models: dict[str, uc.GenerativeModel]) -> None:
    model, fx, ckpt = models["e2e"], expected("e2e"), read(FIXTURES / "e2e.pt")
    assert model.vae_state is not None and model.vae_state.keys() == ckpt["vae"].keys()
    assert all(torch.equal(model.vae_state[k], v) for k, v in ckpt["vae"].items())
    spec = model.cfg.vae.to_dict()
    assert spec["name"] == "sd-vae" and spec["source"] is None and spec["pixel_range"] == "-1,1"
    assert spec["latent_mean"] == pytest.approx(ckpt["ema"]["bn.running_mean"].tolist(), rel=1e-12)
    assert spec["latent_std"] == pytest.approx(ckpt["ema"]["bn.running_var"].double().sqrt().tolist(), rel=1e-12)
    tiny = {**spec, "norm_groups": 4}  # the tiny VAE's GroupNorm groups (released VAEs: 32, the default)
    images = decode(fx["decode_latents"], tiny, load_vae(tiny, state=model.vae_state))
    torch.testing.assert_close(images, ((fx["decoded"] + 1) / 2).clamp(0, 1), atol=ATOL, rtol=0)


def test_ldm_only_statistics_from_the_stats_file(models: dict[str, uc.GenerativeModel]) -> None:
    spec, stats = models["ldm"].cfg.vae.to_dict(), read(STATS)
    assert models["ldm"].vae_state is None
    assert spec["name"] == "ldm-f16d32" and spec["source"] is None
    assert spec["latent_mean"] == pytest.approx(stats["latents_bias"].flatten().tolist(), rel=1e-12)
    assert spec["latent_std"] == pytest.approx((1 / stats["latents_scale"].double()).flatten().tolist(), rel=1e-12)


def test_ldm_only_without_stats_file_warns_and_override_wins(tmp_path: Path) -> None:
    path = tmp_path / "0400000.pt"
    shutil.copy(FIXTURES / "ldm.pt", path)
    with pytest.warns(UserWarning, match="latent_stats"):
        fallback = uc.load(path)
    ema = read(path)["ema"]
    assert fallback.cfg.vae.latent_mean == pytest.approx(ema["bn.running_mean"].tolist(), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = uc.load(path, latent_stats=str(STATS))
    assert given.cfg.vae.latent_std == pytest.approx(
        (1 / read(STATS)["latents_scale"].double()).flatten().tolist(), rel=1e-12)


def test_bare_ema_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "ema.pt"
    torch.save(read(FIXTURES / "e2e.pt")["ema"], path)
    assert detect_family(path).name == "repa-e"
    with pytest.warns(UserWarning, match="bn running statistics"):
        model = uc.load(path, **E2E_HEADS)
    fx = expected("e2e")
    torch.testing.assert_close(model(fx["x"], fx["t"], fx["y"]), fx["out"], atol=ATOL, rtol=0)
    assert model.vae_state is None


def test_detection_from_contents_and_family_override(tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    shutil.copy(FIXTURES / "e2e.pt", renamed)
    assert detect_family(renamed).name == "repa-e"
    assert detect_family(FIXTURES / "ldm.pt").name == "repa-e"
    assert uc.load(renamed, family="repa-e", **E2E_HEADS).family == "repa-e"
    with pytest.raises(UCGMError, match="lightningdit"):
        uc.load(renamed, family="lightningdit")
    adapter = get_family("repa-e")
    assert not adapter.detect(STATS)
    for other in (Path(__file__).parent / "fixtures" / "ddt" / "ddt_tiny_lightning.ckpt",
                  Path(__file__).parent / "fixtures" / "edm2" / "tiny-cond.pkl"):
        if other.is_file():
            assert not adapter.detect(other)
            with pytest.raises(UCGMError):
                uc.load(other, family="repa-e")


def test_unknown_and_missing_keys_are_named(tmp_path: Path) -> None:
    def extra(ckpt: dict) -> None:
        ckpt["ema"]["blocks.0.attn.extra.weight"] = torch.zeros(2)
        del ckpt["ema"]["final_layer.linear.bias"]
    with pytest.raises(UCGMError, match=r"blocks\.0\.attn\.extra\.weight") as err:
        uc.load(rewrite("e2e", tmp_path, extra), **E2E_HEADS)
    assert "final_layer.linear.bias" in str(err.value)

    def no_table(ckpt: dict) -> None:
        del ckpt["ema"]["y_embedder.embedding_table.weight"]
    path = rewrite("e2e", tmp_path, no_table)
    with pytest.raises(UCGMError, match="does not look like a 'repa-e'"):
        uc.load(path, family="repa-e", **E2E_HEADS)
    with pytest.raises(UCGMError, match="missing keys: y_embedder.embedding_table.weight"):
        get_family("repa-e").load(path, **E2E_HEADS)


def test_truncated_file_and_unknown_override(tmp_path: Path) -> None:
    data = (FIXTURES / "e2e.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UCGMError, match="truncated.pt"):
        uc.load(path, family="repa-e")
    with pytest.raises(UCGMError, match="num_heads, latent_stats"):
        uc.load(FIXTURES / "e2e.pt", encoder_depth=3)


def test_heads_from_args_override_and_size_table(tmp_path: Path) -> None:
    with pytest.raises(UCGMError, match="num_heads="):
        uc.load(FIXTURES / "e2e.pt")

    def named_b2(ckpt: dict) -> None:
        ckpt["args"].model = "SiT-B/2"
    with pytest.raises(UCGMError, match=r"args.model is 'SiT-B/2' \(hidden 768, patch 2\)"):
        uc.load(rewrite("e2e", tmp_path, named_b2), **E2E_HEADS)
    heads = common.model_heads
    assert heads(Path("x"), 1152, 1, "SiT-XL/1", None) == 16
    assert heads(Path("x"), 768, 2, "SiT-B/2", None) == 12
    assert heads(Path("x"), 1152, 2, None, None) == 16
    assert heads(Path("x"), 1024, 2, "custom", None) == 16
    with pytest.raises(UCGMError, match="contradicts"):
        heads(Path("x"), 1152, 1, "SiT-XL/1", 8)

    def no_null(ckpt: dict) -> None:
        ckpt["args"].cfg_prob = 0.0
    with pytest.raises(UCGMError, match="cfg_prob"):
        uc.load(rewrite("e2e", tmp_path, no_null), **E2E_HEADS)


def test_convert_round_trip_is_bit_identical(tmp_path: Path, models: dict[str, uc.GenerativeModel]) -> None:
    fx = expected("e2e")
    result = CliRunner().invoke(app, ["convert", str(FIXTURES / "e2e.pt"), "--out", str(tmp_path / "cli"),
                                      "--num-heads", "2"])
    assert result.exit_code == 0, result.output
    for folder in (tmp_path / "cli", uc.save_checkpoint(models["e2e"], tmp_path / "api")):
        loaded = uc.load(folder)
        assert loaded.config == models["e2e"].config
        assert torch.equal(loaded(fx["x"], fx["t"], fx["y"]), models["e2e"](fx["x"], fx["t"], fx["y"]))
        assert loaded.vae_state.keys() == models["e2e"].vae_state.keys()
        assert all(torch.equal(loaded.vae_state[k], v) for k, v in models["e2e"].vae_state.items())


@pytest.mark.parametrize("name", list(ARCH))
def test_guided_sampling_runs(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    model = models[name]
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 9])
    out = uc.sample(uc.guided(model, 2.0, (0, 1)), noise, transport=model.transport, steps=3, y=y)
    assert out.shape == noise.shape and torch.isfinite(out).all()
