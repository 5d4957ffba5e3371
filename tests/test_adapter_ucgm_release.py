"""UCGM's own checkpoints (LINs-lab/UCGM main.py format): detection, outputs, the stored config, bad configs.

tests/fixtures/ucgm_release/ is written by scripts/fixtures/make_ucgm_release.py from the reference checkout:
tiny SiT-S/2 (SD-VAE, Linear), LightningDiT-S/1 (VA-VAE, ReLinear), DDT-XL/2 (SD-VAE, ReLinear), TiT-S/1
(VA-VAE, Linear: UCGM's own network) and EDM2-S (EDM2's SD-VAE latents, EDM) of the reference's networks/*.py
saved as {"model", "ema", "opt", "unigen", "config"} with the config of one of its configs/*/*.yaml, and the
reference networks' EMA outputs (`expected.safetensors`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_cli_families import check_sample_output, invoke, one_error_line, tiny_vae_folder

import ucgm_convert as uc
from ucgm_convert.adapters import detect_family
from ucgm_convert.errors import UCGMError
from ucgm_convert.jobs.source import ArchOverrides, ModelSource, resolve

FIXTURES = Path(__file__).parent / "fixtures" / "ucgm_release"
STATS = FIXTURES / "lightningdit_stats.pt"
CASES = ("sit", "lightningdit", "tit", "ddt", "edm2")
EDM2_STATS = FIXTURES / "edm2_stats.pt"
OVERRIDES = {"lightningdit": {"latent_stats": str(STATS)}, "tit": {"latent_stats": str(STATS)},
             "edm2": {"latent_stats": str(EDM2_STATS)}}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "expected.safetensors"))


def _container(case: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{case}.pt", weights_only=True)


def _edited(case: str, tmp_path: Path, edit: Any) -> Path:
    """A copy of the fixture with `edit(container)` applied (to the config or the weights)."""
    obj = copy.deepcopy(_container(case))
    edit(obj)
    path = tmp_path / f"{case}-edited.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", CASES)
def test_detected_as_a_ucgm_checkpoint(case: str) -> None:
    """Not as the family of its network (a LightningDiT or SiT container also passes their checks)."""
    assert detect_family(FIXTURES / f"{case}.pt").name == "ucgm-release"


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_the_reference_networks(case: str, expected: dict[str, torch.Tensor]) -> None:
    model = uc.load(FIXTURES / f"{case}.pt", **OVERRIDES.get(case, {}))
    with torch.no_grad():
        out = model(expected[f"{case}/x"], expected[f"{case}/t"], expected[f"{case}/y"])
    torch.testing.assert_close(out, expected[f"{case}/out"], rtol=1e-5, atol=2e-5)
    # the EMA weights are the ones sampled (the reference's eval.py), not the online `model`
    ema, online = _container(case)["ema"], _container(case)["model"]
    state = model.net.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert not all(torch.equal(state[k], online[k]) for k in online if online[k].is_floating_point())


def test_stored_config_is_honoured() -> None:
    """Transport, classes, latent grid, VAE and latent scaling, guidance channels and UCGM-S settings."""
    sit = uc.load(FIXTURES / "sit.pt")
    assert (sit.transport.name, sit.num_classes, sit.null_class, sit.latent_shape) == ("Linear", 10, 10, (4, 8, 8))
    vae = sit.cfg.vae
    assert (vae.name, vae.source, vae.latent_mean, vae.pixel_range) == ("sd-vae", "stabilityai/sd-vae-ft-ema", 0.0,
                                                                        "-1,1")
    assert vae.latent_std == pytest.approx(1 / 0.18215)  # latent_norm false, latent_multiplier 0.18215
    s = sit.cfg.sampling  # sample: 2 steps, stochast_ratio 1.0, rfba_gap_steps [0.001, 0.6], cfg_scale 0.0
    assert (s.steps, s.order, s.stochasticity, s.extrapolation) == (2, 1, 1.0, 0.0)
    assert (s.time_dist, s.gaps, s.cfg_scale, s.cfg_interval) == ((1.0, 1.0, 1.0), (0.001, 0.6), 1.0, (0.0, 0.75))
    ldit = uc.load(FIXTURES / "lightningdit.pt", latent_stats=str(STATS))
    stats = torch.load(STATS, weights_only=True)
    assert (ldit.family, ldit.transport.name, ldit.guidance_channels, ldit.cfg.vae.name) == (
        "lightningdit", "ReLinear", 3, "ldm-f16d32")
    assert ldit.cfg.vae.latent_mean == pytest.approx(stats["mean"].flatten().tolist())
    assert ldit.cfg.vae.latent_std == pytest.approx(stats["std"].flatten().tolist())
    tit = uc.load(FIXTURES / "tit.pt", latent_stats=str(STATS))  # UCGM's own TiT: trained with Linear
    assert (tit.family, tit.transport.name, tit.guidance_channels) == ("ucgm-release", "Linear", None)
    assert tit.cfg.arch_kwargs["norm_weights"] is False and tit.cfg.arch_kwargs["use_qknorm"] is True
    edm = uc.load(FIXTURES / "edm2.pt", latent_stats=str(EDM2_STATS))  # latent_norm true, multiplier 1.0
    stats = torch.load(EDM2_STATS, weights_only=True)
    assert (edm.family, edm.cfg.arch, edm.transport.name, edm.latent_shape) == ("edm2", "edm2-unet", "EDM", (4, 8, 8))
    assert (edm.cfg.vae.source, edm.cfg.vae.pixel_range) == ("stabilityai/sd-vae-ft-mse", "0,1")
    assert edm.cfg.vae.latent_std == pytest.approx(stats["std"].flatten().tolist())
    assert (edm.cfg.sampling.steps, edm.cfg.sampling.extrapolation) == (40, 0.4)
    ddt = uc.load(FIXTURES / "ddt.pt")
    assert (ddt.family, ddt.transport.name, ddt.cfg.sampling.gaps) == ("ddt", "ReLinear", (0.001, 0.5))
    assert (ddt.cfg.arch_kwargs["depth"], ddt.cfg.arch_kwargs["encoder_depth"]) == (2, 1)


def test_latent_norm_without_statistics_warns() -> None:
    with pytest.warns(UserWarning, match="latent-stats"):
        model = uc.load(FIXTURES / "lightningdit.pt")
    assert model.cfg.vae.latent_mean == 0.0 and model.cfg.vae.latent_std == 1.0


def test_a_changed_config_changes_the_model(tmp_path: Path) -> None:
    """The values come from the file's config, not from defaults: edit it and the loaded model follows."""
    def edit(obj: dict[str, Any]) -> None:
        obj["config"]["transport"]["type"] = "TrigLinear"
        obj["config"]["sample"].update(sampling_steps=7, cfg_scale=1.5, stochast_ratio="Auto", type="UNI")
        obj["config"]["vae"]["type"] = "sdvae_f8c4"

    model = uc.load(_edited("sit", tmp_path, edit))
    assert model.transport.name == "TrigLinear" and model.cfg.vae.source == "stabilityai/sd-vae-ft-mse"
    assert (model.cfg.sampling.steps, model.cfg.sampling.cfg_scale, model.cfg.sampling.stochasticity) == (7, 1.5,
                                                                                                        "auto")
    with pytest.warns(UserWarning, match="not UCGM-S"):
        ode = uc.load(_edited("sit", tmp_path, lambda o: o["config"]["sample"].update(type="ODE")))
    assert ode.cfg.sampling is None


