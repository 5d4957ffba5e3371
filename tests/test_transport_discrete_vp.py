"""DiscreteVP: DiT's discrete VP schedule (epsilon prediction) as a continuous-time transport.

Expected values are computed here from DiT's own definitions (facebookresearch/DiT,
diffusion/gaussian_diffusion.py), written out with numpy in float64: betas = linspace(1e-4, 0.02,
1000), alphas_cumprod = cumprod(1 - betas), the x_0 estimate from eps and the posterior q(x_{k-1} |
x_k, x_0). Never from the library's own output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import ucgm_convert as uc
from ucgm_convert.model import GenerativeModel, ModelConfig

BETAS = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS, axis=0)
ABAR_PREV = np.append(1.0, ABAR[:-1])


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _step_times(k: np.ndarray) -> Tensor:
    """Transport time of DiT timestep k: t = (k + 1) / 1000."""
    return torch.tensor((k + 1) / 1000.0, dtype=torch.float64)


def test_exact_at_every_dit_timestep_and_clean_at_zero():
    T = uc.get_transport("DiscreteVP")
    k = np.arange(1000)
    t = _step_times(k)
    assert torch.equal(T.alphas_cumprod(t), torch.from_numpy(ABAR))
    torch.testing.assert_close(T.gamma_in(t), torch.from_numpy(np.sqrt(ABAR)), rtol=1e-15, atol=0)
    torch.testing.assert_close(T.alpha_in(t), torch.from_numpy(np.sqrt(1 - ABAR)), rtol=1e-15, atol=0)
    assert torch.equal(T.network_time(t), torch.from_numpy(k.astype(np.float64)))
    zero = torch.zeros((), dtype=torch.float64)
    assert T.alpha_in(zero).item() == 0.0 and T.gamma_in(zero).item() == 1.0
    # the transport's time 0 is data, so UCGM-S integrates 1 -> 0 (the reference's direction rule)
    assert T.integrates_forward is False
    assert uc.time_grid("DiscreteVP", 4)[0] > 0.99  # the grid starts at the noise end


def test_between_steps_log_abar_is_linear_and_network_time_is_the_fractional_step():
    T = uc.get_transport("DiscreteVP")
    log_a = np.log(np.append(1.0, ABAR))  # position j = k + 1 of timestep k; j = 0 is abar = 1
    s = np.array([0.25, 0.5, 1.3, 17.75, 499.5, 998.01, 999.999])
    t = torch.tensor(s / 1000, dtype=torch.float64)
    expected = np.exp(np.interp(s, np.arange(1001), log_a))
    torch.testing.assert_close(T.alphas_cumprod(t), torch.from_numpy(expected), rtol=1e-12, atol=0)
    # the network sees timestep s - 1, never below DiT's first trained step 0
    torch.testing.assert_close(T.network_time(t), torch.from_numpy(np.maximum(s - 1, 0)), rtol=0, atol=1e-9)
    dense = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert (T.alphas_cumprod(dense).diff() < 0).all()  # strictly decreasing: a valid noise schedule
    assert (T.dent(dense).abs() >= math.sqrt(ABAR[-1]) - 1e-15).all()  # dent = -sqrt(abar) never 0


def test_float32_times_keep_dtype_and_land_on_the_step():
    T = uc.get_transport("DiscreteVP")
    t = torch.tensor([0.001, 0.25, 0.5, 0.999], dtype=torch.float32).view(4, 1, 1, 1)
    for value in (T.alpha_in(t), T.gamma_in(t), T.alpha_to(t), T.gamma_to(t), T.network_time(t)):
        assert value.dtype == torch.float32 and value.shape == t.shape
    torch.testing.assert_close(T.network_time(t).flatten(), torch.tensor([0.0, 249.0, 499.0, 998.0]),
                               rtol=0, atol=1e-4)


def test_denoised_estimate_and_ddpm_posterior_match_dits_formulas():
    """x_0 from (x_k, eps) and the posterior mean of q(x_{k-1} | x_k, x_0), as DiT computes them."""
    T = uc.get_transport("DiscreteVP")
    gen = torch.Generator().manual_seed(5)
    k = np.array([0, 1, 10, 250, 500, 998, 999])
    x0 = torch.randn(len(k), 4, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(k), 4, 3, 3, generator=gen, dtype=torch.float64)
    f = torch.randn(len(k), 4, 3, 3, generator=gen, dtype=torch.float64)  # any network output
    col = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float64)).view(-1, 1, 1, 1)  # noqa: E731
    x_t = col(np.sqrt(ABAR[k])) * x0 + col(np.sqrt(1 - ABAR[k])) * eps  # DiT's q_sample
    t = _step_times(k).view(-1, 1, 1, 1)
    torch.testing.assert_close(T.interpolate(x0, eps, t), x_t, rtol=1e-14, atol=1e-14)
    assert torch.equal(T.target(x0, eps, t), eps)  # F = eps
    # DiT's _predict_xstart_from_eps, for an arbitrary eps prediction f
    dit_x0 = col(np.sqrt(1 / ABAR[k])) * x_t - col(np.sqrt(1 / ABAR[k] - 1)) * f
    x_hat, z_hat = T.predictions(x_t, f, t)
    torch.testing.assert_close(x_hat, dit_x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z_hat, f, rtol=1e-10, atol=1e-10)
    # DiT's q_posterior_mean_variance from that x_0; ours from the transport at t and t - 1/1000
    coef1 = BETAS[k] * np.sqrt(ABAR_PREV[k]) / (1 - ABAR[k])
    coef2 = (1 - ABAR_PREV[k]) * np.sqrt(1 - BETAS[k]) / (1 - ABAR[k])
    dit_mean = col(coef1) * dit_x0 + col(coef2) * x_t
    prev = t - 1 / 1000
    a_t, a_prev = T.gamma_in(t) ** 2, T.gamma_in(prev) ** 2
    beta = 1 - a_t / a_prev
    ours = beta * a_prev.sqrt() / (1 - a_t) * x_hat + (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t) * x_t
    torch.testing.assert_close(ours, dit_mean, rtol=1e-9, atol=1e-9)
    var = BETAS[k] * (1 - ABAR_PREV[k]) / (1 - ABAR[k])
    torch.testing.assert_close(beta * (1 - a_prev) / (1 - a_t), col(var), rtol=1e-9, atol=1e-15)


class _GaussianEps(nn.Module):
    """The exact eps-prediction network for data ~ N(mu, s^2) per dimension, in DiT's timestep units.

    It reads abar at (fractional) timestep k from DiT's table by its own log-linear interpolation,
    so it is only right if the model hands it k = 1000 t - 1."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.log_a = np.log(np.append(1.0, ABAR))
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, k: Tensor, y: Tensor) -> Tensor:
        self.seen.append(k)
        a = np.exp(np.interp(k.double().numpy() + 1, np.arange(1001), self.log_a))
        a = torch.from_numpy(a).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def _gaussian_model(mu: float, s: float) -> GenerativeModel:
    config = ModelConfig(family="test", arch="analytic", arch_kwargs={}, transport="DiscreteVP",
                         num_classes=1, latent_shape=(2, 2, 2))
    return GenerativeModel(_GaussianEps(mu, s), config)


