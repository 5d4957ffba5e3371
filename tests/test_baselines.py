"""Baseline solvers (Euler, Heun, diffusers' flow schedulers) through our model_fn: convergence and exact NFE."""

from __future__ import annotations

import pytest
import torch

from ucgm_convert.analytic import GaussianMixture
from ucgm_convert.baselines import BASELINES, run_baseline, time_of_flow_sigma
from ucgm_convert.transports import EDM, get_transport


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_flow_sigma_maps_to_the_transport_time_of_equal_snr() -> None:
    for s in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert time_of_flow_sigma(get_transport("Linear"), s) == pytest.approx(s, abs=1e-15)
        assert time_of_flow_sigma(get_transport("ReLinear"), s) == pytest.approx(1 - s, abs=1e-15)
    want = float(EDM.time_of_sigma(torch.tensor(0.3 / 0.7, dtype=torch.float64)))
    assert time_of_flow_sigma(get_transport("EDM"), 0.3) == pytest.approx(want, abs=1e-12)
    assert time_of_flow_sigma(get_transport("EDM"), 0.9999) == pytest.approx(1.0, abs=1e-12)  # clamped


class _Counted:
    """Counts calls to the model independently of the baselines' own counter."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x_t, t, **kwargs):
        assert x_t.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == x_t.shape[:1]
        self.calls += 1
        return self.model(x_t, t, **kwargs)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("transport", ["Linear", "ReLinear"])
def test_baselines_converge_to_the_true_distribution(name: str, transport: str) -> None:
    gm = GaussianMixture.random(dim=8, components=6, seed=0, transport=transport)
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(9))
    floor = gm.frechet_to_truth(gm.sample(3000, seed=9))
    model = _Counted(gm)
    many = run_baseline(name, model, noise, 60, transport)
    assert gm.frechet_to_truth(many.samples) < 2 * floor + 0.005
    few = run_baseline(name, gm, noise, 2, transport)
    assert gm.frechet_to_truth(few.samples) > 3 * gm.frechet_to_truth(many.samples)
    assert many.nfe == model.calls == 60


def test_nfe_is_exact_and_heun_spends_two_per_step() -> None:
    gm = GaussianMixture.random(dim=2, components=2, seed=0)
    noise = torch.randn(16, 2)
    for name in BASELINES:
        for nfe in (2, 3, 5):
            model = _Counted(gm)
            got = run_baseline(name, model, noise, nfe)
            want = 2 * (nfe // 2) if name == "heun" else nfe
            assert got.nfe == model.calls == want, (name, nfe)
    with pytest.raises(ValueError, match="Heun needs nfe >= 2"):
        run_baseline("heun", gm, noise, 1)
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("rk4", gm, noise, 4)


def test_class_labels_reach_the_model() -> None:
    gm = GaussianMixture.random(dim=4, components=3, seed=1)
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    out = run_baseline("unipc", gm, noise, 20, y=torch.full((2000,), 1)).samples
    torch.testing.assert_close(out.double().mean(0), gm.means[1], atol=0.05, rtol=0)
