"""`ucgm tune` (UCGM-T few-step tuning): outputs, exact step semantics, kill -9 + resume, NaN stop,
input errors, precision options and the demo recipe.

Every run uses the tiny SiT of conftest.py (3x8x8, 5 classes) and a tiny latent dataset written
in the prepared-data format (`meta.json` + `shard-*.safetensors`) under tmp_path. Torch runs on
one thread (here and in subprocesses): faster on a busy 2-core machine, and bit-reproducible.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when, tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.formats.latent_folder import write_latent_folder
from ucgm_convert.jobs.tune import TuneConfig, TuneDiverged, chunk_seed, latest_checkpoint
from ucgm_convert.jobs.tune import run as tune
from ucgm_convert.jobs.tune.data import batch_indices
from ucgm_convert.recipe import load_recipe

runner = CliRunner()
N = 48  # dataset size
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(path: Path, **tuning: object) -> Path:
    """The demo recipe retargeted to the tiny model (5 classes, no default checkpoint)."""
    text = (REPO / "recipes" / "demo.yaml").read_text()
    text = text.replace("num_classes: 10", "num_classes: 5").replace("checkpoint: embedded:demo", "checkpoint: null")
    text = text.replace("name: demo", "name: tiny")
    for key, value in tuning.items():
        text = re.sub(rf"(?m)^(  {key}:) .*$", rf"\1 {value}", text)
    path.write_text(text)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A tiny model, a tiny latent dataset (3 shards) and a recipe for them."""
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    g = torch.Generator().manual_seed(1)
    data = write_latent_folder(tmp_path / "data", torch.randn(N, 3, 8, 8, generator=g), torch.arange(N) % 5,
                               shard_size=20)
    return {"ckpt": ckpt, "data": data, "recipe": tiny_recipe(tmp_path / "tiny.yaml"), "tmp": tmp_path}


def base_args(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["tune", "--from", str(s["recipe"]), "--checkpoint", str(s["ckpt"]), "--data", str(s["data"]),
            "--out", str(out), "--global-batch", "8", "--lr", "1e-3", "--sample-every", "0", *extra]


def config(s: dict[str, Path], out: Path, **kw: object) -> TuneConfig:
    args = dict(out=out, recipe=str(s["recipe"]), checkpoint=str(s["ckpt"]), data=str(s["data"]), global_batch=8,
                lr=1e-3, sample_every=0)
    args.update(kw)
    return TuneConfig.flat(**args)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def state(ckpt: Path) -> dict:
    return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)


def test_cli_run_writes_our_format_metrics_grids_and_few_step_defaults(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "out"
    result = runner.invoke(app, base_args(setup, out, "--steps", "4", "--batch-size", "4", "--save-every", "2",
                                          "--sample-every", "2", "--num-samples", "4"))
    assert result.exit_code == 0, result.output
    # OUT is a checkpoint folder in our format with the recipe's few-step sampler as defaults.
    recipe = load_recipe(setup["recipe"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sampling"] == recipe.few_step_sampling.to_dict() and cfg["recipe"] == "tiny"
    saved = load_recipe(out / "recipe.yaml")
    assert saved.tuning.steps == 4 and saved.tuning.lr == 1e-3 and saved.tuning.global_batch == 8
    assert (out / "README.md").is_file()
    # Checkpoints every 2 steps, the newest two kept, `last` -> newest; EMA in OUT = the last checkpoint's.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (out / "last").resolve() == (out / "checkpoints" / "step-000004").resolve()
    final = weights(out)
    assert all(torch.equal(final[k], v) for k, v in weights(out / "last").items())
    initial = weights(setup["ckpt"])
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    st = state(out / "last")
    assert st["step"] == 4 and st["sampler"]["samples_seen"] == 32 and "state" in st["optimizer"]
    assert {"cpu", "cuda"} <= set(st["rng"]) and st["recipe"]["tuning"]["lr"] == 1e-3
    assert st["tune_config"]["batch_size"] == 4
    # One metrics line per step; grids from fixed noise at 0, 2, 4.
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "time"} <= set(m) and m["lr"] == 1e-3 for m in lines)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step-00000{i}.png" for i in (0, 2, 4)]
    # `ucgm sample --checkpoint OUT` uses the 2-step few-step sampler without flags.
    result = runner.invoke(app, ["sample", "--checkpoint", str(out), "--num", "2", "--out", str(setup["tmp"] / "s")])
    assert result.exit_code == 0, result.output
    assert re.search(r"steps\s+│ 2\b", result.output) and re.search(r"NFE per sample\s+│ 2\b", result.output)
    assert "stored sampling settings" in " ".join(result.output.split())

    # Resume refuses changed math, allows more steps.
    result = runner.invoke(app, base_args(setup, out, "--steps", "6", "--batch-size", "4", "--resume", "--lr", "2e-3"))
    assert result.exit_code == 2 and "lr" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, base_args(setup, out, "--steps", "6", "--batch-size", "4", "--resume"))
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6] and state(out / "last")["step"] == 6


