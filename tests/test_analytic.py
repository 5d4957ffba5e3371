"""The analytic Gaussian mixture: exact posterior means (checked by quadrature), exact samples, distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from frechet_direct import direct_fd_low_rank

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture, frechet, sliced_wasserstein

NAMES = ("Linear", "ReLinear", "TrigFlow", "EDM")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quadrature_posterior(gm: GaussianMixture, x_t: float, t: float) -> tuple[float, float]:
    """E[x | x_t] and E[z | x_t] in 1-D by brute-force integration over x (independent of the formula)."""
    tr = gm.transport
    tt = torch.tensor(t, dtype=torch.float64)
    a, g = float(tr.alpha_in(tt)), float(tr.gamma_in(tt))
    xs = np.linspace(-8, 8, 400_001)
    w, m, s = gm.weights.numpy(), gm.means[:, 0].numpy(), gm.stds[:, 0].numpy()
    prior = (w[:, None] * np.exp(-0.5 * ((xs - m[:, None]) / s[:, None]) ** 2) / s[:, None]).sum(0)
    z_of_x = (x_t - g * xs) / a
    density = prior * np.exp(-0.5 * z_of_x**2)
    ex = (xs * density).sum() / density.sum()
    return ex, (x_t - g * ex) / a


@pytest.mark.parametrize("name", NAMES)
def test_posterior_means_match_quadrature(name: str) -> None:
    gm = GaussianMixture.random(dim=1, components=3, seed=4, transport=name, std_range=(0.3, 0.6))
    tr = gm.transport
    for t in (0.2, 0.5, 0.8):
        for x_t in (-0.7, 0.1, 1.3):
            x_hat, z_hat = gm.posterior(torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([t]))
            want_x, want_z = _quadrature_posterior(gm, x_t, t)
            assert float(x_hat) == pytest.approx(want_x, abs=1e-6)
            assert float(z_hat) == pytest.approx(want_z, abs=1e-6)
            # F is the transport's target of (x_hat, z_hat), and predictions() inverts it
            tt = torch.tensor([t], dtype=torch.float64)
            f = gm(torch.tensor([[x_t]], dtype=torch.float64), tt)
            back_x, back_z = tr.predictions(torch.tensor([[x_t]], dtype=torch.float64), f, tt)
            assert float(back_x) == pytest.approx(want_x, abs=1e-6)
            assert float(back_z) == pytest.approx(want_z, abs=1e-6)


def test_output_is_float64_exact_and_batch_independent() -> None:
    gm = GaussianMixture.random(dim=6, components=5, seed=1)
    x = torch.randn(33, 6, dtype=torch.float64)
    t = torch.rand(33, dtype=torch.float64)
    whole = gm(x, t)
    assert whole.dtype == torch.float64
    rows = torch.cat([gm(x[i : i + 1], t[i : i + 1]) for i in range(33)])
    assert torch.equal(whole, rows)
    assert gm(x.float(), t.float()).dtype == torch.float32


def test_class_label_selects_its_component_and_null_is_the_mixture() -> None:
    gm = GaussianMixture.random(dim=4, components=3, seed=2, transport="ReLinear")
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.full((8,), 0.4, dtype=torch.float64)
    for k in range(3):
        alone = GaussianMixture(torch.ones(1, dtype=torch.float64), gm.means[k : k + 1], gm.stds[k : k + 1],
                                gm.transport)
        torch.testing.assert_close(gm(x, t, torch.full((8,), k)), alone(x, t), rtol=1e-12, atol=1e-12)
    assert torch.equal(gm(x, t, torch.full((8,), gm.null_class)), gm(x, t))
    with pytest.raises(ValueError, match="labels"):
        gm(x, t, torch.full((8,), 4))


def test_exact_samples_have_the_exact_moments() -> None:
    gm = GaussianMixture.random(dim=3, components=4, seed=3)
    draws = gm.sample(200_000, seed=0)
    mu, sigma = gm.moments()
    np.testing.assert_allclose(draws.mean(0).numpy(), mu, atol=0.01)
    np.testing.assert_allclose(np.cov(draws.numpy(), rowvar=False), sigma, atol=0.02)
    labelled = gm.sample(1000, seed=0, y=torch.full((1000,), 2))
    np.testing.assert_allclose(labelled.mean(0).numpy(), gm.means[2].numpy(), atol=0.05)


def test_distances() -> None:
    gm = GaussianMixture.random(dim=5, components=3, seed=5)
    a, b = gm.sample(3000, seed=1), gm.sample(3000, seed=2)
    small_a, small_b = a[:300], b[:300]
    assert frechet(small_a, small_b) == pytest.approx(direct_fd_low_rank(small_a.numpy(), small_b.numpy()), rel=1e-8)
    assert gm.frechet_to_truth(a) < 0.02
    assert gm.frechet_to_truth(a + 0.5) == pytest.approx(5 * 0.25, abs=0.03)
    assert sliced_wasserstein(a, a) == 0.0
    one = torch.randn(500, 1, dtype=torch.float64)
    assert sliced_wasserstein(one, one + 0.3, projections=4) == pytest.approx(0.3, rel=1e-12)
    assert sliced_wasserstein(a, b) < 0.1 < sliced_wasserstein(a, b + 0.5)


@pytest.mark.parametrize("name", NAMES)
def test_ucgm_sample_with_many_steps_reaches_the_true_distribution(name: str) -> None:
    gm = GaussianMixture.random(dim=8, components=6, seed=0, transport=name)
    noise = torch.randn(3000, 8, generator=torch.Generator().manual_seed(9))
    floor = gm.frechet_to_truth(gm.sample(3000, seed=9))
    x = uc.sample(gm, noise, transport=name, steps=100)
    assert gm.frechet_to_truth(x) < 2 * floor + 0.005
    few = uc.sample(gm, noise, transport=name, steps=3)
    assert gm.frechet_to_truth(few) > 5 * gm.frechet_to_truth(x)
