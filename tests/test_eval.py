"""`ucgm eval fid` / `ucgm eval ref`: on-the-fly Inception features, results.json, 2 processes == 1
process, kill -9 + resume == uninterrupted, and clear errors for bad input.

The Inception network is torch-fidelity's FeatureExtractorInceptionV3 with random weights, saved
in the layout of torch-fidelity's weights file and loaded through --inception-weights, as users
load the real file offline. The model is the tiny SiT of conftest.py (8x8 images, 5 classes);
Inception resizes every image to 299x299, so runs stay at 10 samples. Torch runs on one thread
here and in the subprocesses (torchrun also gives each worker one thread): on CPU, features are
bit-identical across runs for the same per-process thread count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigkill_when, single_thread, tiny_model
from PIL import Image
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.generation import generate_batch
from ucgm_convert.jobs.evaluate.chunks import chunk_ranges, class_labels
from ucgm_convert.metrics.fid import (
    frechet_distance,
    inception_score,
    load_reference,
    save_reference,
    sha256_file,
)
from ucgm_convert.metrics.inception import (
    WEIGHTS_FILENAME,
    build_network,
    cache_path,
    load_inception,
)

runner = CliRunner()
NUM, CHUNK = 10, 2  # 5 chunks of 2 samples, 2 per class
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


pytestmark = pytest.mark.usefixtures("one_thread")


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random He-scaled weights, saved like its weights file (a state dict)."""
    net = build_network(None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
            elif isinstance(module, torch.nn.Linear):  # logits with some spread: a non-trivial Inception Score
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 2.0)
                module.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights, a tiny checkpoint, a reference built by `ucgm eval ref` from noise PNGs, and a baseline run."""
    root = tmp_path_factory.mktemp("eval")
    weights = random_inception_weights(root / WEIGHTS_FILENAME)
    ckpt = uc.save_checkpoint(tiny_model(), root / "tiny")
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    with single_thread():
        result = runner.invoke(app, ["eval", "ref", str(noise), "--out", str(root / "ref.npz"), "--device", "cpu",
                                     "--inception-weights", str(weights)])
        assert result.exit_code == 0, result.output
        base = root / "base"
        result = runner.invoke(app, fid_args(ckpt, root / "ref.npz", weights, base, "--save-images", "--save-npz"))
        assert result.exit_code == 0, result.output
    return {"root": root, "weights": weights, "ckpt": ckpt, "ref": root / "ref.npz", "base": base}


def fid_args(ckpt: Path, ref: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "fid", "--checkpoint", str(ckpt), "--ref", str(ref), "--num", str(NUM), "--chunk-size",
            str(CHUNK), "--batch-size", "3", "--steps", "2", "--seed", "7", "--device", "cpu",
            "--inception-weights", str(weights), "--out", str(out), *extra]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def numbers(out: Path) -> tuple:
    r = results(out)
    return r["fid"], r["inception_score"]["mean"], r["inception_score"]["std"], r["num_samples"]


def chunk(out: Path, k: int) -> dict[str, np.ndarray]:
    with np.load(out / "features" / f"chunk-{k:05d}.npz") as data:
        return {key: data[key] for key in data.files}


def assert_same_features(a: Path, b: Path) -> None:
    for k in range(NUM // CHUNK):
        ca, cb = chunk(a, k), chunk(b, k)
        for key in ("pool", "logits", "labels", "start", "stop", "key"):
            assert np.array_equal(ca[key], cb[key]), (k, key)


# ----- what a run computes and records -----------------------------------------------------------

def test_results_json_records_numbers_and_provenance(env: dict[str, Path]) -> None:
    r = results(env["base"])
    assert math.isfinite(r["fid"]) and r["fid"] > 0
    assert r["inception_score"]["mean"] >= 1.0 and r["inception_score"]["splits"] == 10  # 1 sample/split: 1.0
    assert r["num_samples"] == NUM and r["seed"] == 7 and r["chunk_size"] == CHUNK
    assert r["class_sampling"] == {"rule": "balanced: sample i has class i % num_classes", "num_classes": 5,
                                   "per_class_min": 2, "per_class_max": 2, "balanced": True}
    assert "round" in r["uint8_conversion"]
    assert r["reference"]["sha256"] == sha256_file(env["ref"]) and r["reference"]["resolution"] == [8, 8]
    assert r["evaluator"]["inception"]["name"] == "torch-fidelity"
    assert r["evaluator"]["inception"]["weights_sha256"] == sha256_file(env["weights"])
    assert set(r["versions"]) >= {"ucgm-convert", "torch", "torch-fidelity"}
    assert len(r["model"]["state_sha256"]) == 64 and r["model"]["family"] == "ucgm"
    assert r["sampling"]["settings"]["steps"] == 2 and r["image_resolution"] == [8, 8]
    assert sorted(p.name for p in (env["base"] / "features").iterdir()) == [f"chunk-{k:05d}.npz" for k in range(5)]


def test_samples_are_the_seeded_samples_and_features_are_their_inception_features(env: dict[str, Path]) -> None:
    """Sample i is generate_batch's sample i (seed, i); chunk features = Inception of those images; FID from them."""
    with np.load(env["base"] / "samples.npz") as data:  # the ADM evaluator's sample batch layout
        arr, labels = data["arr_0"], data["arr_1"]
    assert arr.shape == (NUM, 8, 8, 3) and arr.dtype == np.uint8 and labels.tolist() == [i % 5 for i in range(NUM)]
    model = uc.load(env["ckpt"])
    settings = model.cfg.sampling.replace(steps=2)
    _, want = generate_batch(model, settings, labels.tolist(), range(NUM), seed=7)
    assert np.array_equal(arr, want.numpy())
    for i in (0, 9):
        assert np.array_equal(np.asarray(Image.open(env["base"] / "images" / f"{i:06d}.png")), arr[i])

    inception = load_inception(env["weights"])  # chunk 1 (samples 2, 3) recomputed independently
    pool, logits = inception(arr[2:4])
    c1 = chunk(env["base"], 1)
    assert np.array_equal(c1["pool"], pool) and np.array_equal(c1["logits"], logits)
    chunks = [chunk(env["base"], k) for k in range(NUM // CHUNK)]
    x = np.concatenate([c["pool"] for c in chunks]).astype(np.float64)
    ref = load_reference(env["ref"])
    want_fid = frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref.mu, ref.sigma)
    assert results(env["base"])["fid"] == pytest.approx(want_fid, rel=1e-9)
    score = results(env["base"])["inception_score"]
    assert (score["mean"], score["std"]) == inception_score(np.concatenate([c["logits"] for c in chunks]))


def test_fid_matches_torch_fidelitys_own_pipeline(env: dict[str, Path]) -> None:
    """torch_fidelity.calculate_metrics on the run's PNGs vs the reference PNGs, same weights file."""
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=str(env["base"] / "images"), input2=str(env["root"] / "noise"), fid=True, cuda=False,
        batch_size=NUM, feature_extractor_weights_path=str(env["weights"]), cache=False, verbose=False,
        save_cpu_ram=True)  # no DataLoader worker processes
    # torch-fidelity takes eigvals of the non-symmetric sigma1 @ sigma2: round-off noise ~1e-5 here
    assert results(env["base"])["fid"] == pytest.approx(metrics["frechet_inception_distance"], rel=1e-4)