def _sample_error(mu: float, s: float, steps: int) -> tuple[Tensor, float]:
    """(samples, max |sample - exact ODE map|) of `steps` deterministic UCGM-S steps from fixed noise."""
    model = _gaussian_model(mu, s)
    noise = torch.randn(2048, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = uc.sample(model, noise, transport=model.transport, steps=steps, y=torch.zeros(2048, dtype=torch.long))
    ks = torch.cat(model.net.seen)
    assert ks.min() >= 0 and ks.max() <= 999 and ks.max() > 990  # DiT timesteps, not [0, 1]
    a0 = float(model.transport.alphas_cumprod(uc.time_grid("DiscreteVP", steps)[:1].double()))
    exact = mu + s * (noise.double() - math.sqrt(a0) * mu) / math.sqrt(a0 * s * s + 1 - a0)
    return out.double(), (out.double() - exact).abs().max().item()


def test_sampling_an_analytic_gaussian_gives_its_distribution():
    """UCGM-S with the exact eps (rho = 0: DDIM steps) follows the probability-flow ODE, whose map from
    the start time t_0 is x -> mu + s (x - sqrt(a_0) mu) / sqrt(a_0 s^2 + 1 - a_0); the error is first
    order in the step count (measured: 0.025 at 250 steps, 0.0066 at 1000)."""
    mu, s = 1.5, 0.5
    out, err = _sample_error(mu, s, 1000)
    _, err_coarse = _sample_error(mu, s, 250)
    assert err < 0.01, err
    assert err_coarse / err > 3, (err_coarse, err)
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.01


def test_ucgm_t_plain_loss_of_the_exact_eps_is_zero():
    """UCGM-T on DiscreteVP: the flow-matching branch's target is eps itself, so the exact eps has loss 0."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 2, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(6, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.001, 0.1, 0.3, 0.5, 0.8, 0.999], dtype=torch.float64)
    obj = uc.UCGMObjective(transport="DiscreteVP", label_drop=0.0, num_classes=1)
    y = torch.zeros(6, dtype=torch.long)
    assert obj(lambda x_t, tt, labels: z, x, y, t=t, z=z).item() == pytest.approx(0.0, abs=1e-12)
    assert obj(lambda x_t, tt, labels: x_t, x, y, t=t, z=z).item() > 0.1  # x_t is not eps