def test_one_step_is_the_mean_over_chunks_of_the_objective(setup: dict[str, Path]) -> None:
    """The documented step: global batch -> chunks of --batch-size, each chunk's t/z from chunk_seed,
    the UCGM objective per chunk, mean gradient, clip, RAdam; EMA decay 0. The label drop is rounded
    over the global batch (round(0.25 * 8) = 2: the last two rows, both in chunk 1), not per chunk
    (which dropped one row of each)."""
    out = setup["tmp"] / "out"
    tune(config(setup, out, steps=1, batch_size=4, ema_decay=0.0, label_drop=0.25))
    recipe = load_recipe(setup["recipe"])
    student = tiny_model().train().requires_grad_(True)
    student.net.pos_embed.requires_grad_(False)
    teacher = tiny_model().eval().requires_grad_(False)
    kwargs = {**recipe.objective_kwargs(), "label_drop": 0.25}
    obj = uc.UCGMObjective(**kwargs)
    lat = torch.cat([load_file(str(setup["data"] / f"shard-0000{i}.safetensors"))["latents"] for i in range(3)])
    labels = torch.arange(N) % 5
    idx = batch_indices(N, 8, 0, 0)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.RAdam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for c, chunk in enumerate(idx.view(2, 4)):
        torch.manual_seed(chunk_seed(0, 0, c))
        t, z = obj.sample_t(4), torch.randn(4, 3, 8, 8)
        (obj(student, lat[chunk], labels[chunk], teacher=teacher, t=t, z=z, ndrop=2 * c) / 2).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.tuning.grad_clip)
    opt.step()
    assert metrics(out)[0]["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-5)
    got = weights(out)  # EMA with decay 0 = the student
    for name, value in student.net.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state(out / "last")["student"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_run(setup: dict[str, Path]) -> None:
    steps = 40
    killed = setup["tmp"] / "killed"
    args = base_args(setup, killed, "--steps", str(steps), "--batch-size", "4", "--save-every", "2",
                     "--keep-checkpoints", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "ucgm_convert", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    def at_step_4() -> bool:
        ckpt = latest_checkpoint(killed)
        return ckpt is not None and int(ckpt.name[5:]) >= 4

    sigkill_when(proc, at_step_4, timeout=120)
    killed_at = int(latest_checkpoint(killed).name[5:])
    assert 4 <= killed_at < steps and not (killed / "model.safetensors").exists()

    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    reference = setup["tmp"] / "reference"
    assert runner.invoke(app, base_args(setup, reference, "--steps", str(steps), "--batch-size", "4",
                                        "--save-every", "2")).exit_code == 0

    got, want = metrics(killed), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    torch.testing.assert_close(torch.tensor([m["loss"] for m in got]), torch.tensor([m["loss"] for m in want]),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor([m["grad_norm"] for m in got]),
                               torch.tensor([m["grad_norm"] for m in want]), rtol=1e-6, atol=1e-7)
    for name, value in weights(reference).items():
        torch.testing.assert_close(weights(killed)[name], value, rtol=1e-6, atol=1e-7)
    ref_student, got_student = state(reference / "last")["student"], state(killed / "last")["student"]
    for name, value in ref_student.items():
        torch.testing.assert_close(got_student[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_falls_back_past_a_damaged_checkpoint(setup: dict[str, Path], damage: str) -> None:
    """The newest checkpoint's train_state.pt is damaged: --resume says so, continues from the one before,
    and ends where an uninterrupted run ends."""
    out, reference = setup["tmp"] / f"damaged-{damage}", setup["tmp"] / f"reference-{damage}"
    tune(config(setup, out, steps=4, save_every=2, keep_checkpoints=0))
    state_file = out / "checkpoints" / "step-000004" / "train_state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x04junk" * 50)
    result = runner.invoke(app, [*base_args(setup, out, "--steps", "6", "--save-every", "2", "--keep-checkpoints", "0"),
                                 "--resume"])
    assert result.exit_code == 0, result.output
    notes = " ".join(result.output.split())
    assert "step-000004/train_state.pt" in notes and "falling back to" in notes and "step-000002" in notes, notes
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    tune(config(setup, reference, steps=6, save_every=2))
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics(out)]),
                               torch.tensor([m["loss"] for m in metrics(reference)]), rtol=1e-6, atol=1e-7)
    for name, value in weights(reference).items():
        torch.testing.assert_close(weights(out)[name], value, rtol=1e-6, atol=1e-7)


def test_resume_with_every_checkpoint_damaged_is_one_line(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "all-damaged"
    tune(config(setup, out, steps=2, save_every=2))
    (out / "checkpoints" / "step-000002" / "train_state.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, [*base_args(setup, out, "--steps", "4"), "--resume"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "every checkpoint is damaged" in lines[0] and "train_state.pt" in lines[0] and "--overwrite" in lines[0]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup: dict[str, Path]) -> None:
    lat = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    bad = int(batch_indices(N, 8, 0, 2)[5])  # a sample of the third global batch (step 3) only
    lat[bad, 1, 2, 3] = float("nan")
    data = write_latent_folder(setup["tmp"] / "nan", lat, torch.arange(N) % 5)
    out = setup["tmp"] / "out"
    with pytest.raises(TuneDiverged, match=r"step 3: the loss is nan.*step-000002 \(step 2\)"):
        tune(config(setup, out, data=str(data), steps=6, save_every=2))
    assert latest_checkpoint(out).name == "step-000002"
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert not (out / "model.safetensors").exists()
    # On the command line: one line, exit status 2.
    result = runner.invoke(app, base_args(setup, setup["tmp"] / "cli", "--data", str(data), "--steps", "6"))
    assert result.exit_code == 2 and "step 3: the loss is nan" in result.output
    assert "no checkpoint had been saved yet" in result.output and "Traceback" not in result.output


def _bad_data(s: dict[str, Path], kind: str) -> Path:
    folder = s["tmp"] / kind
    if kind == "missing":
        return folder
    if kind == "empty":
        folder.mkdir()
        return folder
    if kind == "shape":
        return write_latent_folder(folder, torch.randn(8, 4, 8, 8), torch.arange(8) % 5)
    return write_latent_folder(folder, torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 7, 0, 1]))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"--data .*missing: no such folder"),
        ("empty", r"--data .*empty: the folder is empty"),
        ("shape", r"latents have shape \[4, 8, 8\] \(C, H, W\) but the model expects \[3, 8, 8\]"),
        ("labels", r"1 label\(s\) outside the model's classes \[0, 4\] \(first: sample 5 has label 7\)"),
        ("out-file", r"--out .*: exists and is not a folder"),
        ("out-unwritable", r"--out .*: cannot write here"),
        ("family", r"--from repa-e: the recipe is for 'repa-e' models but .* is a 'ucgm' model"),
        ("batch", r"--global-batch 8 is not divisible by --batch-size 3 x 1 process\(es\) = 3"),
        ("no-data", r"--data: pass a prepared latent folder"),
        ("existing-run", r"holds a previous tuning run \(checkpoints\); pass --resume to continue it, --overwrite"),
        ("dtype", r"--dtype: expected one of 'auto', 'float32', 'bfloat16', got 'float16' \(float16 would need loss scaling"),
        ("bad-override", r"--consistency: expected a number in \[0, 1\], got 2"),
    ],
)
def test_bad_input_is_one_clear_error_before_training(setup: dict[str, Path], case: str, message: str) -> None:
    out = setup["tmp"] / "out"
    args = base_args(setup, out, "--steps", "2")
    if case in ("missing", "empty", "shape", "labels"):
        args += ["--data", str(_bad_data(setup, case))]
    elif case == "out-file":
        out.write_text("not a folder")
    elif case == "out-unwritable":
        blocker = setup["tmp"] / "blocker"
        blocker.write_text("")
        args += ["--out", str(blocker / "sub")]
    elif case == "family":
        args += ["--from", "repa-e"]
    elif case == "batch":
        args += ["--batch-size", "3"]
    elif case == "no-data":
        args = [a for a in args if a != str(setup["data"]) and a != "--data"]
    elif case == "existing-run":
        (out / "checkpoints").mkdir(parents=True)
    elif case == "dtype":
        args += ["--dtype", "float16"]
    elif case == "bad-override":
        args += ["--consistency", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().startswith("error:")
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (out / "metrics.jsonl").exists() if out.is_dir() else True


def test_grad_checkpointing_is_exact_and_bfloat16_trains(setup: dict[str, Path]) -> None:
    plain, ckpt, bf16 = (setup["tmp"] / n for n in ("plain", "ckpt", "bf16"))
    tune(config(setup, plain, steps=2))
    tune(config(setup, ckpt, steps=2, grad_checkpointing=True))
    for name, value in weights(plain).items():
        torch.testing.assert_close(weights(ckpt)[name], value, rtol=1e-6, atol=1e-7)
    assert set(state(ckpt / "last")["student"]) == set(state(plain / "last")["student"])  # keys unchanged
    tune(config(setup, bf16, steps=2, dtype="bfloat16"))
    got, want = metrics(bf16), metrics(plain)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in got)
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=0.05) and got[0]["loss"] != want[0]["loss"]
    assert all(v.dtype == torch.float32 for v in weights(bf16).values())


