"""Hostile input, generated: config.json files, recipe YAML files and flag values that are wrong.

For each example: exit status 2, exactly one `error:` line, no traceback, nothing written outside
(or inside) --out, and the process's peak memory stays within a small bound of where it started.
"""

from __future__ import annotations

import copy
import json
import resource
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.recipe import recipe_text

runner = CliRunner()
EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MEMORY_BOUND = 1 << 30  # bytes of peak-RSS growth allowed over a whole test

not_a_number = st.one_of(st.text(max_size=12).filter(lambda s: not _numeric(s)), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans())
huge = st.integers(min_value=2**31, max_value=2**80)
negative = st.integers(max_value=-1)
bad_count = st.one_of(not_a_number, huge, negative, st.floats(allow_nan=True).filter(lambda x: x != int(x)
                                                                                         if x == x and abs(x) < 1e300
                                                                                         else True))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(args: list[str], root: Path, out: Path) -> None:
    before = _tree(root)
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
    assert "Traceback" not in result.output
    assert _tree(root) == before, args  # nothing created or changed anywhere under the test folder
    assert not out.exists(), args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    ckpt = uc.save_checkpoint(tiny_model(), root / "tiny")
    return {"root": root, "ckpt": ckpt, "config": json.loads((ckpt / "config.json").read_text()),
            "peak": _peak()}


CONFIG_FIELDS = {
    "family": st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
    "arch": st.one_of(st.text(max_size=10).filter(lambda s: s not in ("sit", "ddt", "lightningdit", "edm2-unet")),
                      st.integers(), st.none()),
    "transport": st.one_of(st.text(max_size=10).filter(lambda s: s.lower() not in {t.lower() for t in uc.TRANSPORTS}),
                           st.integers()),
    "num_classes": st.one_of(not_a_number, negative, st.just(0), huge),
    "null_class": st.one_of(not_a_number, negative, st.integers(min_value=6, max_value=2**40)),
    "latent_shape": st.one_of(st.lists(st.integers(1, 8), max_size=2), st.lists(st.integers(1, 8), min_size=4),
                              st.just([3, 2**20, 2**20]), st.just([3, 9, 8]), st.lists(not_a_number, min_size=3,
                                                                                        max_size=3)),
    "vae": st.one_of(not_a_number.filter(lambda v: not isinstance(v, dict)),
                     st.just({"name": "sd-vae"}), st.just({"name": "identity", "latent_std": 0})),
    "sampling": st.one_of(st.just({"steps": 0}), st.just({"steps": "many"}), st.just({"steps": 3, "gaps": [0.9, 0.9]})),
    "format_version": st.integers(min_value=2, max_value=10**6),
}
ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")


@given(field=st.sampled_from(sorted(CONFIG_FIELDS)), data=st.data())
@EXAMPLES
def test_hostile_config_json(workspace: dict[str, Any], field: str, data: st.DataObject) -> None:
    config = copy.deepcopy(workspace["config"])
    config[field] = data.draw(CONFIG_FIELDS[field])
    _check_config(workspace, config)


@given(field=st.sampled_from(ARCH_FIELDS), value=st.one_of(bad_count, st.just(10**9), st.just(0)))
@EXAMPLES
def test_hostile_architecture_hyperparameters(workspace: dict[str, Any], field: str, value: Any) -> None:
    config = copy.deepcopy(workspace["config"])
    config["arch_kwargs"][field] = value
    _check_config(workspace, config)


def _check_config(workspace: dict[str, Any], config: dict[str, Any]) -> None:
    folder = workspace["root"] / "hostile-ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes((workspace["ckpt"] / "model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    out = workspace["root"] / "out"
    _refused(["sample", "--checkpoint", str(folder), "--num", "1", "--steps", "1", "--out", str(out)],
             workspace["root"], out)
    assert _peak() - workspace["peak"] < MEMORY_BOUND


