"""`uc.search(encoder_evals=E)` / `ucgm search --encoder-evals E`: the DDT encoder refresh is searched within E."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.recipe import load_recipe
from ucgm_convert.searcher import latent_features, refresh_dim, search_outcome

runner = CliRunner()
CKPT = Path(__file__).parent / "fixtures" / "ddt" / "ddt_tiny_lightning.ckpt"


@pytest.fixture(scope="module")
def model() -> uc.GenerativeModel:
    return uc.load(CKPT)


def _small(model: uc.GenerativeModel, **kwargs: object) -> dict:
    labels = torch.arange(8) % model.num_classes
    return {"num_samples": 8, "trials": 30, "reference": {"steps": 8}, "show_progress": False, "validate": 2,
            "features": latent_features(max_dim=16), "y": labels, **kwargs}  # small covariances: fast trials


def _encoder_calls(model: uc.GenerativeModel, settings: dict) -> uc.EncoderUse:
    """Real encoder and decoder forwards of one sample call with the found settings."""
    use = uc.EncoderUse()
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        uc.sample(model, noise, transport=model.transport, encoder_use=use, y=torch.tensor([0, 1]), **settings)
    return use


@pytest.mark.parametrize(("nfe", "budget"), [(4, 2), (5, 1)])
def test_found_settings_respect_the_encoder_budget(model, nfe: int, budget: int) -> None:
    outcome = search_outcome(model, model.latent_shape, model.transport, nfe, encoder_evals=budget, **_small(model))
    found = outcome.settings
    use = _encoder_calls(model, found)
    assert use.decoder_evals == nfe and use.encoder_evals <= budget
    assert use.encoder_evals == uc.count_encoder_evals(found["steps"], found["order"], found["gaps"],
                                                       found["encoder_refresh"])
    refreshes = {s["encoder_refresh"] for s, _ in outcome.trials}
    assert refreshes <= set(range(refresh_dim(nfe, budget).lo, nfe + 1)) and min(refreshes) > 1
    assert all(_encoder_calls(model, s).encoder_evals <= budget for s, _ in outcome.trials[::7])


def test_a_budget_of_nfe_searches_refresh_rates_including_every_evaluation(model) -> None:
    assert (refresh_dim(8, 3).lo, refresh_dim(8, 8).lo, refresh_dim(8, 1).lo) == (3, 1, 8)
    outcome = search_outcome(model, model.latent_shape, model.transport, 4, encoder_evals=4, **_small(model))
    assert {1, 2, 4} <= {s["encoder_refresh"] for s, _ in outcome.trials}  # one grid point per encoder count


def test_without_a_budget_nothing_is_searched_and_a_budget_is_in_the_log(model, tmp_path: Path) -> None:
    outcome = search_outcome(model, model.latent_shape, model.transport, 3, **_small(model, trials=3),
                             log=tmp_path / "log.jsonl")
    assert all("encoder_refresh" not in s for s, _ in outcome.trials)
    assert "encoder_evals" not in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    with pytest.raises(UCGMError, match="belongs to another search"):
        search_outcome(model, model.latent_shape, model.transport, 3, encoder_evals=2, **_small(model, trials=3),
                       log=tmp_path / "log.jsonl")


def test_a_model_that_does_not_share_its_encoder_is_refused() -> None:
    demo = uc.load("embedded:demo")
    with pytest.raises(UCGMError, match="does not share its condition encoder"):
        search_outcome(demo, demo.latent_shape, demo.transport, 2, encoder_evals=1, **_small(demo))
    with pytest.raises(UCGMError, match="encoder_evals must be"):
        search_outcome(demo, demo.latent_shape, demo.transport, 2, encoder_evals=0, **_small(demo))


def test_command_with_an_encoder_budget(tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["search", "--checkpoint", str(CKPT), "--nfe", "4", "--encoder-evals", "2", "--trials", "4",
            "--num-samples", "16", "--reference-steps", "4", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    sampling = load_recipe(out / "nfe-4.yaml").sampling
    assert sampling.sampler_nfe == 4 and sampling.encoder_refresh >= 2 and sampling.encoder_evals <= 2
    rows = json.loads((out / "table.json").read_text())["rows"]
    searched = next(r for r in rows if r["method"] == "searched")
    assert (searched["encoder_evals"], searched["decoder_evals"]) == (sampling.encoder_evals, 4)
    assert {(r["encoder_evals"], r["decoder_evals"]) for r in rows if r["method"] != "searched"} == {(4, 4)}
    assert "encoder_evals,decoder_evals" in (out / "table.csv").read_text().splitlines()[0]
    again = runner.invoke(app, [*args[:6], "3", *args[7:]])  # another budget, same logs: refused
    assert again.exit_code != 0 and "belongs to another search" in again.output


def test_command_refuses_a_budget_for_a_model_that_cannot_share(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", "--from", "demo", "--nfe", "2", "--encoder-evals", "1",
                                 "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --encoder-evals:") and "shareable" in lines[0]