def test_from_demo_uses_demo_data_by_default(tmp_path: Path) -> None:
    """--from demo: the demo recipe and the demo shapes (16x16, 10 classes) without --data."""
    config16 = uc.ModelConfig(family="ucgm", arch="sit", arch_kwargs=dict(
        input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10),
        transport="Linear", num_classes=10, latent_shape=(3, 16, 16))
    torch.manual_seed(0)
    ckpt = uc.save_checkpoint(uc.GenerativeModel.build(config16), tmp_path / "m16")
    out = tmp_path / "out"
    result = runner.invoke(app, ["tune", "--from", "demo", "--checkpoint", str(ckpt), "--out", str(out),
                                 "--steps", "2", "--global-batch", "8", "--demo-size", "64", "--sample-every", "1",
                                 "--num-samples", "10"])
    assert result.exit_code == 0, result.output
    assert "demo shapes" in result.output
    assert json.loads((out / "config.json").read_text())["sampling"] == load_recipe("demo").few_step_sampling.to_dict()
    assert len(list((out / "samples").iterdir())) == 3


def test_embedded_demo_model_tunes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["tune", "--from", "demo", "--out", str(out), "--steps", "1", "--global-batch", "4",
                                 "--demo-size", "64", "--sample-every", "0"])
    assert result.exit_code == 0, result.output
    assert uc.load(out).cfg.sampling.steps == 2


