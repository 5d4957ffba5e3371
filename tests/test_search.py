"""`uc.search` / `ucgm search`: exact NFE, resumable trial log (torn lines, kill -9), recipes per budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.recipe import load_recipe
from ucgm_convert.searcher import at_nfe, search_outcome

runner = CliRunner()
SHAPE = (3,)


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'network' (any function of (x_t, t) is a model the search can tune)."""
    return torch.tanh(x) * (1 + t[:, None]) - 0.3 * x


class Counted:
    """model_fn wrapper counting the evaluations of one sample call."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # what an interrupted search sees
        return net(x, t)


def small(**kwargs: object) -> dict:
    return {"num_samples": 64, "trials": 14, "reference": {"steps": 16}, "show_progress": False, **kwargs}


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5])
def test_found_settings_spend_exactly_nfe_evaluations(nfe: int) -> None:
    found = uc.search(net, SHAPE, "Linear", nfe=nfe, **small(trials=30))
    counted = Counted()
    uc.sample(counted, torch.randn(8, *SHAPE), transport="Linear", **found)
    assert counted.calls == nfe == uc.count_nfe(found["steps"], found["order"], found["gaps"])


def test_search_is_never_worse_than_its_start_and_beats_plain_euler() -> None:
    start = {"steps": 3, "order": 1, "extrapolation": 0.2, "time_dist": [1.2, 0.72, 1.2], "gaps": [0.001, 0.002]}
    outcome = search_outcome(net, SHAPE, "Linear", 3, start=[start], **small(trials=80))
    means = {json.dumps(s, sort_keys=True): (d + v) / 2 for s, d, v in outcome.validated}
    start_mean = means[json.dumps(at_nfe(start, 3), sort_keys=True)]  # a start is always validated
    assert outcome.distance == min(means.values()) <= start_mean
    euler = dict((json.dumps(s, sort_keys=True), d) for s, d in outcome.trials)[json.dumps(at_nfe({}, 3),
                                                                                           sort_keys=True)]
    assert min(d for _, d, _ in outcome.validated) < euler  # the grid + CMA-ES improves on the uniform grid


def test_resume_after_an_interruption_and_a_torn_line_gives_the_same_result(tmp_path: Path) -> None:
    whole = search_outcome(net, SHAPE, "Linear", 4, log=tmp_path / "a.jsonl", **small())
    log = tmp_path / "b.jsonl"
    per_trial, references = 4, 2 * 16  # NFE 4 in one batch; search and validation references of 16 steps
    with pytest.raises(KeyboardInterrupt):
        search_outcome(Counted(fail_after=references + 6 * per_trial), SHAPE, "Linear", 4, log=log, **small())
    done = len(log.read_text().splitlines()) - 1
    assert 0 < done < 14
    with log.open("ab") as f:
        f.write(b'{"distance": 0.1, "key": "{\\"ste')  # what kill -9 mid-write leaves
    counted = Counted()
    resumed = search_outcome(counted, SHAPE, "Linear", 4, log=log, **small())
    assert resumed.settings == whole.settings and resumed.distance == whole.distance
    assert counted.calls <= references + (14 - done + 5) * per_trial  # logged trials are not evaluated again
    assert all(json.loads(line) for line in log.read_text().splitlines())


def test_a_log_of_another_search_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "t.jsonl"
    search_outcome(net, SHAPE, "Linear", 2, log=log, **small(trials=2))
    with pytest.raises(UCGMError, match="belongs to another search"):
        search_outcome(net, SHAPE, "Linear", 3, log=log, **small(trials=2))


def test_batch_size_changes_no_distance() -> None:
    start = [{"steps": 3, "stochasticity": 0.6}]
    one = search_outcome(net, SHAPE, "Linear", 3, start=start, batch_size=64, **small(trials=3))
    other = search_outcome(net, SHAPE, "Linear", 3, start=start, batch_size=24, **small(trials=3))
    assert [d for _, d in one.trials] == [d for _, d in other.trials]


def test_command_writes_a_recipe_per_budget_usable_with_from(tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["search", "--from", "demo", "--nfe", "2,3", "--trials", "3", "--num-samples", "16",
            "--reference-steps", "4", "--batch-size", "8", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for nfe in (2, 3):
        recipe = load_recipe(out / f"nfe-{nfe}.yaml")
        assert recipe.sampling.sampler_nfe == nfe and recipe.checkpoint == "embedded:demo"
    table = json.loads((out / "table.json").read_text())["rows"]
    assert {(r["nfe"], r["method"]) for r in table} == {(n, m) for n in (2, 3) for m in
                                                         ("searched", "base settings", "UniPC", "DPM-Solver++ 2M")}
    assert "Frechet distance to the many-step reference" in result.output
    assert (out / "distance.png").read_bytes()[:4] == b"\x89PNG"
    sampled = runner.invoke(app, ["sample", "--from", str(out / "nfe-2.yaml"), "--num", "2", "--out",
                                  str(tmp_path / "x")])
    assert sampled.exit_code == 0 and "2x2" in sampled.output  # 2 sampler evaluations, CFG doubled
    first = (out / "nfe-2.yaml").read_text()
    again = runner.invoke(app, args)  # a finished search resumes from its logs: the same recipes
    assert again.exit_code == 0 and (out / "nfe-2.yaml").read_text() == first


@pytest.mark.parametrize("bad", ["0", "2,x", ""])
def test_bad_budgets_are_one_error_line(bad: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", "--nfe", bad, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "--nfe" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_kill_9_mid_search_then_resume_gives_the_same_recipe(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "ucgm_convert", "search", "--from", "demo", "--nfe", "2", "--trials", "12",
            "--num-samples", "16", "--reference-steps", "4", "--batch-size", "8", "--device", "cpu"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    log = tmp_path / "cut" / "trials-nfe-2.jsonl"
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_when(proc, lambda: log.exists() and len(log.read_text().splitlines()) >= 4, timeout=120)
    assert not (tmp_path / "cut" / "nfe-2.yaml").exists()
    subprocess.run([*args, "--out", str(tmp_path / "cut")], check=True, capture_output=True)
    whole, cut = (tmp_path / "whole" / "nfe-2.yaml").read_text(), (tmp_path / "cut" / "nfe-2.yaml").read_text()
    assert whole == cut


def test_missing_feature_weights_are_one_error_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", "--features", "inception", "--feature-weights",
                                 str(tmp_path / "missing.pth"), "--nfe", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:") and "missing.pth" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_guidance_is_searched_against_the_guided_many_step_target() -> None:
    gm = GaussianMixture.random(dim=3, components=3, seed=0, transport="Linear")
    labels = torch.arange(64) % 3
    target = uc.guided(gm, 2.0)  # the reference: many steps at scale 2

    def guided_fn(scale: float, interval: tuple[float, float]) -> object:
        return uc.guided(gm, scale, interval)

    start = [{"steps": 3, "cfg_scale": 2.0, "cfg_interval": (0.0, 1.0)}]
    outcome = search_outcome(target, (3,), "Linear", 3, guided_fn=guided_fn, start=start, y=labels,
                             **small(trials=100))
    found = outcome.settings
    assert 1.0 <= found["cfg_scale"] <= 4.0 and 0.0 <= found["cfg_interval"][0] <= found["cfg_interval"][1] <= 1.0
    assert len({s["cfg_scale"] for s, _ in outcome.trials}) > 3  # the scale is a searched dimension
    sample_kwargs = {k: v for k, v in found.items() if not k.startswith("cfg_")}
    counted = Counted()
    uc.sample(lambda x, t: counted(x, t), torch.randn(4, 3), transport="Linear", **sample_kwargs)
    assert counted.calls == 3


def test_a_checkpoint_without_a_recipe_gets_one_built_from_its_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = runner.invoke(app, ["search", "--checkpoint", str(tiny_checkpoint), "--nfe", "3", "--trials", "2",
                                 "--num-samples", "16", "--reference-steps", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out / "nfe-3.yaml")
    assert recipe.checkpoint == str(tiny_checkpoint) and recipe.transport == "Linear" and recipe.num_classes == 5
    assert recipe.sampling.sampler_nfe == 3
    sampled = runner.invoke(app, ["sample", "--from", str(out / "nfe-3.yaml"), "--num", "2", "--out",
                                  str(tmp_path / "x")])
    assert sampled.exit_code == 0, sampled.output
