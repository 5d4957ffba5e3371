"""SiT and DiT adapters: outputs equal upstream's on tiny random models saved as the released state dicts.

tests/fixtures/sit/ and tests/fixtures/dit/ are made by scripts/fixtures/make_sit.py (willisma/SiT @947f95b)
and make_dit.py (facebookresearch/DiT @ed81ce2), whose docstrings say how: a tiny model of each (depth 2,
hidden 32, 2 heads, patch 2, 4 channels, 8x8 latents, 10 classes, learned sigma) saved as a bare EMA
state dict named like the releases; expected.pt holds upstream's outputs (SiT: model(x, t, y) and its
Linear path; DiT: model(x, k, y) with all 2C channels, q_sample, p_mean_variance's pred_xstart and a
3-step DDIM run).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.adapters import detect_family, dit, get_family
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.recipe import load_recipe
from ucgm_convert.sampler import time_grid

FIXTURES = Path(__file__).parent / "fixtures"
FILES = {"sit": FIXTURES / "sit" / "SiT-T-2-64.pt", "dit": FIXTURES / "dit" / "DiT-T-2-64.pt"}
ATOL = 1e-5
HEADS = {"num_heads": 2}  # hidden 32 is no upstream size
ARCH = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "mlp_ratio": 4.0, "num_classes": 10, "qk_norm": False, "learn_sigma": True}


def expected(family: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / family / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def models() -> dict[str, uc.GenerativeModel]:
    return {family: uc.load(path, **HEADS) for family, path in FILES.items()}


def dit_time(timesteps: torch.Tensor) -> torch.Tensor:
    """The DiscreteVP time of DiT timestep k: t = (k + 1) / 1000."""
    return ((timesteps.double() + 1) / 1000).float()


@pytest.mark.parametrize("family", list(FILES))
def test_config_and_learned_sigma(family: str, models: dict[str, uc.GenerativeModel]) -> None:
    model = models[family]
    assert model.family == family and model.cfg.arch == "sit" and model.cfg.arch_kwargs == ARCH
    assert model.transport.name == {"sit": "ReLinear", "dit": "DiscreteVP"}[family]
    assert model.num_classes == 10 and model.null_class == 10 and model.latent_shape == (4, 8, 8)
    assert model.guidance_channels == 3 == get_family(family).guidance_channels  # forward_with_cfg: eps[:, :3]
    assert model.net.final_layer.linear.weight.shape[0] == 2 * 4 * 2 * 2  # 2C channels per patch pixel
    assert model.cfg.vae.to_dict()["source"] == "stabilityai/sd-vae-ft-ema"
    assert model.cfg.vae.latent_std == pytest.approx(1 / 0.18215)


def test_sit_matches_upstream(models: dict[str, uc.GenerativeModel]) -> None:
    """Upstream's forward (sigma half dropped by it) and its Linear path = our ReLinear, t fed raw."""
    model, fx = models["sit"], expected("sit")
    torch.testing.assert_close(model(fx["x"], fx["t"], fx["y"]), fx["out"], atol=ATOL, rtol=0)
    t, T = fx["t"].view(-1, 1, 1, 1), model.transport
    torch.testing.assert_close(T.alpha_in(t) * fx["noise"] + T.gamma_in(t) * fx["x"], fx["path_in"])
    torch.testing.assert_close(T.alpha_to(t) * fx["noise"] + T.gamma_to(t) * fx["x"], fx["path_target"])


def test_dit_matches_upstream(models: dict[str, uc.GenerativeModel]) -> None:
    """Epsilon = upstream's first C channels at its timestep k; q_sample and pred_xstart through DiscreteVP."""
    model, fx = models["dit"], expected("dit")
    t = dit_time(fx["timesteps"])
    assert torch.equal(model.transport.network_time(t), fx["timesteps"].float())
    torch.testing.assert_close(model(fx["x"], t, fx["y"]), fx["out"][:, :4], atol=ATOL, rtol=0)
    tt, T = t.view(-1, 1, 1, 1), model.transport
    torch.testing.assert_close(T.alpha_in(tt) * fx["noise"] + T.gamma_in(tt) * fx["x"], fx["x_t"])
    x_hat, _ = T.predictions(fx["x_t"], model(fx["x_t"], t, fx["y"]), tt)
    torch.testing.assert_close(x_hat, fx["xstart"], atol=1e-4, rtol=1e-5)


def test_deterministic_ucgm_s_on_dit_steps_is_dits_ddim(models: dict[str, uc.GenerativeModel]) -> None:
    """3 UCGM-S steps (no noise, no extrapolation) whose grid is DiT timesteps 668, 334, 0 = DiT's own
    ddim_sample_loop("ddim3", eta 0): the update sqrt(abar') x_hat + sqrt(1 - abar') eps_hat is DDIM's."""
    model, fx = models["dit"], expected("dit")
    gaps = (1 - 0.669, 0.001)  # t = (k + 1) / 1000 for k = 668 ... 0
    grid = time_grid(model.transport, 3, gaps=gaps)
    torch.testing.assert_close(model.transport.network_time(grid[:3]), torch.tensor([668.0, 334.0, 0.0]))
    got = uc.sample(model, fx["ddim_noise"], transport=model.transport, steps=3, gaps=gaps, y=fx["ddim_y"])
    torch.testing.assert_close(got, fx["ddim"], atol=1e-4, rtol=1e-5)