def _set(section: str, key: str, value: Any) -> Any:
    return lambda obj: obj["config"][section].__setitem__(key, value)


BAD = [
    ("sit", _set("model", "in_chans", 8), "config.model.in_chans is 8 but the 'ema' weights have 4"),
    ("sit", _set("data", "num_classes", 1000), "config.data.num_classes is 1000 but the 'ema' weights have 10"),
    ("sit", _set("data", "image_size", 128), "config.data.image_size / vae.downsample_ratio is 16"),
    ("sit", _set("model", "type", "SiT-S/1"), "patch size is 1 but the 'ema' weights have 2"),
    ("lightningdit", _set("model", "type", "LightningDiT-XL/1"), "heads is 16 but the 'ema' weights have 6"),
    ("sit", _set("model", "type", "UNet+"), "the reference's UNet+ network is not supported"),
    ("edm2", _set("model", "in_chans", 3), "config.model.in_chans is 3 but the 'ema' weights have 4"),
    ("tit", _set("model", "type", "TiT-XL/1"), "heads is 16 but the 'ema' weights have 6"),
    ("sit", _set("model", "type", "SiT-Huge/2"), "expected SiT-SIZE/PATCH"),
    ("sit", _set("model", "type", "Mamba-XL/2"), "unknown network 'Mamba-XL/2'"),
    ("sit", _set("transport", "type", "Curvy"), "config: transport.type"),
    ("sit", _set("vae", "type", "mystery_f8c4"), "config: vae.type"),
    ("sit", _set("sample", "sampling_order", 3), "config.sample (as UCGM-S settings): order"),
    ("sit", lambda obj: obj["config"].pop("data"), "config: data: missing required key"),
    ("sit", lambda obj: obj.__setitem__("config", ["not", "a", "mapping"]), "does not look like a 'ucgm-release' checkpoint"),
    ("ddt", lambda obj: obj["ema"].pop("blocks.0.mlp.w1.weight"), "missing keys: blocks.0.mlp.w1.weight"),
]


