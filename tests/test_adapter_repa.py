"""REPA adapter: outputs equal upstream's on a tiny random SiT saved in REPA's train.py container.

tests/fixtures/repa/ is made by scripts/fixtures/make_repa.py from sihyun-yu/REPA @67f7145 (its docstring
says how): repa.pt = {model, ema, opt, args, steps}, a "SiT-T/2" (depth 2, hidden 32, 2 heads, patch 2,
4 channels, 8x8 latents, 10 classes) with one projector; expected.pt = upstream's model(x, t, y)[0], its
linear interpolant and a 2-step euler_sampler run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.adapters import detect_family, get_family
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError

FIXTURES = Path(__file__).parent / "fixtures"
REPA = FIXTURES / "repa" / "repa.pt"
ATOL = 1e-5
HEADS = {"num_heads": 2}  # hidden 32 is no upstream size: heads cannot come from args.model or the size table
ARCH = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "mlp_ratio": 4.0, "num_classes": 10, "qk_norm": False}


def read(path: Path) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return read(FIXTURES / "repa" / "expected.pt")


@pytest.fixture(scope="module")
def model() -> uc.GenerativeModel:
    return uc.load(REPA, **HEADS)


def rewrite(folder: Path, edit: Any, name: str = "repa.pt") -> Path:
    """A copy of the fixture after `edit(container)` (in place; a returned value replaces the container)."""
    ckpt = read(REPA)
    ckpt = edit(ckpt) or ckpt
    torch.save(ckpt, folder / name)
    return folder / name


def test_matches_upstream(model: uc.GenerativeModel, expected: dict[str, torch.Tensor]) -> None:
    assert model.family == "repa" and model.cfg.arch == "sit" and model.cfg.arch_kwargs == ARCH
    assert model.transport.name == "Linear" and model.recipe == "repa"
    assert model.num_classes == 10 and model.null_class == 10 and model.latent_shape == (4, 8, 8)
    spec = model.cfg.vae.to_dict()
    assert spec["name"] == "sd-vae" and spec["source"] == "stabilityai/sd-vae-ft-ema"
    assert spec["latent_mean"] == 0.0 and spec["latent_std"] == pytest.approx(1 / 0.18215)
    out = model(expected["x"], expected["t"], expected["y"])
    torch.testing.assert_close(out, expected["out"], atol=ATOL, rtol=0)


def test_samples_from_ema_and_drops_the_projectors(capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = read(REPA)
    loaded = uc.load(REPA, **HEADS)
    assert "dropped 6 projectors.* tensors (REPA projection MLPs" in capsys.readouterr().err
    weights = loaded.net.state_dict()
    assert not any(k.startswith("projectors.") for k in weights)
    assert {k for k in ckpt["ema"] if not k.startswith("projectors.")} == set(weights)
    assert torch.equal(weights["final_layer.linear.weight"], ckpt["ema"]["final_layer.linear.weight"])
    assert not torch.equal(weights["final_layer.linear.weight"], ckpt["model"]["final_layer.linear.weight"])


def test_transport_and_euler_steps_match_upstream(model: uc.GenerativeModel,
                                                  expected: dict[str, torch.Tensor]) -> None:
    """REPA's linear interpolant is our Linear, and 2 UCGM-S steps without gaps are its euler_sampler."""
    t, T = expected["t"].view(-1, 1, 1, 1), model.transport
    torch.testing.assert_close(T.alpha_in(t) * expected["noise"] + T.gamma_in(t) * expected["x"], expected["path_in"])
    torch.testing.assert_close(T.alpha_to(t) * expected["noise"] + T.gamma_to(t) * expected["x"],
                               expected["path_target"])
    got = uc.sample(model, expected["euler_noise"], transport=T, steps=2, gaps=(0.0, 0.0), y=expected["euler_y"])
    torch.testing.assert_close(got, expected["euler"], atol=ATOL, rtol=0)