def test_dit_recipe_by_resolution() -> None:
    for resolution, name in dit.RECIPES.items():
        recipe = load_recipe(name)
        assert recipe.family == "dit" and recipe.resolution == resolution and recipe.transport == "DiscreteVP"
    assert load_recipe("sit").family == "sit" and load_recipe("sit").transport == "ReLinear"


def test_bare_files_are_told_apart_by_name_or_family(tmp_path: Path, models: dict[str, uc.GenerativeModel]) -> None:
    """DiT and SiT state dicts have the same keys: the name decides, else detection refuses to guess."""
    assert detect_family(FILES["sit"]).name == "sit" and detect_family(FILES["dit"]).name == "dit"
    unnamed = tmp_path / "weights.pt"
    shutil.copy(FILES["dit"], unnamed)
    with pytest.raises(UCGMError, match=r"'sit' or 'dit'.*pass --family sit or --family dit"):
        detect_family(unnamed)
    fx = expected("dit")
    given = uc.load(unnamed, family="dit", **HEADS)
    assert torch.equal(given(fx["x"], dit_time(fx["timesteps"]), fx["y"]),
                       models["dit"](fx["x"], dit_time(fx["timesteps"]), fx["y"]))
    result = CliRunner().invoke(app, ["convert", str(unnamed), "--out", str(tmp_path / "out"), "--num-heads", "2"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--family" in lines[0]


def train_container(family: str, folder: Path, name: str, **args: Any) -> Path:
    """The fixture as train.py saves it: {"model", "ema", "opt", "args"} (args a Namespace)."""
    state = torch.load(FILES[family], weights_only=True)
    path = folder / name
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(**args)}, path)
    return path


def test_train_containers_are_detected_by_args_model(tmp_path: Path) -> None:
    sit_file = train_container("sit", tmp_path, "0100000.pt", model="SiT-T/2", path_type="Linear",
                               prediction="velocity")
    dit_file = train_container("dit", tmp_path, "sit-named.pt", model="DiT-T/2")
    assert detect_family(sit_file).name == "sit" and detect_family(dit_file).name == "dit"
    torch.testing.assert_close(uc.load(sit_file, **HEADS)(expected("sit")["x"], expected("sit")["t"],
                                                          expected("sit")["y"]), expected("sit")["out"], atol=ATOL,
                               rtol=0)
    with pytest.raises(UCGMError, match=r"args.model is 'DiT-XL/2' \(hidden 1152, patch 2\)"):
        uc.load(train_container("dit", tmp_path, "xl.pt", model="DiT-XL/2"))
    with pytest.raises(UCGMError, match="args.path_type is 'GVP'"):
        uc.load(train_container("sit", tmp_path, "gvp.pt", model="SiT-T/2", path_type="GVP", prediction="velocity"),
                **HEADS)


def test_licences_and_bad_input(tmp_path: Path) -> None:
    assert get_family("dit").license.spdx == "cc-by-nc-4.0" and get_family("sit").license.spdx == "mit"
    state = torch.load(FILES["sit"], weights_only=True)
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:24]
    torch.save(state, tmp_path / "SiT-bad.pt")
    with pytest.raises(UCGMError, match=r"final_layer.linear.weight has shape \[24, 32\]; expected \[16, 32\] or "
                                        r"\[32, 32\]"):
        uc.load(tmp_path / "SiT-bad.pt", **HEADS)
    with pytest.raises(UCGMError, match="accepted: num_heads"):
        uc.load(FILES["dit"], encoder_depth=2)


@pytest.mark.parametrize("family", list(FILES))
def test_guided_sampling_and_round_trip(family: str, tmp_path: Path, models: dict[str, uc.GenerativeModel]) -> None:
    model = models[family]
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    out = uc.sample(uc.guided(model, 1.5, (0.0, 1.0)), noise, transport=model.transport, steps=4,
                    y=torch.tensor([0, 9]))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    loaded = uc.load(uc.save_checkpoint(model, tmp_path / family))
    assert loaded.config == model.config
    t = torch.full((2,), 0.5)
    assert torch.equal(loaded(noise, t, torch.tensor([0, 9])), model(noise, t, torch.tensor([0, 9])))


@pytest.mark.parametrize("family", list(FILES))
def test_train_mode_drops_no_labels_as_the_reference_sit(family: str, models: dict[str, uc.GenerativeModel]) -> None:
    """Upstream SiT/DiT/REPA pretraining dropped labels (p = 0.1) in train mode, but the UCGM reference tunes
    SiT-architecture models with its networks/sit.py, whose class_dropout_prob is 0.0: train mode = eval mode."""
    model, fx = models[family], expected(family)
    t = fx["t"] if family == "sit" else dit_time(fx["timesteps"])
    evaluated = model(fx["x"], t, fx["y"])
    model.train()
    try:
        trained = [model(fx["x"], t, fx["y"]) for _ in range(3)]
    finally:
        model.eval()
    assert all(torch.equal(out, evaluated) for out in trained)
