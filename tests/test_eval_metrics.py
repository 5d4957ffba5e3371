"""The table papers report, end to end: `ucgm eval ref` + `ucgm eval fid --metrics fid,is,sfid,prec,rec,fd_dinov2`
on the tiny model with random Inception and DINOv2 weights (official layouts), each number checked against
an independent numpy / scipy computation on the saved features; the uint8 rule; references with only
statistics; NFE sweeps (table, CSV/JSON, plots, resume); the model card; --nproc 2 and kill -9 (slow).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import single_thread, tiny_model
from frechet_direct import direct_fd_low_rank
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.special import softmax
from test_eval import kill_9_then_resume, random_inception_weights
from test_metrics_dinov2 import tiny_state
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.foundation import sha256_file
from ucgm_convert.generation import generate_batch
from ucgm_convert.hub.card import inspect_checkpoint, make_model_card
from ucgm_convert.hub.results import read_results
from ucgm_convert.jobs.evaluate.job import EvalConfig, choices, reference_pool
from ucgm_convert.metrics.dinov2 import load_dinov2
from ucgm_convert.metrics.extract import load_extractors
from ucgm_convert.metrics.inception import load_inception
from ucgm_convert.metrics.reference import load_reference_set
from ucgm_convert.metrics.sfid import InceptionWithSpatial
from ucgm_convert.recipe import load_recipe

runner = CliRunner()
NUM, CHUNK, REF_IMAGES = 20, 4, 8  # 5 chunks; 2 samples per Inception Score split
ALL = "fid,is,sfid,prec,rec,fd_dinov2"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}


pytestmark = pytest.mark.usefixtures("one_thread")


def fid_args(m: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["eval", "fid", "--checkpoint", str(m["ckpt"]), "--ref", str(m["ref"]), "--num", str(NUM),
            "--chunk-size", str(CHUNK), "--batch-size", "3", "--steps", "2", "--seed", "3", "--device", "cpu",
            "--inception-weights", str(m["inception"]), "--dinov2-weights", str(m["dinov2"]), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random weights, a tiny checkpoint, a reference made by `eval ref` from an ADM sample batch, a full run."""
    root = tmp_path_factory.mktemp("metrics")
    inception = random_inception_weights(root / "inception.pth")
    dinov2 = root / "dinov2_vitl14_pretrain.pth"
    torch.save(tiny_state(), dinov2)
    model = tiny_model()
    ckpt = uc.save_checkpoint(model, root / "tiny")
    # Half noise, half the run's own first samples: both manifolds overlap, so precision and recall are not 0.
    images = np.random.default_rng(1).integers(0, 256, (REF_IMAGES, 8, 8, 3), dtype=np.uint8)
    half = REF_IMAGES // 2
    images[:half] = generate_batch(model, model.cfg.sampling.replace(steps=2), [i % 5 for i in range(half)],
                                   range(half), 3)[1].numpy()
    np.savez(root / "batch.npz", arr_0=images)
    paths = {"root": root, "inception": inception, "dinov2": dinov2, "ckpt": ckpt, "ref": root / "ref.npz",
             "base": root / "base"}
    with single_thread():
        result = runner.invoke(app, ["eval", "ref", str(root / "batch.npz"), "--out", str(paths["ref"]), "--device",
                                     "cpu", "--inception-weights", str(inception), "--dinov2-weights", str(dinov2)])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, fid_args(paths, paths["base"], "--metrics", ALL, "--save-npz"))
        assert result.exit_code == 0, result.output
    return paths


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def saved(out: Path, key: str) -> np.ndarray:
    """One feature of every chunk, in index order (float64)."""
    rows = []
    for k in range(NUM // CHUNK):
        with np.load(out / "features" / f"chunk-{k:05d}.npz") as data:
            rows.append(data[key].astype(np.float64))
    return np.concatenate(rows)


def reference_rows(m: dict[str, Path]) -> dict[str, np.ndarray]:
    """The reference images' features, computed here by the networks themselves (no job code)."""
    with np.load(m["root"] / "batch.npz") as data:
        images = data["arr_0"]
    pool, _, spatial = InceptionWithSpatial(load_inception(m["inception"]))(images)
    return {"pool": pool.astype(np.float64), "spatial": spatial.astype(np.float64),
            "dinov2": load_dinov2(m["dinov2"])(images).astype(np.float64)}


def direct_inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """torch-fidelity's definition written out: shuffle with RandomState(seed), softmax, exp(mean KL) per split."""
    p = softmax(logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64), axis=1)
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        py = part.mean(axis=0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def direct_prc(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ManifoldEstimator with full squared-distance matrices (scipy), k-th neighbour incl. self, `<=`."""
    radii_r = np.sort(cdist(reference, reference, "sqeuclidean"), axis=1)[:, k]
    radii_g = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, k]
    d = cdist(samples, reference, "sqeuclidean")
    return float((d <= radii_r[None, :]).any(axis=1).mean()), float((radii_g[None, :] >= d.T).any(axis=1).mean())


# ----- each metric against an independent computation -------------------------------------------

def test_reference_file_holds_statistics_rows_and_dinov2_of_the_images(m: dict[str, Path]) -> None:
    rows = reference_rows(m)
    with np.load(m["ref"]) as ref:
        stored = {k: ref[k] for k in ref.files}
    assert np.array_equal(stored["pool"], rows["pool"].astype(np.float32))
    for mu, sigma, x in (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial"),
                         ("mu_dinov2", "sigma_dinov2", "dinov2")):
        np.testing.assert_allclose(stored[mu], rows[x].mean(axis=0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(stored[sigma], np.cov(rows[x], rowvar=False), rtol=1e-9, atol=1e-9)
    assert int(stored["num_images"]) == REF_IMAGES and stored["resolution"].tolist() == [8, 8]


def test_every_metric_matches_a_direct_computation_on_the_saved_features(m: dict[str, Path]) -> None:
    r, rows = results(m["base"]), reference_rows(m)
    values = r["metrics"]
    assert list(values) == ALL.split(",")
    pool, spatial, dinov2 = saved(m["base"], "pool"), saved(m["base"], "spatial"), saved(m["base"], "dinov2")
    assert spatial.shape == (NUM, 2023) and dinov2.shape == (NUM, 128)
    for name, x, y in (("fid", pool, rows["pool"]), ("sfid", spatial, rows["spatial"]),
                       ("fd_dinov2", dinov2, rows["dinov2"])):
        want = direct_fd_low_rank(x, y)
        assert want > 0 and abs(values[name] - want) <= 1e-8 * want, name
    assert r["fid"] == values["fid"]
    precision, recall = direct_prc(rows["pool"], pool)
    assert (values["prec"], values["rec"]) == (precision, recall)
    assert precision > 0 and recall > 0 and precision + recall < 2  # overlapping manifolds: not degenerate
    mean, std = direct_inception_score(saved(m["base"], "logits"))
    assert abs(values["is"] - mean) < 1e-5 * mean and abs(r["inception_score"]["std"] - std) < 1e-4 * max(std, 1)
    assert values["is"] > 1.0  # 2 samples per split: a non-trivial score


def test_chunk_features_are_the_networks_features_of_the_saved_samples(m: dict[str, Path]) -> None:
    with np.load(m["base"] / "samples.npz") as data:
        images = data["arr_0"]
    pool, _, spatial = InceptionWithSpatial(load_inception(m["inception"]))(images[:CHUNK])
    assert np.array_equal(saved(m["base"], "spatial")[:CHUNK], spatial.astype(np.float64))
    assert np.array_equal(saved(m["base"], "pool")[:CHUNK], pool.astype(np.float64))
    assert np.array_equal(saved(m["base"], "dinov2")[:CHUNK], load_dinov2(m["dinov2"])(images[:CHUNK]))


def test_results_json_records_evaluators_layers_reference_and_versions(m: dict[str, Path]) -> None:
    r = results(m["base"])
    ev = r["evaluator"]
    assert ev["inception"]["name"] == "torch-fidelity" and ev["dinov2"]["weights_sha256"] == sha256_file(m["dinov2"])
    assert ev["inception"]["weights_sha256"] == sha256_file(m["inception"])
    assert "Mixed_6d.branch1x1" in ev["feature_layers"]["sfid"] and set(ev["feature_layers"]) == set(ALL.split(","))
    assert r["reference"]["sha256"] == load_reference_set(m["ref"], ["fid"]).sha256
    assert r["precision_recall"]["k"] == 3 and r["precision_recall"]["num_reference"] == REF_IMAGES
    assert {"torch", "torch-fidelity", "timm", "numpy"} <= set(r["versions"])
    assert r["uint8"] == "round" and "floor(255 * x + 0.5)" in r["uint8_conversion"]


# ----- references ------------------------------------------------------------------------------------

def test_an_adm_batch_with_arr_0_images_gives_the_same_reference_rows(m: dict[str, Path], tmp_path: Path) -> None:
    """ADM's VIRTUAL_*.npz layout (arr_0 images + mu/sigma + mu_s/sigma_s): prec/rec rows come from arr_0."""
    with np.load(m["ref"]) as ref, np.load(m["root"] / "batch.npz") as batch:
        np.savez(tmp_path / "adm.npz", arr_0=batch["arr_0"], mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"],
                 sigma_s=ref["sigma_s"])
    adm = load_reference_set(tmp_path / "adm.npz", ["fid", "sfid", "prec", "rec"])
    assert adm.pool is None and adm.images is not None and adm.resolution == (8, 8)
    extract = load_extractors(["prec"], m["inception"], None, "cpu")
    assert np.array_equal(reference_pool(adm, extract, 3), load_reference_set(m["ref"], ["prec"]).pool)


def one_line_error(result, *fragments: str) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_reference_with_only_statistics_says_prec_rec_cannot_be_computed(m: dict[str, Path], tmp_path: Path) -> None:
    with np.load(m["ref"]) as ref:
        np.savez(tmp_path / "stats.npz", mu=ref["mu"], sigma=ref["sigma"])
    for metrics in ("fid,prec", "rec"):
        args = fid_args({**m, "ref": tmp_path / "stats.npz"}, tmp_path / "out", "--metrics", metrics)
        one_line_error(runner.invoke(app, args), "stats.npz", "only statistics", "precision/recall")
    args = fid_args({**m, "ref": tmp_path / "stats.npz"}, tmp_path / "out", "--metrics", "sfid")
    one_line_error(runner.invoke(app, args), "stats.npz", "no sFID statistics")
    args = fid_args({**m, "ref": tmp_path / "stats.npz"}, tmp_path / "out", "--metrics", "fd_dinov2")
    one_line_error(runner.invoke(app, args), "stats.npz", "no FD_DINOv2 statistics", "--dinov2-weights")
    assert not (tmp_path / "out").exists()


def test_missing_dinov2_weights_are_one_line_naming_the_file(m: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    args = fid_args(m, tmp_path / "out", "--metrics", "fd_dinov2")
    args[args.index("--dinov2-weights") + 1] = str(tmp_path / "absent.pth")
    one_line_error(runner.invoke(app, args), "absent.pth", "dinov2_vitl14_pretrain.pth")


# ----- choices: recipe defaults, the uint8 rule ---------------------------------------------------

def test_metrics_and_uint8_default_to_the_recipes_paper_and_flags_override() -> None:
    config = EvalConfig(ref=Path("r.npz"))
    assert choices(config, load_recipe("repa-e"))[:2] == (["fid", "sfid", "is", "prec", "rec"], "truncate")
    assert choices(config, load_recipe("edm2-s"))[:2] == (["fid", "fd_dinov2"], "truncate")
    assert choices(config, None)[:2] == (["fid", "is"], "round")
    flagged = EvalConfig(ref=Path("r.npz"), metrics="sfid,fid", uint8="round")
    assert choices(flagged, load_recipe("repa-e"))[:2] == (["sfid", "fid"], "round")
    assert load_recipe("lightningdit").paper_before.uint8 == "round"  # its own pipeline rounds
    assert load_recipe("repa-e").paper_before.uint8 == "truncate"


def test_uint8_truncate_is_applied_to_the_samples_and_recorded(m: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "trunc"
    args = ["eval", "fid", "--checkpoint", str(m["ckpt"]), "--ref", str(m["ref"]), "--num", "5", "--chunk-size", "5",
            "--steps", "2", "--seed", "3", "--device", "cpu", "--dinov2-weights", str(m["dinov2"]), "--metrics",
            "fd_dinov2", "--uint8", "truncate", "--save-npz", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = uc.load(m["ckpt"])
    settings = model.cfg.sampling.replace(steps=2)
    labels = [i % 5 for i in range(5)]
    want = generate_batch(model, settings, labels, range(5), 3, uint8="truncate")[1].numpy()
    rounded = generate_batch(model, settings, labels, range(5), 3)[1].numpy()
    with np.load(out / "samples.npz") as data:
        assert np.array_equal(data["arr_0"], want)
    assert not np.array_equal(want, rounded) and np.abs(want.astype(int) - rounded).max() == 1
    r = results(out)
    assert r["uint8"] == "truncate" and list(r["metrics"]) == ["fd_dinov2"] and "fid" not in r
    assert "inception" not in r["evaluator"]  # no Inception pass when no metric needs it


# ----- sweeps ------------------------------------------------------------------------------------------

def test_a_steps_sweep_writes_one_eval_per_value_a_table_and_a_plot(m: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    data = {**load_recipe("demo").to_dict(), "num_classes": 5, "resolution": 8, "metrics": ["fd_dinov2", "fid"],
            "paper_after": {"nfe": "2", "fid": 400.0, "note": "made up, to see the marker"}}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "sweep"
    args = ["eval", "fid", "--from", str(recipe), "--checkpoint", str(m["ckpt"]), "--ref", str(m["ref"]), "--num",
            "5", "--chunk-size", "5", "--steps", "1,2,4", "--cfg-scale", "1.0", "--seed", "3", "--device", "cpu",
            "--inception-weights", str(m["inception"]), "--dinov2-weights", str(m["dinov2"]), "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Sweep" in result.output and "FD_DINOv2" in result.output
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["steps"] for row in table] == ["1", "2", "4"]
    for row in table:
        r = results(out / row["folder"])
        assert r["sampling"]["settings"]["steps"] == int(row["steps"]) and list(r["metrics"]) == ["fd_dinov2", "fid"]
        assert float(row["fid"]) == r["fid"] and float(row["fd_dinov2"]) == r["metrics"]["fd_dinov2"]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["published"]["paper_after"]["fid"] == 400.0
    assert [p["nfe_evaluations"] for p in summary["points"]] == [1, 2, 4]
    for name in ("fid", "fd_dinov2"):
        assert (out / f"{name}-vs-nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = read_results(out)  # what `ucgm push --results OUT` puts on the card: every point
    assert [(r.nfe, r.metrics) for r in measured] == [(row["nfe"], results(out / row["folder"])["metrics"])
                                                      for row in table]
    chunks = {p: p.stat().st_mtime_ns for p in out.glob("*/features/chunk-*.npz")}
    again = runner.invoke(app, args)  # resume: every point complete, nothing recomputed, same table
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in chunks} == chunks
    assert json.loads((out / "sweep.json").read_text()) == summary


def test_list_values_are_validated_per_value_with_the_flag_name(m: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, [*fid_args(m, tmp_path / "o"), "--steps", "4,0"])
    one_line_error(result, "--steps", "got 0")
    result = runner.invoke(app, [*fid_args(m, tmp_path / "o"), "--gaps", "0.001,0.002;0.6,0.6"])
    one_line_error(result, "--gaps", "start + end < 1")


# ----- model card -------------------------------------------------------------------------------------

def test_the_card_carries_every_metric_with_nfe_and_reference(m: dict[str, Path], tmp_path: Path) -> None:
    (m["ckpt"] / "results.json").write_text((m["base"] / "results.json").read_text())
    try:
        card = make_model_card(inspect_checkpoint(m["ckpt"]), "alice/tiny")
    finally:
        (m["ckpt"] / "results.json").unlink()
    r = results(m["base"])
    got = {e.metric_type: e for e in card.data.eval_results}
    types = {"fid": "fid", "is": "inception_score", "sfid": "sfid", "prec": "precision", "rec": "recall",
             "fd_dinov2": "fd_dinov2"}
    assert set(got) == set(types.values())
    for name, kind in types.items():
        assert got[kind].metric_value == r["metrics"][name] and got[kind].metric_config == "nfe=2"
        assert got[kind].metric_args["reference_sha256"] == r["reference"]["sha256"]
        assert got[kind].metric_args["reference"] == "ref.npz" and got[kind].metric_args["uint8"] == "round"
    assert "| NFE | FID | IS | sFID | Precision | Recall | FD_DINOv2 |" in card.text


# ----- processes and kill -9 (slow) --------------------------------------------------------------------

def assert_same_chunks(a: Path, b: Path) -> None:
    for key in ("pool", "logits", "spatial", "dinov2", "labels"):
        assert np.array_equal(saved(a, key), saved(b, key)), key


@pytest.mark.slow
def test_two_processes_give_identical_numbers_for_every_metric(m: dict[str, Path]) -> None:
    out = m["root"] / "two"
    result = subprocess.run([sys.executable, "-m", "ucgm_convert", *fid_args(m, out, "--metrics", ALL, "--nproc",
                                                                             "2")],
                            env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(out)["num_processes"] == 2
    assert results(out)["metrics"] == results(m["base"])["metrics"]
    assert_same_chunks(out, m["base"])


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_numbers_for_every_metric(m: dict[str, Path]) -> None:
    out = m["root"] / "killed"
    args = fid_args(m, out, "--metrics", ALL)
    kill_9_then_resume(args, out, NUM // CHUNK, ENV, timeout=600)
    assert results(out)["metrics"] == results(m["base"])["metrics"]
    assert_same_chunks(out, m["base"])


@pytest.mark.slow
def test_a_sweep_under_two_processes_equals_the_one_process_sweep(m: dict[str, Path], tmp_path: Path) -> None:
    def sweep(out: Path, *extra: str) -> dict:
        args = ["eval", "fid", "--checkpoint", str(m["ckpt"]), "--ref", str(m["ref"]), "--num", "10", "--chunk-size",
                "2", "--steps", "1,2", "--seed", "3", "--device", "cpu", "--dinov2-weights", str(m["dinov2"]),
                "--metrics", "fd_dinov2", "--out", str(out), *extra]
        result = subprocess.run([sys.executable, "-m", "ucgm_convert", *args], env=ENV, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "sweep.json").read_text())

    one, two = sweep(tmp_path / "one"), sweep(tmp_path / "two", "--nproc", "2")
    assert one == two and len(one["points"]) == 2
    assert results(tmp_path / "two" / "steps-2")["num_processes"] == 2


def test_image_folder_reference_matches_the_batch_reference(m: dict[str, Path], tmp_path: Path) -> None:
    with np.load(m["root"] / "batch.npz") as data:
        for i, image in enumerate(data["arr_0"]):
            Image.fromarray(image).save(tmp_path / f"{i}.png")
    result = runner.invoke(app, ["eval", "ref", str(tmp_path), "--out", str(tmp_path / "f.npz"), "--device", "cpu",
                                 "--inception-weights", str(m["inception"]), "--dinov2-weights", str(m["dinov2"])])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "f.npz") as a, np.load(m["ref"]) as b:
        for key in ("pool", "mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2"):
            assert np.array_equal(a[key], b[key]), key