RECIPE_FIELDS = {
    "family": st.text(max_size=8).filter(lambda s: s.lower() not in ("ucgm", "edm2", "ddt", "lightningdit", "repa-e")),
    "resolution": st.one_of(not_a_number, negative, st.just(0)),
    "transport": st.one_of(st.integers(), st.text(max_size=6).filter(lambda s: s.lower() not in
                                                                      {t.lower() for t in uc.TRANSPORTS})),
    "num_classes": st.one_of(not_a_number, negative, st.just(0)),
    "sampling": st.one_of(not_a_number, st.just({"steps": -1}), st.just({"steps": 2, "order": 3}),
                          st.just({"steps": 2, "time_dist": [1, 1]}), st.just({"steps": 2, "cfg_scale": 0})),
    "tuning": st.one_of(not_a_number, st.just({"enhanced": "x", "huber_eps": 1.0})),
    "colour": st.integers(),
}


@given(field=st.sampled_from(sorted(RECIPE_FIELDS)), data=st.data())
@EXAMPLES
def test_hostile_recipe_yaml(workspace: dict[str, Any], field: str, data: st.DataObject) -> None:
    recipe = yaml.safe_load(recipe_text("demo"))
    recipe[field] = data.draw(RECIPE_FIELDS[field])
    path = workspace["root"] / "hostile.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = workspace["root"] / "out"
    _refused(["sample", "--from", str(path), "--num", "1", "--out", str(out)], workspace["root"], out)


@given(text=st.text(max_size=200))
@EXAMPLES
def test_any_text_as_a_recipe_file(workspace: dict[str, Any], text: str) -> None:
    path = workspace["root"] / "text.yaml"
    path.write_text(text)
    out = workspace["root"] / "out"
    _refused(["sample", "--from", str(path), "--num", "1", "--out", str(out)], workspace["root"], out)


BAD_INT = st.sampled_from(["-5", "abc", "1.5", "", "99999999999999999999999", "0x10", "nan"])
BAD_FLOAT = st.sampled_from(["nan", "inf", "-inf", "abc", "", "1e999", "-1"])
COMMANDS = {
    "sample": (["sample", "--num", "1"], {"--steps": BAD_INT, "--order": BAD_INT, "--num": BAD_INT, "--seed": BAD_INT,
                                          "--batch-size": BAD_INT, "--extrapolation": BAD_FLOAT, "--cfg": BAD_FLOAT,
                                          "--stochasticity": BAD_FLOAT, "--gaps": st.sampled_from(["1", "a,b", ".6,.6"]),
                                          "--time-dist": st.sampled_from(["1,1", "0,1,1", "x"]),
                                          "--dtype": st.sampled_from(["int8", "float64", ""]),
                                          "--device": st.sampled_from(["cuda:7", "meta", "toaster", "cuda", ""]),
                                          "--num-heads": BAD_INT, "--classes": st.sampled_from(["x", "99", "-1"])}),
    "eval fid": (["eval", "fid", "--ref", "missing.npz"], {"--num": BAD_INT, "--chunk-size": BAD_INT,
                                                          "--steps": BAD_INT, "--cfg-interval": st.just("0.9,0.1")}),
    "tune": (["tune"], {"--lr": BAD_FLOAT, "--global-batch": BAD_INT, "--ema-decay": st.sampled_from(["2", "-1", "x"]),
                        "--label-drop": st.sampled_from(["1.5", "-0.1", "x"]), "--betas": st.sampled_from(["0.9,1", "x"]),
                        "--save-every": BAD_INT, "--dtype": st.just("float16"), "--time-beta": st.just("0,1,1"),
                        "--weighting": st.just("Linear"), "--teacher": st.just("ema")}),
    "prepare-data": (["prepare-data", "missing-images"], {"--shard-size": BAD_INT, "--batch-size": BAD_INT,
                                                          "--workers": BAD_INT, "--resolution": BAD_INT,
                                                          "--pixel-range": st.just("0,255")}),
}


@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
@EXAMPLES
def test_hostile_flag_values(workspace: dict[str, Any], command: str, data: st.DataObject) -> None:
    base, flags = COMMANDS[command]
    flag = data.draw(st.sampled_from(sorted(flags)))
    value = data.draw(flags[flag])
    out = workspace["root"] / "out"
    _refused([*base, "--out", str(out), flag, value], workspace["root"], out)