def test_the_tuned_card_names_its_base_model_and_has_no_unconditional_task(setup: dict[str, Path]) -> None:
    recipe = setup["recipe"]
    recipe.write_text(recipe.read_text().replace("checkpoint: null", "checkpoint: null\nbase_model: alice/tiny-base"))
    out = setup["tmp"] / "out"
    tune(config(setup, out, steps=1))
    assert json.loads((out / "config.json").read_text())["base_model"] == "alice/tiny-base"
    card = (out / "README.md").read_text()
    assert "base_model: alice/tiny-base" in card and "pipeline_tag" not in card and "class-conditional" in card


def test_enhanced_style_is_printed_counted_and_recorded(setup: dict[str, Path]) -> None:
    """--enhanced-style fc-vs-fe: the settings table names it and counts its extra teacher forward (2 teacher
    rows + 2 central-difference rows without gradient); recipe.yaml, train_state.pt and the card record it."""
    out = setup["tmp"] / "out"
    result = runner.invoke(app, base_args(setup, out, "--steps", "1", "--batch-size", "4",
                                          "--enhanced-style", "fc-vs-fe"))
    assert result.exit_code == 0, result.output
    assert re.search(r"enhanced 1\.3 \(fc-vs-fe, frame\s+(│\s+│\s+)?transport\)", result.output)
    assert re.search(r"1 with gradient \+ 4\s+│?\s*without", result.output)
    assert load_recipe(out / "recipe.yaml").tuning.enhanced_style == "fc-vs-fe"
    assert state(out / "last")["recipe"]["tuning"]["enhanced_style"] == "fc-vs-fe"
    assert "enhanced_style: fc-vs-fe" in (out / "README.md").read_text()
    result = runner.invoke(app, base_args(setup, setup["tmp"] / "bad", "--enhanced-style", "fc-vs-zz"))
    assert result.exit_code == 2 and "fc-vs-xz" in result.output and "Traceback" not in result.output
