"""`ucgm tune --nproc 2` (DDP, gloo on CPU) equals the one-process run with the same global batch.

Both runs cut each global batch of 8 into the same chunks of --batch-size 2 (the 2-process run:
4 rows per process = 2 accumulation steps; the 1-process run: 4 accumulation steps), so the
label drop (0.5: the last row of every chunk) and each chunk's random t and z are the same;
DDP's gradient average over processes then equals the 1-process mean over chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import ucgm_convert as uc
from ucgm_convert.formats.latent_folder import write_latent_folder
from ucgm_convert.jobs.tune import TuneConfig
from ucgm_convert.jobs.tune import run as tune

pytestmark = pytest.mark.slow  # several processes

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path) -> Path:
    """The demo recipe retargeted to the tiny model (5 classes, no default checkpoint)."""
    text = (REPO / "recipes" / "demo.yaml").read_text().replace("name: demo", "name: tiny")
    path.write_text(text.replace("num_classes: 10", "num_classes: 5").replace("checkpoint: embedded:demo",
                                                                              "checkpoint: null"))
    return path


def test_two_processes_match_one_process(tmp_path: Path) -> None:
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    data = write_latent_folder(tmp_path / "data", torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                               torch.arange(32) % 5, shard_size=10)
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    common = ["--from", str(recipe), "--checkpoint", str(ckpt), "--data", str(data), "--steps", "3",
              "--global-batch", "8", "--batch-size", "2", "--label-drop", "0.5", "--lr", "1e-3", "--ema-decay", "0.5",
              "--sample-every", "0", "--save-every", "2"]
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    result = subprocess.run([sys.executable, "-m", "ucgm_convert", "tune", "--nproc", "2", "--device", "cpu",
                             "--out", str(two), *common], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tmp_path / "one"
        tune(TuneConfig.flat(out=one, recipe=str(recipe), checkpoint=str(ckpt), data=str(data), steps=3, global_batch=8,
                        batch_size=2, label_drop=0.5, lr=1e-3, ema_decay=0.5, sample_every=0, save_every=2))
    finally:
        torch.set_num_threads(threads)

    state_two = torch.load(two / "last" / "train_state.pt", weights_only=True)
    state_one = torch.load(one / "last" / "train_state.pt", weights_only=True)
    assert state_two["world_size"] == 2 and state_one["world_size"] == 1 and state_two["step"] == 3
    for name, value in state_one["student"].items():
        torch.testing.assert_close(state_two["student"][name], value, rtol=1e-4, atol=1e-6)
    ema_two, ema_one = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert ema_two.keys() == ema_one.keys()
    for name, value in ema_one.items():
        torch.testing.assert_close(ema_two[name], value, rtol=1e-4, atol=1e-6)
    initial = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(initial[k], v) for k, v in ema_one.items())
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    assert len(losses[0]) == 3
    # Only rank 0 wrote: one metrics file, no stray files.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_fsdp_two_processes_match_one_process_and_resume(tmp_path: Path) -> None:
    """`--nproc 2 --fsdp` (FSDP2 on gloo): same weights, EMA, optimizer state and losses as one
    process (the sharded gradients and optimizer are the same math); checkpoints hold full
    weights in the one-process format, and a run resumed from one under --fsdp ends the same."""
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    data = write_latent_folder(tmp_path / "data", torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                               torch.arange(32) % 5, shard_size=10)
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    common = ["--from", str(recipe), "--checkpoint", str(ckpt), "--data", str(data), "--steps", "3",
              "--global-batch", "8", "--batch-size", "2", "--label-drop", "0.5", "--lr", "1e-3", "--ema-decay", "0.5",
              "--sample-every", "0", "--save-every", "2", "--keep-checkpoints", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def fsdp_run(out: Path, *extra: str) -> None:
        result = subprocess.run([sys.executable, "-m", "ucgm_convert", "tune", "--nproc", "2", "--fsdp", "--device",
                                 "cpu", "--out", str(out), *common, *extra], env=env, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(FSDP)" in result.stderr

    two = tmp_path / "two"
    fsdp_run(two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tmp_path / "one"
        tune(TuneConfig.flat(out=one, recipe=str(recipe), checkpoint=str(ckpt), data=str(data), steps=3, global_batch=8,
                        batch_size=2, label_drop=0.5, lr=1e-3, ema_decay=0.5, sample_every=0, save_every=2,
                        keep_checkpoints=0))
    finally:
        torch.set_num_threads(threads)

    def same_as_one(run: Path) -> None:
        for step in ("step-000002", "step-000003"):
            state_run = torch.load(run / "checkpoints" / step / "train_state.pt", weights_only=True)
            state_one = torch.load(one / "checkpoints" / step / "train_state.pt", weights_only=True)
            assert state_run["world_size"] == 2 and state_one["world_size"] == 1
            assert state_run["student"].keys() == state_one["student"].keys()
            for name, value in state_one["student"].items():
                assert not hasattr(state_run["student"][name], "full_tensor")  # full tensors, not DTensor shards
                torch.testing.assert_close(state_run["student"][name], value, rtol=1e-4, atol=1e-6)
            opt_run, opt_one = state_run["optimizer"], state_one["optimizer"]
            assert opt_run["param_groups"] == opt_one["param_groups"]
            assert opt_run["state"].keys() == opt_one["state"].keys()
            for i, slots in opt_one["state"].items():
                for key, value in slots.items():
                    torch.testing.assert_close(opt_run["state"][i][key], value, rtol=1e-4, atol=1e-6)
        ema_run, ema_one = load_file(str(run / "model.safetensors")), load_file(str(one / "model.safetensors"))
        assert ema_run.keys() == ema_one.keys()
        for name, value in ema_one.items():
            torch.testing.assert_close(ema_run[name], value, rtol=1e-4, atol=1e-6)
        losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
                  for d in (one, run)]
        assert len(losses[0]) == 3
        torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
        assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one.iterdir())

    same_as_one(two)
    initial = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(initial[k], v) for k, v in load_file(str(one / "model.safetensors")).items())

    # Resume under --fsdp from the FSDP run's step-2 checkpoint (as if killed after it).
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    for name in ("model.safetensors", "config.json", "last"):
        (resumed / name).unlink()
    fsdp_run(resumed, "--resume")
    same_as_one(resumed)