def test_released_bare_state_dict_and_legacy_names(tmp_path: Path, expected: dict[str, torch.Tensor]) -> None:
    """The released last.pt is the EMA state dict itself; legacy files name the later blocks decoder_blocks.N."""
    bare = rewrite(tmp_path, lambda ckpt: ckpt["ema"], "last.pt")
    legacy = rewrite(tmp_path, lambda ckpt: {k.replace("blocks.1.", "decoder_blocks.0.", 1): v
                                             for k, v in ckpt["ema"].items()}, "legacy.pt")
    assert any(k.startswith("decoder_blocks.0.") for k in read(legacy))
    for path in (bare, legacy):
        assert detect_family(path).name == "repa"
        loaded = uc.load(path, **HEADS)
        torch.testing.assert_close(loaded(expected["x"], expected["t"], expected["y"]), expected["out"], atol=ATOL,
                                   rtol=0)


def test_told_apart_from_repa_e(tmp_path: Path) -> None:
    """REPA-E files (bn latent statistics, args.vae) stay REPA-E; REPA files are not REPA-E's."""
    for name in ("e2e.pt", "ldm.pt"):
        assert detect_family(FIXTURES / "repa_e" / name).name == "repa-e"
        assert not get_family("repa").detect(FIXTURES / "repa_e" / name)
    bare_repa_e = tmp_path / "ema.pt"
    torch.save(read(FIXTURES / "repa_e" / "e2e.pt")["ema"], bare_repa_e)
    assert detect_family(bare_repa_e).name == "repa-e"
    assert detect_family(REPA).name == "repa"

    def named_vae(ckpt: dict) -> None:
        ckpt["args"].vae = "f8d4"
    assert detect_family(rewrite(tmp_path, named_vae)).name == "repa-e"


def test_unsupported_paths_and_bad_files_are_one_error_line(tmp_path: Path) -> None:
    def cosine(ckpt: dict) -> None:
        ckpt["args"].path_type = "cosine"

    def cut_final_layer(ckpt: dict) -> None:  # fails after the projectors are dropped: still no note line
        ckpt["ema"]["final_layer.linear.weight"] = ckpt["ema"]["final_layer.linear.weight"][:8]
    runner = CliRunner()
    for edit, words in ((cosine, "args.path_type is 'cosine'"), (cut_final_layer, "final_layer.linear.weight")):
        result = runner.invoke(app, ["convert", str(rewrite(tmp_path, edit)), "--out", str(tmp_path / "out"),
                                     "--num-heads", "2"])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert words in lines[0] and "Traceback" not in result.stderr

    def no_table(ckpt: dict) -> None:
        del ckpt["ema"]["y_embedder.embedding_table.weight"]
    with pytest.raises(UCGMError, match="missing keys: y_embedder.embedding_table.weight"):
        get_family("repa").load(rewrite(tmp_path, no_table), **HEADS)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(REPA.read_bytes()[:5000])
    with pytest.raises(UCGMError, match="truncated.pt"):
        uc.load(truncated, family="repa")
    with pytest.raises(UCGMError, match="num_heads"):
        uc.load(REPA)  # hidden 32: heads must be given
    with pytest.raises(UCGMError, match="accepted: num_heads"):
        uc.load(REPA, latent_stats="x.pt")


def test_convert_round_trip_and_guided_sampling(tmp_path: Path, model: uc.GenerativeModel,
                                                expected: dict[str, torch.Tensor]) -> None:
    folder = uc.save_checkpoint(model, tmp_path / "converted")
    loaded = uc.load(folder)
    assert loaded.config == model.config
    assert torch.equal(loaded(expected["x"], expected["t"], expected["y"]),
                       model(expected["x"], expected["t"], expected["y"]))
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    out = uc.sample(uc.guided(model, 1.8, (0.0, 0.7)), noise, transport=model.transport, steps=3,
                    y=torch.tensor([0, 9]))
    assert out.shape == noise.shape and torch.isfinite(out).all()