@pytest.mark.parametrize("case, edit, words", BAD, ids=[w[:40] for _, _, w in BAD])
def test_bad_or_mismatched_config_is_one_error_line(case: str, edit: Any, words: str, tmp_path: Path) -> None:
    path = _edited(case, tmp_path, edit)
    with pytest.raises(UCGMError) as info:
        uc.load(path, family="ucgm-release", **OVERRIDES.get(case, {}))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and words in message, message


def test_overrides_it_cannot_use_are_refused() -> None:
    with pytest.raises(UCGMError, match="unknown override"):
        uc.load(FIXTURES / "sit.pt", num_heads=6)


def test_from_the_matching_recipe_and_from_the_stored_settings() -> None:
    """--from lightningdit: the recipe's settings (its family matches); no --from: the file's own."""
    with pytest.warns(UserWarning):
        own = resolve(ModelSource(checkpoint=str(FIXTURES / "lightningdit.pt")), ArchOverrides())
        recipe = resolve(ModelSource(recipe="lightningdit", checkpoint=str(FIXTURES / "lightningdit.pt")),
                         ArchOverrides())
    assert own.sampling.steps == 2 and own.sampling.gaps == (0.001, 0.6)
    assert recipe.recipe.family == recipe.model.family and recipe.sampling.steps == 50


def test_sample_command_uses_the_stored_settings(tmp_path: Path) -> None:
    """`ucgm sample --checkpoint release.pt`: images from the stored UCGM-S settings; a bad file is one line."""
    vae = tiny_vae_folder(tmp_path / "vae4", 4)
    code, _, stderr = invoke("sample", "--checkpoint", str(FIXTURES / "sit.pt"), "--vae", str(vae), "--steps", "2",
                             "--num", "2", "--seed", "0", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    model = uc.load(FIXTURES / "sit.pt")
    check_sample_output(tmp_path / "out", model, model.load_vae(vae), factor=2)
    bad = _edited("sit", tmp_path, _set("model", "in_chans", 8))
    code, _, stderr = invoke("sample", "--checkpoint", str(bad), "--vae", str(vae), "--steps", "2", "--out",
                             str(tmp_path / "bad"))
    assert code != 0 and "model.in_chans" in one_error_line(stderr)
