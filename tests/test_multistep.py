"""The multistep UCGM-S solver: second-order convergence, equality with DPM-Solver++(2M), conditioning, NFE."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture
from ucgm_convert.baselines import run_baseline
from ucgm_convert.errors import UCGMError
from ucgm_convert.settings import SamplingSettings


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Counted:
    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x_t, t, **kwargs):
        self.calls += 1
        return self.model(x_t, t, **kwargs)


def _slopes(name: str, solver: str, steps: tuple[int, ...], gaps=(0.01, 0.05)) -> list[float]:
    """log2 error ratios between successive step doublings, error = RMS distance to a 1024-step solution."""
    gm = GaussianMixture.random(dim=4, components=3, seed=0, transport=name)
    noise = torch.randn(128, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = uc.sample(gm, noise, transport=name, steps=1024, solver="multistep", gaps=gaps).double()
    errs = [float(((uc.sample(gm, noise, transport=name, steps=n, solver=solver, gaps=gaps) - ref) ** 2)
                  .mean().sqrt()) for n in steps]
    return [math.log2(a / b) for a, b in itertools.pairwise(errs)]


@pytest.mark.parametrize("name", ["Linear", "EDM"])
def test_multistep_converges_at_second_order_and_ucgm_at_first(name: str) -> None:
    multistep = _slopes(name, "multistep", (32, 64, 128))
    euler = _slopes(name, "ucgm", (32, 64, 128))
    assert all(s > 1.75 for s in multistep), multistep
    assert all(0.9 < s < 1.2 for s in euler), euler


@pytest.mark.parametrize("nfe", [3, 4, 7])
def test_multistep_on_diffusers_grid_is_dpm_solver_pp_2m(nfe: int) -> None:
    """diffusers' flow sigmas are t_i = 0.999 (1 - i/N): start gap 0.001, end gap 0.999/N; its last step
    (lower_order_final) returns the data prediction at t_{N-1}, which is our returned x_hat."""
    gm = GaussianMixture.random(dim=6, components=4, seed=2)
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    ours = uc.sample(gm, noise, steps=nfe, solver="multistep", gaps=(0.001, 0.999 / nfe))
    theirs = run_baseline("dpm++2m", gm, noise, nfe).samples
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert (ours - uc.sample(gm, noise, steps=nfe, gaps=(0.001, 0.999 / nfe))).abs().max() > 1e-3


def test_ucgm_order_one_on_flow_match_euler_grid_is_flow_match_euler() -> None:
    """FlowMatchEulerDiscreteScheduler visits t = linspace(1, 0.001, N) and ends with x - 0.001 v = x_hat."""
    gm = GaussianMixture.random(dim=6, components=4, seed=2)
    noise = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    for nfe in (2, 5):
        ours = uc.sample(gm, noise, steps=nfe, gaps=(0.0, 0.001))
        torch.testing.assert_close(ours, run_baseline("flow-euler", gm, noise, nfe).samples, atol=2e-5, rtol=0)


def test_no_division_by_a_vanishing_coefficient() -> None:
    """With no start gap gamma_in(t_0) = 0 on Linear: the reference's order 2 divides by it, multistep does not."""
    gm = GaussianMixture.random(dim=4, components=3, seed=1)
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(3))
    x = uc.sample(gm, noise, steps=50, solver="multistep", gaps=(0.0, 0.0))
    assert torch.isfinite(x).all() and gm.frechet_to_truth(x) < 0.02
    assert not torch.isfinite(uc.sample(gm, noise, steps=50, order=2, gaps=(0.0, 0.0))).all()


def test_composes_with_extrapolation_and_stochasticity() -> None:
    gm = GaussianMixture.random(dim=4, components=3, seed=1)
    noise = torch.randn(3000, 4, generator=torch.Generator().manual_seed(4))
    floor = gm.frechet_to_truth(gm.sample(3000, seed=4))
    for kwargs in ({"extrapolation": 0.3}, {"stochasticity": 0.2}, {"stochasticity": "auto", "extrapolation": 0.1}):
        x = uc.sample(gm, noise, steps=120, solver="multistep", generator=torch.Generator().manual_seed(0), **kwargs)
        again = uc.sample(gm, noise, steps=120, solver="multistep", generator=torch.Generator().manual_seed(0),
                          **kwargs)
        assert torch.equal(x, again)
        assert gm.frechet_to_truth(x) < 2 * floor + 0.01, kwargs
        plain = uc.sample(gm, noise, steps=120, generator=torch.Generator().manual_seed(0), **kwargs)
        assert not torch.equal(x, plain)


def test_one_evaluation_per_step_and_count_nfe_is_exact() -> None:
    gm = GaussianMixture.random(dim=2, components=2, seed=0)
    for steps in (1, 2, 5):
        model = _Counted(gm)
        uc.sample(model, torch.randn(8, 2), steps=steps, solver="multistep")
        assert model.calls == steps == uc.count_nfe(steps, 1)
        assert SamplingSettings(steps=steps, solver="multistep").sampler_nfe == steps
    with pytest.raises(ValueError, match="order must be 1"):
        uc.sample(gm, torch.randn(8, 2), steps=4, order=2, solver="multistep")
    with pytest.raises(ValueError, match="solver must be one of"):
        uc.sample(gm, torch.randn(8, 2), steps=4, solver="rk4")


def test_solver_is_a_setting() -> None:
    s = SamplingSettings(steps=6, solver="MultiStep")
    assert s.as_sample_kwargs()["solver"] == "multistep"
    with pytest.raises(UCGMError, match="order must be 1"):
        SamplingSettings(steps=6, order=2, solver="multistep")
    with pytest.raises(UCGMError, match="solver: expected one of 'ucgm', 'multistep'"):
        SamplingSettings(steps=6, solver="heun")
