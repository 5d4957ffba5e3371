"""Recipes: the shipped YAML files hold the published settings, and bad files fail clearly."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import yaml
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.recipe import (
    PaperResult,
    Recipe,
    SamplingSettings,
    TuningSettings,
    apply_overrides,
    list_recipes,
    load_recipe,
    recipe_names,
    recipe_text,
)

NAMES = ["ddt-256", "ddt-512", "demo", "edm2-l", "edm2-s", "edm2-xxl", "lightningdit", "repa-e"]
REAL = [n for n in NAMES if n != "demo"]

# The published UCGM-S settings: LINs-lab/UCGM configs/sampling_multi_steps/*.yaml (sample:),
# with the reference's cfg_scale 0.0 ("no CFG") written as 1.0.
# name: (config, transport, steps, extrapolation, time_dist, gaps, cfg_scale, cfg_interval)
PUBLISHED_SAMPLING = {
    "repa-e": ("in1k256_sit_xl_repae_linear", "Linear", 40, 0.54, (1.2, 0.72, 1.2), (0.001, 0.002), 2.5, (0.0, 0.76)),
    "lightningdit": ("in1k256_lightningdit_xl_vavae_relinear", "ReLinear", 50, 0.5, (1.17, 0.8, 1.1),
                     (0.001, 0.001), 6.7, (0.125, 1.0)),
    "ddt-256": ("in1k256_ddt_xl_sdvae_relinear", "ReLinear", 50, 0.28, (1.17, 0.8, 1.1), (0.001, 0.001), 2.0, (0.3, 1.0)),
    "ddt-512": ("in1k512_ddt_xl_sdvae_relinear", "ReLinear", 150, 0.28, (1.17, 0.8, 1.1), (0.001, 0.001), 3.0,
                (0.3, 1.0)),
    "edm2-s": ("in1k512_edm2_s_sdvae_edm", "EDM", 40, 0.4, (1.17, 0.8, 1.1), (0.001, 0.001), 1.0, (0.0, 0.75)),
    "edm2-l": ("in1k512_edm2_l_sdvae_edm", "EDM", 50, 0.43, (1.17, 0.8, 1.1), (0.001, 0.001), 1.0, (0.0, 0.75)),
    "edm2-xxl": ("in1k512_edm2_xxl_sdvae_edm", "EDM", 40, 0.42, (1.17, 0.8, 1.1), (0.001, 0.001), 1.0, (0.0, 0.75)),
}

# name: (family, model, resolution, vae)
MODELS = {
    "repa-e": ("repa-e", "SiT-XL/1", 256, "REPA-E/e2e-vavae"),
    "lightningdit": ("lightningdit", "LightningDiT-XL/1", 256, "hustvl/vavae-imagenet256-f16d32-dinov2"),
    "ddt-256": ("ddt", "DDT-XL/2", 256, "stabilityai/sd-vae-ft-ema"),
    "ddt-512": ("ddt", "DDT-XL/2", 512, "stabilityai/sd-vae-ft-ema"),
    "edm2-s": ("edm2", "EDM2-S", 512, "stabilityai/sd-vae-ft-mse"),
    "edm2-l": ("edm2", "EDM2-L", 512, "stabilityai/sd-vae-ft-mse"),
    "edm2-xxl": ("edm2", "EDM2-XXL", 512, "stabilityai/sd-vae-ft-mse"),
}

# The UCGM README: (before NFE, FID) -> (after NFE, FID), and the UCGM-T 2-step FID.
PAPER = {
    "repa-e": (("250x2", 1.26), ("40x2", 1.06), 1.39),
    "lightningdit": (("250x2", 1.35), ("50x2", 1.21), 2.06),
    "ddt-256": (("250x2", 1.26), ("50x2", 1.27), 1.90),
    "edm2-s": (("63", 2.56), ("40", 2.53), None),
    "edm2-l": (("63", 2.06), ("50", 2.04), None),
    "edm2-xxl": (("63", 1.91), ("40", 1.88), None),
    "ddt-512": (("250x2", 1.28), ("150x2", 1.18), None),
}

# Few-step sampling end gap (configs/tuning_few_steps/*.yaml, or the closest published one) and
# tuning values (configs/training_few_steps/ for the VAE: enhanced_ratio, scaled_cbl_eps;
# configs/tuning_few_steps/: max_steps, global_batch_size).
# name: (end gap, enhanced, huber_eps, steps, global_batch, label_drop)
TUNING = {
    "repa-e": (0.75, 1.3, 9.0, 500, 1024, 0.1),
    "lightningdit": (0.6, 2.0, 5.0, 800, 1024, 0.1),
    "ddt-256": (0.5, 2.0, 5.0, 800, 512, 0.1),
    "ddt-512": (0.5, 1.5, 5.0, 800, 512, 0.1),
    "edm2-s": (0.5, 1.5, 5.0, 800, 1024, 0.0),
    "edm2-l": (0.5, 1.5, 5.0, 800, 1024, 0.0),
    "edm2-xxl": (0.5, 1.5, 5.0, 800, 1024, 0.0),
    "demo": (0.5, 1.3, 0.05, 100, 64, 0.1),
}


# --------------------------------------------------------------------------------------------
# The shipped recipes
# --------------------------------------------------------------------------------------------


def test_recipes_ship_as_package_data() -> None:
    files = sorted(
        entry.name for entry in resources.files("ucgm_convert.recipes").iterdir() if entry.name.endswith(".yaml")
    )
    assert files == [f"{n}.yaml" for n in NAMES]
    assert recipe_names() == NAMES


def test_every_recipe_loads_and_validates() -> None:
    recipes = list_recipes()
    assert [r.name for r in recipes] == NAMES
    for recipe in recipes:
        assert isinstance(recipe, Recipe)
        assert isinstance(recipe.sampling, SamplingSettings)
        assert isinstance(recipe.few_step_sampling, SamplingSettings)
        assert isinstance(recipe.tuning, TuningSettings)
        assert recipe.description and recipe.source
        assert uc.get_transport(recipe.transport).name == recipe.transport
        # The recipe builds the library's own objects.
        uc.UCGMObjective(**recipe.objective_kwargs())
        assert recipe.sample_kwargs()["transport"] == recipe.transport
        # YAML round trip.
        assert yaml.safe_load(recipe.to_yaml())["sampling"]["steps"] == recipe.sampling.steps


@pytest.mark.parametrize("name", REAL)
def test_real_models_have_no_default_checkpoint_and_name_their_sources(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.checkpoint is None
    assert recipe.num_classes == 1000
    config = PUBLISHED_SAMPLING[name][0]
    assert f"configs/sampling_multi_steps/{config}.yaml" in recipe.source
    assert f"configs/sampling_multi_steps/{config}.yaml" in recipe_text(name)
    assert "configs/training_few_steps/" in recipe.source
    assert "configs/tuning_few_steps/" in recipe.source


@pytest.mark.parametrize("name", sorted(PUBLISHED_SAMPLING))
def test_published_sampling_settings(name: str) -> None:
    _, transport, steps, extrapolation, time_dist, gaps, cfg, interval = PUBLISHED_SAMPLING[name]
    recipe = load_recipe(name)
    s = recipe.sampling
    assert recipe.transport == transport
    assert (s.steps, s.order, s.stochasticity, s.extrapolation) == (steps, 1, 0.0, extrapolation)
    assert s.time_dist == time_dist
    assert s.gaps == gaps
    assert s.cfg_scale == cfg
    assert s.cfg_interval == interval
    assert (recipe.family, recipe.model, recipe.resolution, recipe.vae) == MODELS[name]


def test_repa_e_values_spelled_out() -> None:
    r = load_recipe("repa-e")
    assert r.sampling.as_sample_kwargs() == {
        "steps": 40, "order": 1, "stochasticity": 0.0, "extrapolation": 0.54,
        "time_dist": (1.2, 0.72, 1.2), "gaps": (0.001, 0.002), "solver": "ucgm", "encoder_refresh": 1,
    }
    assert (r.sampling.cfg_scale, r.sampling.cfg_interval) == (2.5, (0.0, 0.76))
    assert r.sampling.guidance_kwargs() == {"scale": 2.5, "interval": (0.0, 0.76), "channels": None}
    assert r.sampling.replace(cfg_channels="all").guidance_kwargs()["channels"] == "all"
    assert r.transport == "Linear"
    assert r.sampling.nfe_label == "40x2" and r.sampling.nfe == 80


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_results_and_nfe_labels(name: str) -> None:
    (nfe0, fid0), (nfe1, fid1), tuned = PAPER[name]
    recipe = load_recipe(name)
    assert recipe.paper_before == PaperResult(nfe=nfe0, fid=fid0, note=recipe.paper_before.note)
    assert (recipe.paper_after.nfe, recipe.paper_after.fid) == (nfe1, fid1)
    # Our NFE count of the recipe's settings is the paper's.
    assert recipe.sampling.nfe_label == nfe1
    if tuned is None:
        assert recipe.paper_tuned is None
    else:
        assert (recipe.paper_tuned.nfe, recipe.paper_tuned.fid) == ("2", tuned)
        assert recipe.few_step_sampling.nfe_label == "2"


@pytest.mark.parametrize("name", NAMES)
def test_few_step_sampling_and_tuning(name: str) -> None:
    end_gap, enhanced, huber, steps, batch, label_drop = TUNING[name]
    recipe = load_recipe(name)
    f = recipe.few_step_sampling
    assert (f.steps, f.order, f.stochasticity, f.extrapolation) == (2, 1, 1.0, 0.0)
    assert f.time_dist == (1.0, 1.0, 1.0)
    assert f.gaps == (0.001, end_gap)
    assert f.cfg_scale == 1.0 and not f.uses_guidance
    t = recipe.tuning
    lr = 2e-3 if name == "demo" else 1e-4  # the demo's tiny model is tuned in 100 steps (recipes/demo.yaml)
    assert (t.optimizer, t.lr, t.betas, t.weight_decay, t.grad_clip) == ("RAdam", lr, (0.9, 0.999), 0.0, 0.1)
    assert (t.consistency, t.enhanced, t.huber_eps, t.enhanced_range) == (1.0, enhanced, huber, (0.0, 0.75))
    assert (t.time_beta, t.weighting, t.cosine_loss, t.teacher) == ((0.8, 1.0, 1.0), "Cosine", False, "frozen")
    assert (t.ema_decay, t.steps, t.global_batch, t.label_drop) == (0.99, steps, batch, label_drop)
    assert t.objective_kwargs() == {
        "consistency": 1.0, "enhanced": enhanced, "enhanced_range": (0.0, 0.75), "label_drop": label_drop,
        "huber_eps": huber, "cosine_loss": False, "weighting": "Cosine", "time_dist": (0.8, 1.0, 1.0),
    }


def test_unpublished_tuning_is_marked_as_adapted() -> None:
    for name in ("ddt-512", "edm2-s", "edm2-l", "edm2-xxl"):
        text = recipe_text(name)
        assert "NO tuning config" in text
        assert "closest" in load_recipe(name).source


def test_demo_recipe() -> None:
    r = load_recipe("demo")
    assert (r.family, r.model, r.resolution, r.transport, r.num_classes, r.vae, r.checkpoint) == (
        "ucgm", "SiT-demo", 16, "Linear", 10, "identity", "embedded:demo"
    )
    assert r.sampling == SamplingSettings(steps=16, cfg_scale=1.5)
    assert r.sampling == uc.load("embedded:demo").cfg.sampling  # the model's own defaults
    assert r.sampling.nfe_label == "16x2" and r.sampling.evaluations(r.transport) == 32
    assert r.paper_before is r.paper_after is r.paper_tuned is None
    assert "bench/demo_tune.py" in recipe_text("demo")  # where the demo tuning values were measured


def test_recipe_settings_drive_the_sampler() -> None:
    recipe = load_recipe("demo")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = uc.sample(lambda x_t, t: torch.zeros_like(x_t), noise, **recipe.sample_kwargs())
    assert x.shape == noise.shape
    x2 = uc.sample(lambda x_t, t: torch.zeros_like(x_t), noise, generator=torch.Generator().manual_seed(1),
                   **recipe.sample_kwargs(few_step=True))
    assert torch.isfinite(x2).all()


def test_nfe_counts() -> None:
    s = SamplingSettings(steps=40, cfg_scale=2.5, cfg_interval=(0.0, 0.76))
    assert (s.sampler_nfe, s.nfe, s.nfe_label) == (40, 80, "40x2")
    # Exact count: only the evaluations with t inside the interval are doubled.
    grid = uc.time_grid("Linear", 40)[:-1]
    inside = int(((grid >= 0.0) & (grid <= 0.76)).sum())
    assert 0 < inside < 40
    assert s.evaluations("Linear") == 40 + inside
    assert SamplingSettings(steps=40).nfe_label == "40"
    order2 = SamplingSettings(steps=9, order=2)
    assert order2.nfe == uc.count_nfe(9, 2) == 9 and order2.evaluations("Linear") == 9
    assert SamplingSettings(steps=9, order=2, gaps=(0.001, 0.0)).evaluations("Linear") == 10


def test_load_by_path_and_round_trip(tmp_path: Path) -> None:
    recipe = load_recipe("lightningdit")
    path = tmp_path / "mine.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(str(path)) == recipe
    assert load_recipe(path) == recipe
    # Without a name, the file name is the recipe's name.
    data = yaml.safe_load(recipe.to_yaml())
    del data["name"]
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump(data))
    assert load_recipe(str(other)).name == "other"
    assert load_recipe("REPA-E").name == "repa-e"


# --------------------------------------------------------------------------------------------
# Bad recipe files
# --------------------------------------------------------------------------------------------


def _base() -> dict[str, Any]:
    data = yaml.safe_load(load_recipe("repa-e").to_yaml())
    del data["name"]
    return data


def _write(tmp_path: Path, data: Any, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()

BAD_VALUES = [
    # (field path, bad value, words the message must contain)
    ("sampling.steps", "abc", "expected an integer in [1, 10000], got 'abc'"),
    ("sampling.steps", 0, "expected an integer in [1, 10000], got 0"),
    ("sampling.steps", 2.5, "expected an integer in [1, 10000]"),
    ("sampling.steps", True, "expected an integer in [1, 10000], got True"),
    ("sampling.order", 3, "expected an integer in [1, 2], got 3"),
    ("sampling.stochasticity", 1.5, "in [0, 1] or 'auto'"),
    ("sampling.stochasticity", "sometimes", "in [0, 1] or 'auto', got 'sometimes'"),
    ("sampling.extrapolation", -0.1, "expected a number >= 0"),
    ("sampling.time_dist", [1.0, 0.0, 1.0], "each > 0"),
    ("sampling.time_dist", [1.0, 1.0], "a list of 3 numbers"),
    ("sampling.gaps", [-0.001, 0.001], "each >= 0"),
    ("sampling.gaps", [0.5, 0.5], "start + end < 1"),
    ("sampling.cfg_scale", 0.0, "1.0 means no guidance"),
    ("sampling.cfg_scale", "strong", "expected a number > 0"),
    ("sampling.cfg_interval", [0.8, 0.2], "lo <= hi"),
    ("transport", "Curvy", "one of 'Linear', 'ReLinear', 'TrigFlow', 'EDM', got 'Curvy'"),
    ("family", "sd3", "one of 'ucgm', 'edm2', 'ddt', 'lightningdit', 'repa-e', got 'sd3'"),
    ("resolution", "256px", "expected an integer >= 1"),
    ("num_classes", 0, "expected an integer >= 1"),
    ("model", "", "not empty"),
    ("vae", 3, "expected a string"),
    ("sampling", [40], "expected a mapping with keys steps, order"),
    ("tuning.teacher", "ema", "one of 'frozen', 'online', got 'ema'"),
    ("tuning.optimizer", "SGD", "one of 'RAdam', 'Adam', 'AdamW'"),
    ("tuning.betas", [0.9, 1.0], "each in [0, 1)"),
    ("tuning.weighting", "Linear", "one of 'Cosine', 'none'"),
    ("tuning.cosine_loss", "yes please", "true or false"),
    ("tuning.enhanced_range", [0.75, 0.0], "lo <= hi"),
    ("tuning.global_batch", -1, "expected an integer >= 1"),
    ("paper_after.nfe", "lots", "an NFE such as"),
    ("paper_after.fid", -1.0, "expected a number > 0"),
]


@pytest.mark.parametrize("path,value,words", BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_bad_value_names_file_and_field(tmp_path: Path, path: str, value: Any, words: str) -> None:
    file = _write(tmp_path, _set(_base(), path, value))
    with pytest.raises(UCGMError) as info:
        load_recipe(file)
    message = str(info.value)
    assert message.startswith(f"{file}: {path}: "), message
    assert words in message, message
    assert "\n" not in message


def test_the_error_format_of_the_brief(tmp_path: Path) -> None:
    file = _write(tmp_path, _set(_base(), "sampling.steps", "abc"), "ddt-256.yaml")
    with pytest.raises(UCGMError, match=r"ddt-256\.yaml: sampling\.steps: expected an integer in \[1, 10000\], got 'abc'$"):
        load_recipe(file)


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    file = _write(tmp_path, _set(_base(), "sampling.stepz", 40))
    with pytest.raises(UCGMError) as info:
        load_recipe(file)
    message = str(info.value)
    assert message.startswith(f"{file}: sampling.stepz: unknown key")
    assert "did you mean 'steps'?" in message
    assert "allowed keys: steps, order, stochasticity, extrapolation, time_dist, gaps, cfg_scale, cfg_interval" in message

    file = _write(tmp_path, _set(_base(), "colour", "blue"))
    with pytest.raises(UCGMError, match=r"bad\.yaml: colour: unknown key; allowed keys: name, description, family"):
        load_recipe(file)


@pytest.mark.parametrize("path", ["sampling", "transport", "family", "sampling.steps", "tuning.enhanced",
                                  "tuning.huber_eps", "paper_after.fid"])
def test_missing_required_key(tmp_path: Path, path: str) -> None:
    file = _write(tmp_path, _set(_base(), path, _DELETE))
    with pytest.raises(UCGMError) as info:
        load_recipe(file)
    assert str(info.value).startswith(f"{file}: {path}: missing required key"), str(info.value)


def test_optional_sections_may_be_left_out(tmp_path: Path) -> None:
    data = _base()
    for key in ("few_step_sampling", "tuning", "paper_before", "paper_after", "paper_tuned", "checkpoint",
                "description", "source"):
        del data[key]
    data["sampling"] = {"steps": 10}
    recipe = load_recipe(_write(tmp_path, data))
    assert recipe.tuning is None and recipe.sampling == SamplingSettings(steps=10)
    with pytest.raises(UCGMError, match="has no tuning section"):
        recipe.objective_kwargs()


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = "family: repa-e\nmodel: SiT-XL/1\nsampling:\n  steps: [40\n  order: 1\n"
    file = _write(tmp_path, text)
    with pytest.raises(UCGMError) as info:
        load_recipe(file)
    message = str(info.value)
    assert message.startswith(f"{file}: line ")
    assert "invalid YAML" in message
    line = int(message.split("line ")[1].split(",")[0])
    assert 4 <= line <= 6


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    file = _write(tmp_path, "family: ddt\nfamily: edm2\n")
    with pytest.raises(UCGMError, match=r"bad\.yaml: line 2, column 1: invalid YAML: duplicate key 'family'"):
        load_recipe(file)


@pytest.mark.parametrize("text,words", [("", "the file is empty"), ("- a\n- b\n", "expected a mapping")])
def test_not_a_mapping(tmp_path: Path, text: str, words: str) -> None:
    file = _write(tmp_path, text)
    with pytest.raises(UCGMError, match=words):
        load_recipe(file)


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UCGMError) as info:
        load_recipe("nope")
    message = str(info.value)
    assert "unknown recipe 'nope'" in message
    assert "known recipes: " + ", ".join(NAMES) in message
    with pytest.raises(UCGMError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(UCGMError, match=r"^steps: expected an integer in \[1, 10000\], got 0$"):
        SamplingSettings(steps=0)
    with pytest.raises(UCGMError, match=r"^huber_eps: expected a number >= 0"):
        TuningSettings(enhanced=1.0, huber_eps=-1.0)
    with pytest.raises(UCGMError, match=r"^sampling\.gaps: "):
        Recipe(name="x", family="ucgm", model="m", resolution=8, transport="linear", num_classes=2, vae="identity",
               sampling={"steps": 4, "gaps": [0.6, 0.6]})
    recipe = Recipe(name="x", family="UCGM", model="m", resolution=8, transport="relinear", num_classes=2,
                    vae="identity", sampling={"steps": 4, "stochasticity": "Auto", "time_dist": "1, 2, 3"})
    assert (recipe.family, recipe.transport) == ("ucgm", "ReLinear")
    assert recipe.sampling.stochasticity == "auto" and recipe.sampling.time_dist == (1.0, 2.0, 3.0)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        recipe.sampling.steps = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Overrides (the CLI's flags)
# --------------------------------------------------------------------------------------------


def test_apply_overrides() -> None:
    base = load_recipe("repa-e").sampling
    new = apply_overrides(base, steps=20, cfg_scale=None, gaps=(0.001, 0.001), time_dist="1,1,1",
                          stochasticity="AUTO")
    assert (new.steps, new.cfg_scale, new.gaps, new.time_dist, new.stochasticity) == (
        20, 2.5, (0.001, 0.001), (1.0, 1.0, 1.0), "auto"
    )
    assert base.steps == 40  # the recipe is untouched
    assert apply_overrides(base) == base
    assert apply_overrides(base, steps=None, order=None) == base


@pytest.mark.parametrize("flags,words", [
    ({"steps": 0}, "--steps: expected an integer in [1, 10000], got 0"),
    ({"order": 5}, "--order: expected an integer in [1, 2], got 5"),
    ({"cfg_scale": -2.0}, "--cfg-scale: expected a number > 0, got -2.0"),
    ({"cfg_interval": (0.9, 0.1)}, "--cfg-interval: expected a list of 2 numbers, each in [0, 1], with lo <= hi"),
    ({"gaps": (0.6, 0.6)}, "--gaps: "),
    ({"stochasticity": 2.0}, "--stochasticity: "),
    ({"time_dist": "1,2"}, "--time-dist: expected a list of 3 numbers"),
    ({"speed": 3}, "--speed: not a sampling setting; known: --steps, --order"),
])
def test_apply_overrides_errors_name_the_flag(flags: dict[str, Any], words: str) -> None:
    with pytest.raises(UCGMError) as info:
        apply_overrides(SamplingSettings(steps=10), **flags)
    assert str(info.value).startswith(words), str(info.value)


def test_the_no_guidance_hint() -> None:
    with pytest.raises(UCGMError, match=r"^--cfg-scale: expected a number > 0, got 0 \(1\.0 means no guidance"):
        apply_overrides(SamplingSettings(steps=10), cfg_scale=0)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_list() -> None:
    result = runner.invoke(app, ["recipes", "list"])
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.stdout
    for text in ("SiT-XL/1", "LightningDiT-XL/1", "EDM2-XXL", "40x2", "150x2", "1.26 → 1.06", "ReLinear"):
        assert text in result.stdout


def test_cli_show() -> None:
    result = runner.invoke(app, ["recipes", "show", "repa-e"])
    assert result.exit_code == 0, result.output
    for text in ("repa-e", "SiT-XL/1", "Linear", "0.54", "[1.2, 0.72, 1.2]", "[0.001, 0.002]", "2.5",
                 "[0, 0.76]", "40x2", "RAdam", "1.39", "in1k256_sit_xl_repae_linear"):
        assert text in result.stdout, text


def test_cli_show_yaml_prints_the_file() -> None:
    result = runner.invoke(app, ["recipes", "show", "edm2-s", "--yaml"])
    assert result.exit_code == 0, result.output
    assert result.stdout == recipe_text("edm2-s")


def test_cli_show_unknown_name() -> None:
    result = runner.invoke(app, ["recipes", "show", "nope"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unknown recipe 'nope'" in lines[0]
    assert ", ".join(NAMES) in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_ddt_recipes_fix_the_published_encoder_split() -> None:
    for name in ("ddt-256", "ddt-512"):
        recipe = load_recipe(name)
        assert recipe.encoder_depth == 22
        assert recipe.load_overrides() == {"encoder_depth": 22}
        assert recipe.load_overrides({"encoder_depth": 20}) == {"encoder_depth": 20}  # the flag wins
    assert load_recipe("repa-e").load_overrides({"num_heads": 16}) == {"num_heads": 16}
