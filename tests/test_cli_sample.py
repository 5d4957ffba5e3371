"""`ucgm sample`: settings resolution, outputs, batch-size invariance and clean errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.seeding import initial_noise, sample_generators
from ucgm_convert.vae import decode, to_uint8

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["sample", *args])
    return result.exit_code, result.output


def images(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


def test_writes_adm_npz_and_png_grid(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "7", "--out", str(tmp_path / "o"))
    assert code == 0, output
    arr, labels = images(tmp_path / "o")
    assert arr.shape == (7, 8, 8, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert Image.open(tmp_path / "o" / "grid.png").size[0] > 8
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid.png", "samples.npz"]
    assert "Effective settings" in output and "steps" in output


@pytest.mark.parametrize("extra", [[], ["--stochasticity", "0.5", "--cfg", "2.0", "--cfg-interval", "0.2,0.9"]])
def test_batch_size_changes_no_image(tiny_checkpoint: Path, tmp_path: Path, extra: list[str]) -> None:
    results = []
    for batch_size in ("7", "3", "1"):
        out = tmp_path / f"b{batch_size}"
        code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "7", "--batch-size", batch_size,
                           "--steps", "4", "--seed", "3", "--out", str(out), *extra)
        assert code == 0, output
        results.append(images(out)[0])
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_sample_i_is_uc_sample_from_its_own_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "3", "--steps", "5", "--classes", "4,2",
                       "--extrapolation", "0.3", "--seed", "11", "--out", str(tmp_path / "o"))
    assert code == 0, output
    arr, labels = images(tmp_path / "o")
    assert labels.tolist() == [4, 2, 4]
    model = uc.load(tiny_checkpoint)
    for i in range(3):
        noise = initial_noise(sample_generators(11, [i]), model.latent_shape)
        x = uc.sample(model, noise, transport="Linear", steps=5, extrapolation=0.3, y=torch.tensor([labels[i]]))
        assert np.array_equal(to_uint8(decode(x, {"name": "identity"}))[0].numpy(), arr[i])
    code, _ = run("--checkpoint", str(tiny_checkpoint), "--num", "3", "--steps", "5", "--seed", "12",
                  "--out", str(tmp_path / "p"))
    assert not np.array_equal(images(tmp_path / "p")[0], arr)


def test_flags_override_checkpoint_defaults(tiny_checkpoint: Path, tmp_path: Path) -> None:
    outs = {}
    for steps in ("3", "6"):
        code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "2", "--steps", steps,
                           "--out", str(tmp_path / steps))
        assert code == 0, output
        assert f"NFE per sample          │ {steps}" in output
        outs[steps] = images(tmp_path / steps)[0]
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "2", "--out", str(tmp_path / "d"))
    assert np.array_equal(images(tmp_path / "d")[0], outs["3"])  # the stored default is 3 steps
    assert not np.array_equal(outs["3"], outs["6"])


def test_low_precision_autocast_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "2", "--dtype", "bfloat16",
                       "--out", str(tmp_path / "bf"))
    assert code == 0, output
    assert images(tmp_path / "bf")[0].shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gaps", "a,b"], "--gaps: expected"),
        (["--gaps", "0.6,0.5"], "--gaps: .*start \\+ end < 1"),
        (["--time-dist", "1,0,1"], "--time-dist: expected"),
        (["--order", "3"], "--order: expected"),
        (["--steps", "0"], "--steps: expected"),
        (["--stochasticity", "1.5"], "--stochasticity: expected"),
        (["--stochasticity", "lots"], "--stochasticity: expected a number in \\[0, 1\\] or 'auto'"),
        (["--cfg", "0"], "--cfg-scale: expected a number > 0"),
        (["--classes", "9"], "--classes: class ids must be in \\[0, 4\\]"),
        (["--dtype", "float8"], "--dtype: expected one of 'float32', 'bfloat16', 'float16'"),
        (["--device", "toaster"], "--device: not a torch device"),
        (["--solver", "rk4"], "--solver: expected one of 'ucgm', 'multistep', 'multistep-pc'"),
        (["--solver", "multistep", "--order", "2"], "solver 'multistep' evaluates the model once per step: order must"),
        (["--encoder-refresh", "2"], "--encoder-refresh: .* no shareable condition encoder"),
        (["--encoder-refresh", "0"], "--encoder-refresh: expected an integer in \\[1, 10000\\], got 0"),
    ],
)
def test_bad_flags_give_one_clear_line(tiny_checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "2", "--out", str(tmp_path / "o"), *args)
    assert code == 2
    assert "Traceback" not in output
    assert __import__("re").search(message, output), output
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_bad_sources_give_one_clear_line(tmp_path: Path) -> None:
    code, output = run("--checkpoint", str(tmp_path / "nothing.pt"), "--steps", "2")
    assert code == 2 and "no such file or folder" in output and "Traceback" not in output
    code, output = run("--from", "no-such-recipe")
    assert code == 2 and "repa-e" in output and "Traceback" not in output
    code, output = run("--from", "repa-e")
    assert code == 2 and "pass --checkpoint" in output


@pytest.mark.slow
def test_module_entry_point_and_help_show_defaults() -> None:
    result = subprocess.run([sys.executable, "-m", "ucgm_convert", "sample", "--help"], capture_output=True,
                            text=True, env={"COLUMNS": "200", "PATH": ""}, check=True)
    assert "--batch-size" in result.stdout and "default: 16" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ucgm_convert", "--help"], capture_output=True, text=True,
                            check=True)
    assert "sample" in result.stdout and "recipes" in result.stdout


def test_cfg_channels_follows_the_model_policy_unless_all(tmp_path: Path) -> None:
    from conftest import tiny_model

    model = tiny_model()
    model.cfg = model.cfg.replace(guidance_channels=1)  # as LightningDiT declares 3: guidance touches the first channel only
    path = uc.save_checkpoint(model, tmp_path / "ck")
    outs = {}
    for policy in ("model", "all"):
        code, output = run("--checkpoint", str(path), "--num", "3", "--cfg", "3.0", "--cfg-channels", policy,
                           "--out", str(tmp_path / policy))
        assert code == 0, output
        outs[policy] = images(tmp_path / policy)[0]
    code, output = run("--checkpoint", str(path), "--num", "3", "--cfg", "3.0", "--out", str(tmp_path / "default"))
    assert np.array_equal(images(tmp_path / "default")[0], outs["model"])
    assert not np.array_equal(outs["model"], outs["all"])
    code, output = run("--checkpoint", str(path), "--num", "3", "--cfg-channels", "some", "--out", str(tmp_path / "x"))
    assert code == 2 and "--cfg-channels" in output


def test_solver_and_encoder_refresh_flags(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = run("--checkpoint", str(tiny_checkpoint), "--num", "2", "--steps", "5", "--solver", "multistep-pc",
                       "--seed", "3", "--out", str(tmp_path / "pc"))
    assert code == 0, output
    model = uc.load(tiny_checkpoint)
    noise = initial_noise(sample_generators(3, [0]), model.latent_shape)
    x = uc.sample(model, noise, transport="Linear", steps=5, solver="multistep-pc", y=torch.tensor([0]))
    assert np.array_equal(to_uint8(decode(x, {"name": "identity"}))[0].numpy(), images(tmp_path / "pc")[0][0])