def test_identical_image_sets_give_zero_and_a_rerun_reuses_all_chunks(env: dict[str, Path]) -> None:
    """`eval ref` on the run's own PNGs -> FID ~ 0; rerunning with that --ref computes no chunk again."""
    same = env["root"] / "same.npz"
    result = runner.invoke(app, ["eval", "ref", str(env["base"] / "images"), "--out", str(same), "--device", "cpu",
                                 "--inception-weights", str(env["weights"]), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert load_reference(same).meta["num_images"] == NUM
    out = env["root"] / "same_run"
    shutil.copytree(env["base"], out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    result = runner.invoke(app, fid_args(env["ckpt"], same, env["weights"], out))
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == before
    r, first = results(out), numbers(env["base"])
    assert abs(r["fid"]) < 1e-6 * first[0] and r["reference"]["sha256"] == sha256_file(same)
    assert (r["inception_score"]["mean"], r["num_samples"]) == first[1::2]


def test_eval_ref_reads_an_adm_sample_batch_like_the_image_folder(env: dict[str, Path]) -> None:
    images = np.stack([np.asarray(Image.open(env["root"] / "noise" / f"{i}.png")) for i in range(4)])
    batch = env["root"] / "noise_batch.npz"
    np.savez(batch, arr_0=images, arr_1=np.zeros(4, np.int64))
    out = env["root"] / "ref_from_npz.npz"
    result = runner.invoke(app, ["eval", "ref", str(batch), "--out", str(out), "--device", "cpu",
                                 "--inception-weights", str(env["weights"])])
    assert result.exit_code == 0, result.output
    a, b = load_reference(out), load_reference(env["ref"])
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and a.meta == b.meta


# ----- sharding and resumption ---------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_give_bit_identical_features_and_numbers(env: dict[str, Path]) -> None:
    out = env["root"] / "two"
    result = subprocess.run([sys.executable, "-m", "ucgm_convert", *fid_args(env["ckpt"], env["ref"], env["weights"],
                                                                             out, "--nproc", "2")],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out)["num_processes"] == 2
    assert numbers(out) == numbers(env["base"])
    assert_same_features(out, env["base"])


def kill_9_then_resume(args: list[str], out: Path, chunks: int, env: dict[str, str], timeout: float) -> None:
    """Run `ucgm <args>` in a subprocess, kill -9 it once a feature chunk of `out` is on disk, then resume in
    this process; the chunks that survived must be reused as they are (not recomputed)."""
    proc = subprocess.Popen([sys.executable, "-m", "ucgm_convert", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    features = out / "features"
    sigkill_when(proc, lambda: features.is_dir() and len(list(features.glob("chunk-*.npz"))) >= 1, timeout=timeout)
    survivors = {p.name: p.stat().st_mtime_ns for p in features.glob("chunk-*.npz")}
    assert 1 <= len(survivors) < chunks and not (out / "results.json").exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {n: (features / n).stat().st_mtime_ns for n in survivors} == survivors

@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_numbers(env: dict[str, Path]) -> None:
    out = env["root"] / "killed"
    args = fid_args(env["ckpt"], env["ref"], env["weights"], out)
    kill_9_then_resume(args, out, NUM // CHUNK, ENV, timeout=300)
    assert numbers(out) == numbers(env["base"])
    assert_same_features(out, env["base"])
    labels = np.concatenate([chunk(out, k)["labels"] for k in range(NUM // CHUNK)])
    assert labels.tolist() == [i % 5 for i in range(NUM)]  # every sample exactly once


def test_other_settings_in_the_same_out_are_refused(env: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, fid_args(env["ckpt"], env["ref"], env["weights"], env["base"], "--seed", "8"))
    assert result.exit_code == 2 and "different seed" in result.output and "new --out" in result.output
    assert (env["base"] / "results.json").exists()  # refused before touching anything


# ----- bad input -----------------------------------------------------------------------------------

def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output, result.output
    text = " ".join(result.output[result.output.index("error:"):].split())  # after any settings table
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_reference_without_mu_sigma_or_with_wrong_dimension(env: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    result = runner.invoke(app, fid_args(env["ckpt"], bad, env["weights"], tmp_path / "o"))
    one_line_error(result, "expected keys 'mu' and 'sigma'", "ucgm eval ref")
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64))
    result = runner.invoke(app, fid_args(env["ckpt"], bad, env["weights"], tmp_path / "o"))
    one_line_error(result, "expected mu [2048]", "got mu [64]")
    assert not (tmp_path / "o").exists()


def test_num_must_be_a_multiple_of_the_classes(env: dict[str, Path], tmp_path: Path) -> None:
    args = fid_args(env["ckpt"], env["ref"], env["weights"], tmp_path / "o")
    args[args.index("--num") + 1] = "7"
    one_line_error(runner.invoke(app, args), "--num 7 is not a multiple of the model's 5 classes",
                   "--num 5 or 10", "--allow-unbalanced")
    assert class_labels(7, 5, allow_unbalanced=True) == [0, 1, 2, 3, 4, 0, 1]
    assert class_labels(50000, 1000)[:3] == [0, 1, 2] and class_labels(50000, 1000).count(999) == 50


def test_sample_resolution_must_match_the_reference(env: dict[str, Path], tmp_path: Path) -> None:
    ref = load_reference(env["ref"])
    ref16 = tmp_path / "ref16.npz"
    save_reference(ref16, ref.mu, ref.sigma, num_images=4, resolution=[16, 16], evaluator="torch-fidelity")
    out = tmp_path / "o"
    one_line_error(runner.invoke(app, fid_args(env["ckpt"], ref16, env["weights"], out)),
                   "samples are 8x8 but the reference", "16x16")
    assert not (out / "results.json").exists() and not list((out / "features").glob("*.npz"))


def test_eval_ref_refuses_mixed_image_sizes_and_empty_folders(env: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (16, 8)).save(folder / "b.png")
    args = ["eval", "ref", str(folder), "--out", str(tmp_path / "r.npz"), "--device", "cpu",
            "--inception-weights", str(env["weights"])]
    one_line_error(runner.invoke(app, args), "b.png: image is 8x16 (HxW)", "a.png is 8x8", "evaluation resolution")
    assert not (tmp_path / "r.npz").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    args[2] = str(empty)
    one_line_error(runner.invoke(app, args), "no images")


def test_missing_inception_weights_offline_names_the_file_and_the_cache_path(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("UCGM_INCEPTION_WEIGHTS", raising=False)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert cache_path() == expected
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    args = ["eval", "ref", str(folder), "--out", str(tmp_path / "r.npz"), "--device", "cpu"]
    one_line_error(runner.invoke(app, args), WEIGHTS_FILENAME, str(expected), "--inception-weights",
                   "UCGM_INCEPTION_WEIGHTS", "https://github.com/toshas/torch-fidelity/releases/")
    monkeypatch.setenv("UCGM_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    one_line_error(runner.invoke(app, args), "UCGM_INCEPTION_WEIGHTS", "nope.pth: no such file")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    one_line_error(runner.invoke(app, [*args, "--inception-weights", str(bad)]),
                   "do not fit torch-fidelity's InceptionV3")


def test_multiprocess_sharding_covers_every_chunk_once() -> None:
    ranges = chunk_ranges(50000, 250)
    assert len(ranges) == 200 and ranges[-1] == range(49750, 50000)
    assert chunk_ranges(11, 4) == [range(4), range(4, 8), range(8, 11)]
