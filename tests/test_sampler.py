"""UCGM-S (`uc.sample`): math, hand-worked steps, reference parity, NFE, RNG, validation.

The expected values come from three independent sources, never from the library itself:
  * closed-form Gaussian data, where the exact network and the exact ODE limit are known;
  * small examples worked out by hand (Linear transport, F = c * x_t);
  * `ref_uni_sample`, a literal transcription (in our own words) of the reference
    LINs-lab/UCGM `methods/unigen.py::uni_sample` with its own copy of the transports of
    `methods/transports/*.py`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import ucgm_convert as uc

NAMES = ("Linear", "ReLinear", "TrigFlow", "EDM")


pytestmark = pytest.mark.usefixtures("one_thread_module")


# =============================================================================================
# The reference, transcribed.
# =============================================================================================


class _RefLinear:  # methods/transports/linear.py (constants are plain Python ints there)
    def alpha_in(self, t):
        return t

    def gamma_in(self, t):
        return 1 - t

    def alpha_to(self, t):
        return 1

    def gamma_to(self, t):
        return -1


class _RefReLinear:  # methods/transports/relinear.py
    def alpha_in(self, t):
        return 1 - t

    def gamma_in(self, t):
        return t

    def alpha_to(self, t):
        return -1

    def gamma_to(self, t):
        return 1


class _RefTrigFlow:  # methods/transports/trigflow.py
    def alpha_in(self, t):
        return torch.sin(t * 1.57)

    def gamma_in(self, t):
        return torch.cos(t * 1.57)

    def alpha_to(self, t):
        return torch.cos(t * 1.57)

    def gamma_to(self, t):
        return -torch.sin(t * 1.57)


class _RefEDM:  # methods/transports/edm.py
    def alpha_in(self, t):
        sigma = ((t * 2.68 - 1.59) * 4).exp()
        return sigma / (sigma**2 + 0.25) ** (1 / 2)

    def gamma_in(self, t):
        sigma = ((t * 2.68 - 1.59) * 4).exp()
        return 1 / (sigma**2 + 0.25) ** (1 / 2)

    def alpha_to(self, t):
        sigma = ((t * 2.68 - 1.59) * 4).exp()
        return -0.5 / (sigma**2 + 0.25) ** (1 / 2)

    def gamma_to(self, t):
        sigma = ((t * 2.68 - 1.59) * 4).exp()
        return 2 * sigma / (sigma**2 + 0.25) ** (1 / 2)


REF = {"Linear": _RefLinear(), "ReLinear": _RefReLinear(), "TrigFlow": _RefTrigFlow(), "EDM": _RefEDM()}


def _ref_runs_from_one_to_zero(tr) -> bool:
    """UCGMTS.__init__: integ_st = 0 if |gamma_in(0)| < 0.005, 1 if |alpha_in(0)| < 0.005."""
    if tr.gamma_in(torch.tensor(0)).abs().item() < 0.005:
        return False
    if tr.alpha_in(torch.tensor(0)).abs().item() < 0.005:
        return True
    raise ValueError("Invalid Alpha and Gamma functions")


def ref_grid(name, steps, order, time_dist, gaps, like):
    """The reference's t_steps (K+1 entries, last one 0) and its loop bound num_steps."""
    tr = REF[name]
    num_steps = (steps + 1) // 2 if order == 2 else steps
    # the quirk: a zero end gap adds one more point, dropped again below, but num_steps stays +1
    num_steps = num_steps + 1 if (gaps[1] - 0.0) == 0.0 else num_steps
    t_steps = torch.linspace(gaps[0], 1.0 - gaps[1], num_steps, dtype=torch.float64).to(like)
    t_steps = t_steps[:-1] if (gaps[1] - 0.0) == 0.0 else t_steps
    a, b, c = time_dist
    t_steps = (1 - (1 - t_steps**a) ** b) ** c  # kumaraswamy_transform, in noise's dtype
    if _ref_runs_from_one_to_zero(tr):
        t_steps = 1 - t_steps
    t_steps = torch.cat([torch.as_tensor(t_steps), torch.zeros_like(t_steps[:1])])
    return t_steps, num_steps


def ref_uni_sample(
    model_fn,
    noise,
    name,
    steps,
    stochasticity=0.0,
    extrapolation=0.0,
    order=1,
    time_dist=(1.0, 1.0, 1.0),
    gaps=(0.001, 0.001),
    **model_kwargs,
):
    """uni_sample, step by step. Returns (stack of [noise, x_hat_0, ...] in float32, #model calls).

    Two deliberate, documented differences from the literal reference (DESIGN / method notes):
      * the global-RNG noise is drawn only when stochasticity is not 0 (the reference draws it
        at every step and multiplies it by 0);
      * "auto" is recomputed at every step (the reference overwrites its variable and reuses
        the first step's value).
    """
    tr = REF[name]
    t_steps, num_steps = ref_grid(name, steps, order, time_dist, gaps, noise)
    calls = 0

    def forward(x_t, t):  # UCGMTS.forward
        nonlocal calls
        calls += 1
        dent = tr.alpha_in(t) * tr.gamma_to(t) - tr.gamma_in(t) * tr.alpha_to(t)
        _t = torch.ones(x_t.size(0), device=x_t.device) * t.flatten()
        F_t = model_fn(x_t, _t, **model_kwargs)
        z_hat = (x_t * tr.gamma_to(t) - F_t * tr.gamma_in(t)) / dent
        x_hat = (F_t * tr.alpha_in(t) - x_t * tr.alpha_to(t)) / dent
        return x_hat, z_hat

    auto = isinstance(stochasticity, str)
    rho = stochasticity
    x_hats, z_hats = [], []
    x_cur = noise.to(torch.float64)
    samples = [noise]
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_hat, z_hat = forward(x_cur.to(torch.float32), t_cur.to(torch.float32))
        samples.append(x_hat)
        x_hat, z_hat = x_hat.to(torch.float64), z_hat.to(torch.float64)

        if extrapolation > 0:  # buffer_freq = 1: compare with the previous RAW prediction
            z_hats.append(z_hat)
            x_hats.append(x_hat)
            if i > 1:
                z_hat = z_hat + extrapolation * (z_hat - z_hats[-2])
                x_hat = x_hat + extrapolation * (x_hat - x_hats[-2])
                z_hats.pop(0), x_hats.pop(0)

        if auto:
            rho = torch.sqrt((t_next - t_cur).abs()) * torch.sqrt(2 * tr.alpha_in(t_cur)) / tr.alpha_in(t_next)
            rho = torch.clamp(rho ** (1 / 0.5), min=0, max=1)

        mixed = z_hat * ((1 - rho) ** 0.5)
        if auto or rho != 0:
            mixed = mixed + torch.randn(x_cur.size()).to(x_cur) * (rho**0.5)
        x_next = tr.gamma_in(t_next) * x_hat + tr.alpha_in(t_next) * mixed

        if order == 2 and i < num_steps - 1:
            x_pri, z_pri = forward(x_next.to(torch.float32), t_next.to(torch.float32))
            x_pri, z_pri = x_pri.to(torch.float64), z_pri.to(torch.float64)
            x_next = x_cur * tr.gamma_in(t_next) / tr.gamma_in(t_cur) + (
                tr.alpha_in(t_next) - tr.gamma_in(t_next) * tr.alpha_in(t_cur) / tr.gamma_in(t_cur)
            ) * (0.5 * z_hat + 0.5 * z_pri)

        x_cur = x_next

    return torch.stack(samples, dim=0).to(torch.float32), calls


# =============================================================================================
# Test models
# =============================================================================================


class TinyMLP:
    """A fixed random nonlinear F(x_t, t), row-wise (rows never mix), float32 in and out."""

    def __init__(self, shape, seed=0, hidden=16):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.w1 = torch.randn(d, hidden, generator=g) / math.sqrt(d)
        self.wt = torch.randn(hidden, generator=g)
        self.b1 = torch.randn(hidden, generator=g) * 0.1
        self.w2 = torch.randn(hidden, d, generator=g) / math.sqrt(hidden)
        self.calls = 0

    def __call__(self, x_t, t, scale=1.0):
        self.calls += 1
        assert x_t.dtype == torch.float32 and t.dtype == torch.float32
        assert t.shape == (x_t.shape[0],)
        tb = t.view(-1, *([1] * (x_t.ndim - 1)))
        h = torch.tanh(x_t.flatten(1) @ self.w1 + t[:, None] * self.wt + self.b1)
        out = (h @ self.w2).view_as(x_t) + x_t * torch.cos(2 * tb) - 0.3 * torch.sin(3 * tb)
        return scale * out


class GaussianData:
    """x ~ N(mu, diag(s^2)), z ~ N(0, I), x_t = a z + g x: everything is in closed form.

    E[x|x_t] = mu + g s^2 / (a^2 + g^2 s^2) (x_t - g mu),  E[z|x_t] = a / (a^2 + g^2 s^2) (x_t - g mu)
    and the exact network is F* = alpha_to E[z|x_t] + gamma_to E[x|x_t], so x_hat and z_hat
    are exactly the posterior means. Coefficients come from the transcribed reference tables.
    """

    mu = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64)

    def __init__(self, name):
        self.tr = REF[name]

    def _coef(self, fn, t):
        v = fn(t)
        return v if torch.is_tensor(v) else torch.full_like(t, float(v))

    def model(self, x_t, t):
        t64 = t.double().view(-1, 1)
        a, g = self._coef(self.tr.alpha_in, t64), self._coef(self.tr.gamma_in, t64)
        x = x_t.double()
        den = a**2 + g**2 * self.s**2
        ex = self.mu + g * self.s**2 / den * (x - g * self.mu)
        ez = a / den * (x - g * self.mu)
        return (self._coef(self.tr.alpha_to, t64) * ez + self._coef(self.tr.gamma_to, t64) * ex).float()

    def ode_limit(self, t_start, t_end):
        """Mean and variance of x_hat(t_end) when N(0, I) is started at t_start and carried by
        the exact probability-flow ODE (what any consistent sampler converges to).

        The marginal at t is N(g mu, a^2 + g^2 s^2) per dimension; the flow between two such
        Gaussians is the increasing affine map x -> m_e + (sd_e / sd_s)(x - m_s). Starting
        from N(0, 1) instead of the true marginal (gamma_in(t_start) may be slightly > 0) and
        taking the posterior mean at t_end gives the formulas below.
        """
        ts = torch.tensor(float(t_start), dtype=torch.float64)
        te = torch.tensor(float(t_end), dtype=torch.float64)
        a_s, g_s = self._coef(self.tr.alpha_in, ts), self._coef(self.tr.gamma_in, ts)
        a_e, g_e = self._coef(self.tr.alpha_in, te), self._coef(self.tr.gamma_in, te)
        sd_s = (a_s**2 + g_s**2 * self.s**2).sqrt()
        sd_e = (a_e**2 + g_e**2 * self.s**2).sqrt()
        mean = self.mu - g_e * self.s**2 * (g_s * self.mu) / (sd_e * sd_s)
        std = g_e * self.s**2 / (sd_e * sd_s)
        return mean, std**2


def _whitened_noise(n=4096, d=3, seed=0):
    """Many noise rows whose per-dimension sample mean is exactly 0 and variance exactly 1.

    For Gaussian data the whole deterministic sampler is an affine map per dimension, so the
    output's sample mean / variance are then exactly the map's offset / squared slope: the
    measured error is pure discretisation error, free of Monte-Carlo noise.
    """
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    return z.float()


def _moment_error(out, mean, var):
    out = out.double()
    return ((out.mean(0) - mean).abs().max() + (out.var(0, unbiased=False) - var).abs().max()).item()


# =============================================================================================
# Gaussian data: convergence, order 2 vs order 1
# =============================================================================================


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_deterministic_sampling_converges(name):
    # Gaps (0, 0.001): a start gap of 0 begins exactly at the noise end (x_t = z for Linear and
    # ReLinear; for TrigFlow / EDM the t=1 marginal keeps a small data share gamma_in(1) =
    # cos(1.57) = 8e-4 / 0.0128, which the exact ODE limit accounts for). Order 1 never
    # divides by gamma_in, so 0 is safe. A small end gap 0.001 stops next to the data, where
    # the posterior mean x_hat shrinks the variance by a negligible factor.
    data = GaussianData(name)
    noise = _whitened_noise()
    gaps = (0.0, 0.001)
    errors, true_errors = [], []
    for steps in (4, 16, 64, 256):
        grid, _ = ref_grid(name, steps, 1, (1.0, 1.0, 1.0), gaps, noise)
        mean_lim, var_lim = data.ode_limit(grid[0], grid[steps - 1])
        out = uc.sample(data.model, noise, name, steps=steps, gaps=gaps)
        errors.append(_moment_error(out, mean_lim, var_lim))
        true_errors.append(_moment_error(out, data.mu, data.s**2))

    # the gap choice puts the ODE limit itself close to the true data distribution
    floor = {"Linear": 1e-4, "ReLinear": 1e-4, "TrigFlow": 2e-3, "EDM": 1e-2}[name]
    limit_gap = ((mean_lim - data.mu).abs().max() + (var_lim - data.s**2).abs().max()).item()
    assert limit_gap < floor
    # error decreases with steps at the first-order rate (x4 steps -> about /4) ...
    for coarse, fine in itertools.pairwise(errors):
        assert fine < 0.4 * coarse, errors
    assert 0.15 < errors[-1] / errors[-2] < 0.35, errors
    # ... and is small at many steps, against the limit and against the truth
    # (order 1 is DDIM: error ~ C / K; C ~ 1.3 for the linear-in-t transports, ~ 5 for EDM,
    # whose uniform t grid is uniform in log sigma over 0.0017 .. 78)
    bound = {"Linear": 0.015, "ReLinear": 0.015, "TrigFlow": 0.015, "EDM": 0.035}[name]
    assert errors[-1] < bound, errors
    assert true_errors[-1] < bound + floor, true_errors
    assert true_errors[0] > 0.1  # 4 steps are visibly off: the test can tell


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_order2_beats_order1_at_equal_nfe(name):
    # Order 2 is Heun on sigma = alpha_in / gamma_in (the reference's correction divides by
    # gamma_in(t_cur)). A uniform t grid is very uneven in sigma near the noise end (sigma ->
    # inf for Linear/ReLinear as gamma_in -> 0; ratio e^(10.7/K) per step for EDM), so with few
    # steps the trapezoid rule over the first huge sigma interval is far worse than Euler:
    # at NFE <= 17 order 2 LOSES for every transport with start gap 0.001 (measured). With a
    # start gap 0.05 (sigma_max ~ 19 for Linear) and NFE 33 / 65 the second-order rate wins.
    # Both orders run the same gaps, and the error is measured against the exact ODE limit of
    # that same time window, so the comparison is pure discretisation error.
    data = GaussianData(name)
    noise = _whitened_noise()
    gaps = (0.05, 0.05)
    err = {}
    for order in (1, 2):
        for nfe in (33, 65):
            steps = nfe  # order 2 with an end gap > 0: NFE = 2K - 1 with K = (steps + 1) // 2
            assert uc.count_nfe(steps, order, gaps) == nfe
            grid, _ = ref_grid(name, steps, order, (1.0, 1.0, 1.0), gaps, noise)
            k = grid.numel() - 1
            mean_lim, var_lim = data.ode_limit(grid[0], grid[k - 1])
            calls = []
            out = uc.sample(lambda x, t: calls.append(1) or data.model(x, t), noise, name,
                            steps=steps, order=order, gaps=gaps)
            assert len(calls) == nfe
            err[order, nfe] = _moment_error(out, mean_lim, var_lim)
    assert err[2, 33] < err[1, 33], err
    assert err[2, 65] < 0.5 * err[1, 65], err
    # rates: doubling the NFE halves the first-order error and quarters the second-order one
    assert 0.4 < err[1, 65] / err[1, 33] < 0.6, err
    assert err[2, 65] / err[2, 33] < 0.3, err


# =============================================================================================
# Hand-worked examples (Linear: x_t = t z + (1-t) x, F = z - x, dent = -1)
#   x_hat = (F t - x_t) / (-1) = x_t - t F,      z_hat = (-x_t - F (1-t)) / (-1) = x_t + (1-t) F
#   with F = c x_t:  x_hat = x_t (1 - c t),  z_hat = x_t (1 + c (1 - t))
# =============================================================================================


class Recorder:
    def __init__(self, fn):
        self.fn, self.xs, self.ts = fn, [], []

    def __call__(self, x_t, t):
        self.xs.append(x_t.clone())
        self.ts.append(t.clone())
        return self.fn(x_t, t)


C, X0 = 0.5, 2.0


def _linear_model(x_t, t):
    return C * x_t


def _close(actual, expected, rtol=2e-6):
    assert actual == pytest.approx(expected, rel=rtol, abs=1e-6)


def test_hand_one_step_constant_model():
    # steps = 1, gaps (0.2, 0.3): u = linspace(0.2, 0.7, 1) = [0.2] -> t = [0.8, 0]
    f = 0.25
    model = Recorder(lambda x, t: torch.full_like(x, f))
    noise = torch.tensor([[X0]])
    traj = uc.sample(model, noise, "Linear", steps=1, gaps=(0.2, 0.3), return_trajectory=True)
    assert len(model.ts) == 1
    _close(model.ts[0].item(), 0.8)
    x_hat = X0 - 0.8 * f  # x_t - t F
    assert traj.shape == (2, 1, 1)
    _close(traj[0].item(), X0)
    _close(traj[1].item(), x_hat)


def test_hand_two_steps_linear_model():
    # steps = 2, gaps (0, 0.5): u = linspace(0, 0.5, 2) = [0, 0.5] -> t = [1, 0.5, 0]
    model = Recorder(_linear_model)
    noise = torch.tensor([[X0]])
    traj = uc.sample(model, noise, "Linear", steps=2, gaps=(0.0, 0.5), return_trajectory=True)
    x_hat0 = X0 * (1 - C * 1.0)  # t = 1: x_hat = E[x] guess from pure noise
    z_hat0 = X0 * (1 + C * 0.0)
    x1 = (1 - 0.5) * x_hat0 + 0.5 * z_hat0  # gamma_in(0.5) x_hat + alpha_in(0.5) z_hat
    x_hat1 = x1 * (1 - C * 0.5)
    assert [t.item() for t in model.ts] == pytest.approx([1.0, 0.5])
    _close(model.xs[1].item(), x1)
    assert [v.item() for v in traj] == pytest.approx([X0, x_hat0, x_hat1], rel=2e-6)
    # numbers: 2 -> x_hat0 = 1.0, z_hat0 = 2.0 -> x1 = 1.5 -> x_hat1 = 1.125
    _close(x_hat1, 1.125)


def test_hand_order2_one_correction():
    # steps = 3, order 2: K = 2 grid points; gaps (0.2, 0.5): u = [0.2, 0.5] -> t = [0.8, 0.5, 0]
    # The end gap is > 0, so only the first point is corrected: NFE = 3.
    model = Recorder(_linear_model)
    noise = torch.tensor([[X0]])
    traj = uc.sample(model, noise, "Linear", steps=3, order=2, gaps=(0.2, 0.5), return_trajectory=True)
    x_hat0, z_hat0 = X0 * (1 - C * 0.8), X0 * (1 + C * 0.2)
    x1_pred = 0.5 * x_hat0 + 0.5 * z_hat0  # predictor at t = 0.5
    z_pri = x1_pred * (1 + C * 0.5)  # model evaluated at (x1_pred, 0.5)
    g_cur, g_next, a_cur, a_next = 0.2, 0.5, 0.8, 0.5
    x1 = X0 * g_next / g_cur + (a_next - g_next * a_cur / g_cur) * (z_hat0 + z_pri) / 2
    x_hat1 = x1 * (1 - C * 0.5)
    assert [t.item() for t in model.ts] == pytest.approx([0.8, 0.5, 0.5])
    _close(model.xs[1].item(), x1_pred)
    _close(model.xs[2].item(), x1)
    assert [v.item() for v in traj] == pytest.approx([X0, x_hat0, x_hat1], rel=2e-6)


def test_hand_extrapolation_over_four_steps():
    # steps = 4, gaps (0, 0.25): u = [0, 0.25, 0.5, 0.75] -> t = [1, 0.75, 0.5, 0.25, 0]; lam = 0.5
    lam = 0.5
    model = Recorder(_linear_model)
    noise = torch.tensor([[X0]])
    traj = uc.sample(model, noise, "Linear", steps=4, gaps=(0.0, 0.25), extrapolation=lam,
                     return_trajectory=True)
    # step 0 (t = 1 -> 0.75) and step 1 (0.75 -> 0.5): no extrapolation yet
    xh0, zh0 = X0 * (1 - C * 1.0), X0 * (1 + C * 0.0)
    x1 = 0.25 * xh0 + 0.75 * zh0  # gamma_in(0.75) = 0.25, alpha_in(0.75) = 0.75
    xh1, zh1 = x1 * (1 - C * 0.75), x1 * (1 + C * 0.25)
    x2 = 0.5 * xh1 + 0.5 * zh1
    # step 2 (0.5 -> 0.25): extrapolate against step 1's raw predictions
    xh2, zh2 = x2 * (1 - C * 0.5), x2 * (1 + C * 0.5)
    xe2, ze2 = xh2 + lam * (xh2 - xh1), zh2 + lam * (zh2 - zh1)
    x3 = 0.75 * xe2 + 0.25 * ze2  # gamma_in(0.25) = 0.75, alpha_in(0.25) = 0.25
    # step 3 (0.25 -> 0): its raw x_hat is the sample
    xh3 = x3 * (1 - C * 0.25)
    assert [t.item() for t in model.ts] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [x.item() for x in model.xs] == pytest.approx([X0, x1, x2, x3], rel=2e-6)
    # the trajectory records the RAW x_hat, not the extrapolated one
    assert [v.item() for v in traj] == pytest.approx([X0, xh0, xh1, xh2, xh3], rel=2e-6)
    # and extrapolation made a difference (lam = 0 gives x3 = 0.75 xh2 + 0.25 zh2)
    x3_plain = 0.75 * xh2 + 0.25 * zh2
    assert abs(x3 - x3_plain) > 1e-3
    plain = uc.sample(_linear_model, noise, "Linear", steps=4, gaps=(0.0, 0.25))
    _close(plain.item(), x3_plain * (1 - C * 0.25))


def test_extrapolation_needs_a_fourth_point_to_change_the_sample():
    # With 3 points the first extrapolated state (step 2) is never evaluated again.
    noise = torch.tensor([[X0], [-1.0]])
    a = uc.sample(_linear_model, noise, "Linear", steps=3, gaps=(0.0, 0.25), extrapolation=0.7)
    b = uc.sample(_linear_model, noise, "Linear", steps=3, gaps=(0.0, 0.25))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hand_stochastic_step_with_seeded_generator():
    # steps = 2, gaps (0, 0.5): t = [1, 0.5, 0]; rho = 0.5
    rho, seed = 0.5, 123
    noise = torch.tensor([[X0]])
    out = uc.sample(_linear_model, noise, "Linear", steps=2, gaps=(0.0, 0.5), stochasticity=rho,
                    generator=torch.Generator().manual_seed(seed))
    eps0 = torch.randn((1, 1), generator=torch.Generator().manual_seed(seed)).item()  # step 0's draw
    xh0, zh0 = X0 * (1 - C), X0
    x1 = 0.5 * xh0 + 0.5 * (math.sqrt(1 - rho) * zh0 + math.sqrt(rho) * eps0)
    _close(out.item(), x1 * (1 - C * 0.5))

    # "auto" on the same grid: rho_0 = (sqrt(|0.5 - 1|) sqrt(2 alpha_in(1)) / alpha_in(0.5))^2
    #                              = (sqrt(0.5) sqrt(2) / 0.5)^2 = 4 -> clamped to 1: pure noise.
    out = uc.sample(_linear_model, noise, "Linear", steps=2, gaps=(0.0, 0.5), stochasticity="auto",
                    generator=torch.Generator().manual_seed(seed))
    x1 = 0.5 * xh0 + 0.5 * eps0
    _close(out.item(), x1 * (1 - C * 0.5))


# =============================================================================================
# Parity with the transcribed reference on a nonlinear model
# =============================================================================================

SHAPE = (2, 3, 3)
GAPS = [(0.001, 0.001), (0.0, 0.0), (0.01, 0.0), (0.05, 0.3)]
TIME_DISTS = [(1.0, 1.0, 1.0), (1.17, 0.8, 1.1)]


def _noise(b=3, seed=0):
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _assert_same(ours, ref, what):
    # equal_nan: Linear/ReLinear order 2 with start gap 0 divide by gamma_in = 0 in both
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("gaps", GAPS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_deterministic_sampling_matches_reference(name, gaps):
    model = TinyMLP(SHAPE, seed=1)
    noise = _noise()
    checked = 0
    for steps in (1, 2, 3, 4, 5, 8):
        for order in (1, 2):
            for lam in (0.0, 0.5):
                for td in TIME_DISTS:
                    what = f"{name} steps={steps} order={order} lam={lam} td={td} gaps={gaps}"
                    ref, ref_calls = ref_uni_sample(model, noise, name, steps, 0.0, lam, order, td, gaps)
                    model.calls = 0
                    traj = uc.sample(model, noise, name, steps=steps, order=order, extrapolation=lam,
                                     time_dist=td, gaps=gaps, return_trajectory=True)
                    assert model.calls == ref_calls, what
                    k = (steps + 1) // 2 if order == 2 else steps
                    assert traj.shape == (k + 1, *noise.shape), what
                    assert traj.dtype == torch.float32, what
                    assert torch.equal(traj[0], noise), what
                    _assert_same(traj, ref, what)
                    final = uc.sample(model, noise, name, steps=steps, order=order, extrapolation=lam,
                                      time_dist=td, gaps=gaps)
                    assert final.dtype == torch.float32 and final.shape == noise.shape
                    _assert_same(final, ref[-1], what)
                    if name == "EDM" or gaps[0] > 0 or order == 1:
                        assert torch.isfinite(traj).all(), what
                    checked += 1
    assert checked == 6 * 2 * 2 * 2


@pytest.mark.parametrize("name", NAMES)
def test_float64_noise_matches_reference_to_float32_roundoff(name):
    # With float64 noise the reference's grid is float64 too, but it casts t to float32 before
    # computing x_hat / z_hat; agreement is then at float32 round-off of the output's scale
    # (not bitwise), the ill-conditioned order-2 steps amplifying it a little.
    model = TinyMLP(SHAPE, seed=1)
    noise = _noise(seed=4).double()
    for steps, order, gaps in ((4, 1, (0.001, 0.001)), (5, 2, (0.05, 0.3)), (6, 2, (0.01, 0.0))):
        ref, _ = ref_uni_sample(model, noise, name, steps, 0.0, 0.3, order, (1.17, 0.8, 1.1), gaps)
        ours = uc.sample(model, noise, name, steps=steps, order=order, extrapolation=0.3,
                         time_dist=(1.17, 0.8, 1.1), gaps=gaps, return_trajectory=True)
        assert ours.dtype == torch.float32
        scale = ref.abs().max().item()
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_model_kwargs_and_callback(name):
    model = TinyMLP(SHAPE, seed=2)
    noise = _noise(2, seed=5)
    ref, _ = ref_uni_sample(model, noise, name, 4, 0.0, 0.2, 2, (1.17, 0.8, 1.1), (0.01, 0.0), scale=0.7)
    seen = []
    out = uc.sample(model, noise, name, steps=4, order=2, extrapolation=0.2, time_dist=(1.17, 0.8, 1.1),
                    gaps=(0.01, 0.0), callback=lambda i, x: seen.append((i, x.clone())), scale=0.7)
    _assert_same(out, ref[-1], name)
    assert [i for i, _ in seen] == [0, 1]
    for i, x in seen:
        _assert_same(x, ref[i + 1], f"callback {i}")


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_sampling_matches_reference_with_global_rng(name):
    # The reference draws eps from the global RNG; with generator=None so do we, so the
    # same global seed gives the same path. A torch.Generator with that seed gives the same
    # stream as the seeded global CPU RNG.
    model = TinyMLP(SHAPE, seed=3)
    noise = _noise(2, seed=9)
    for rho in (0.3, 1.0, "auto"):
        for order in (1, 2):
            for steps, gaps, lam in ((3, (0.001, 0.001), 0.0), (6, (0.01, 0.0), 0.4), (5, (0.05, 0.3), 0.0)):
                what = f"{name} rho={rho} order={order} steps={steps} gaps={gaps}"
                torch.manual_seed(77)
                ref, _ = ref_uni_sample(model, noise, name, steps, rho, lam, order, (1.0, 1.0, 1.0), gaps)
                torch.manual_seed(77)
                ours = uc.sample(model, noise, name, steps=steps, order=order, stochasticity=rho,
                                 extrapolation=lam, gaps=gaps, return_trajectory=True)
                _assert_same(ours, ref, what)
                torch.manual_seed(0)  # the global RNG is now irrelevant
                ours_gen = uc.sample(model, noise, name, steps=steps, order=order, stochasticity=rho,
                                     extrapolation=lam, gaps=gaps, return_trajectory=True,
                                     generator=torch.Generator().manual_seed(77))
                _assert_same(ours_gen, ref, what + " (generator)")


def test_auto_spelling_is_case_insensitive():
    model = TinyMLP(SHAPE, seed=4)
    noise = _noise(2)
    outs = [
        uc.sample(model, noise, "EDM", steps=3, stochasticity=s, generator=torch.Generator().manual_seed(1))
        for s in ("auto", "Auto", "AUTO")
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)


# =============================================================================================
# Number of model evaluations
# =============================================================================================


@pytest.mark.parametrize("name", NAMES)
def test_nfe_matches_reference_and_count_nfe(name):
    noise = torch.zeros(2, 3)
    for gaps in ((0.001, 0.001), (0.001, 0.0), (0.0, 0.0), (0.2, 0.5), (0.3, 0.0)):
        for order in (1, 2):
            for steps in range(1, 10):
                calls = []

                def counting(x_t, t):
                    calls.append(1)
                    return 0.1 * x_t + 0.2

                _, ref_calls = ref_uni_sample(counting, noise, name, steps, order=order, gaps=gaps)
                calls.clear()
                uc.sample(counting, noise, name, steps=steps, order=order, gaps=gaps)
                # from reading uni_sample: K = steps (order 1) or (steps+1)//2 (order 2) points;
                # order 2 corrects at every point but the last, and at the last too when
                # the end gap is 0 (its loop bound is then K + 1)
                k = (steps + 1) // 2 if order == 2 else steps
                expected = k if order == 1 else (2 * k if gaps[1] == 0 else 2 * k - 1)
                assert ref_calls == expected, (gaps, order, steps)
                assert len(calls) == expected, (gaps, order, steps)
                assert uc.count_nfe(steps, order, gaps) == expected, (gaps, order, steps)


def test_count_nfe_defaults():
    assert uc.count_nfe(40) == 40
    assert uc.count_nfe(7, 2) == 7  # K = 4 points, 3 corrections
    assert uc.count_nfe(8, 2) == 7
    assert uc.count_nfe(8, 2, (0.001, 0.0)) == 8


# =============================================================================================
# Generators and randomness
# =============================================================================================


@pytest.mark.parametrize("rho", [0.5, "auto"])
def test_stochastic_sampling_is_reproducible_with_a_generator(rho):
    model = TinyMLP(SHAPE, seed=6)
    noise = _noise(3, seed=1)

    def run(seed):
        return uc.sample(model, noise, "Linear", steps=6, stochasticity=rho,
                         generator=torch.Generator().manual_seed(seed))

    a, b, c = run(10), run(10), run(11)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    # and it is really stochastic: differs from the deterministic path
    det = uc.sample(model, noise, "Linear", steps=6)
    assert (a - det).abs().max() > 1e-3


@pytest.mark.parametrize("rho", [0.5, "auto"])
def test_per_row_generators_make_rows_independent(rho):
    model = TinyMLP(SHAPE, seed=7)
    noise = _noise(3, seed=2)
    kw = dict(steps=5, order=2, stochasticity=rho, gaps=(0.01, 0.0))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = uc.sample(model, noise, "TrigFlow", generator=gens(10, 11, 12), **kw)
    for i, seed in enumerate((10, 11, 12)):
        single = uc.sample(model, noise[i : i + 1], "TrigFlow", generator=gens(seed), **kw)
        torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-6, atol=1e-6)
    # a single generator on a one-row batch is the same stream
    single0 = uc.sample(model, noise[:1], "TrigFlow", generator=torch.Generator().manual_seed(10), **kw)
    torch.testing.assert_close(batch[:1], single0, rtol=1e-6, atol=1e-6)
    # changing row 2's generator changes row 2 only
    other = uc.sample(model, noise, "TrigFlow", generator=gens(10, 11, 99), **kw)
    torch.testing.assert_close(other[:2], batch[:2], rtol=0, atol=0)
    assert (other[2] - batch[2]).abs().max() > 1e-3
    # a generator list must have one generator per row
    with pytest.raises(ValueError, match="generator"):
        uc.sample(model, noise, "TrigFlow", generator=gens(1, 2), **kw)


def test_deterministic_sampling_leaves_the_global_rng_alone():
    model = TinyMLP(SHAPE, seed=8)
    noise = _noise(2)
    state = torch.get_rng_state()
    a = uc.sample(model, noise, "EDM", steps=4, order=2)
    assert torch.equal(torch.get_rng_state(), state)
    # rho > 0 with a generator does not touch it either
    uc.sample(model, noise, "EDM", steps=4, stochasticity=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    # and rho = 0 ignores generators entirely
    b = uc.sample(model, noise, "EDM", steps=4, order=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stochastic_sampling_without_generator_uses_the_global_rng():
    model = TinyMLP(SHAPE, seed=8)
    noise = _noise(2)
    torch.manual_seed(3)
    a = uc.sample(model, noise, "ReLinear", steps=4, stochasticity=0.5)
    torch.manual_seed(3)
    b = uc.sample(model, noise, "ReLinear", steps=4, stochasticity=0.5)
    torch.manual_seed(4)
    c = uc.sample(model, noise, "ReLinear", steps=4, stochasticity=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


# =============================================================================================
# Shapes and dtypes
# =============================================================================================


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float64])
def test_model_sees_float32_inputs_and_trajectory_shape(noise_dtype):
    seen = []

    def model(x_t, t, y=None):
        seen.append((x_t.dtype, tuple(x_t.shape), t.dtype, tuple(t.shape), y))
        return 0.3 * x_t

    noise = torch.randn(4, 2, 5, 5, dtype=noise_dtype)
    traj = uc.sample(model, noise, "EDM", steps=5, order=2, return_trajectory=True, y="label")
    k = 3
    assert len(seen) == uc.count_nfe(5, 2) == 2 * k - 1
    for x_dtype, x_shape, t_dtype, t_shape, y in seen:
        assert x_dtype == torch.float32 and x_shape == (4, 2, 5, 5)
        assert t_dtype == torch.float32 and t_shape == (4,)
        assert y == "label"
    assert traj.shape == (k + 1, 4, 2, 5, 5)
    assert traj.dtype == torch.float32
    torch.testing.assert_close(traj[0], noise.float(), rtol=0, atol=0)
    out = uc.sample(model, noise, "EDM", steps=5, order=2, y="label")
    assert out.dtype == torch.float32 and out.shape == noise.shape
    torch.testing.assert_close(out, traj[-1], rtol=0, atol=0)


def test_model_sees_one_time_per_row_equal_to_the_grid():
    ts = []
    noise = torch.randn(3, 4)
    uc.sample(lambda x, t: ts.append(t.clone()) or x, noise, "ReLinear", steps=4, gaps=(0.1, 0.1))
    grid = [0.1 + i * (0.8 / 3) for i in range(4)]  # ReLinear integrates 0 -> 1: t = u
    for t, expected in zip(ts, grid):
        assert torch.allclose(t, torch.full((3,), expected), atol=1e-6)


# =============================================================================================
# Time grid
# =============================================================================================


def _f32(v):
    return float(torch.tensor(v, dtype=torch.float64).float())


def test_time_grid_linear_uniform_by_hand():
    # K = 4 points over [0.001, 0.999], reversed for Linear (noise at t = 1), then a trailing 0
    grid = uc.time_grid("Linear", 4)
    assert grid.dtype == torch.float32 and grid.shape == (5,)
    u = [0.001, 0.001 + 0.998 / 3, 0.001 + 2 * 0.998 / 3, 0.999]
    expected = [1 - _f32(v) for v in u] + [0.0]
    assert grid.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert grid[-1].item() == 0.0


def test_time_grid_power_warps_by_hand():
    # (a, b, c) = (2, 1, 1): (1 - (1 - u^2)) = u^2; gaps (0, 0.2), K = 3: u = [0, 0.4, 0.8]
    grid = uc.time_grid("EDM", 3, time_dist=(2.0, 1.0, 1.0), gaps=(0.0, 0.2))
    assert grid.tolist() == pytest.approx([1.0, 1 - 0.16, 1 - 0.64, 0.0], abs=1e-6)
    # (1, 1, 0.5): sqrt(u); ReLinear is not reversed
    grid = uc.time_grid("ReLinear", 3, time_dist=(1.0, 1.0, 0.5), gaps=(0.0, 0.19))
    assert grid.tolist() == pytest.approx([0.0, math.sqrt(0.405), math.sqrt(0.81), 0.0], abs=1e-6)
    # (1, 2, 1): 1 - (1 - u)^2
    grid = uc.time_grid("TrigFlow", 2, time_dist=(1.0, 2.0, 1.0), gaps=(0.5, 0.0))
    # end gap 0: u = linspace(0.5, 1, 3)[:-1] = [0.5, 0.75]
    assert grid.tolist() == pytest.approx([1 - 0.75, 1 - 0.9375, 0.0], abs=1e-6)


def test_time_grid_kumaraswamy_end_gap_zero_order2():
    # order 2, steps 7 -> K = 4; end gap 0: u = linspace(0.1, 1, 5)[:-1] = [0.1, 0.325, 0.55, 0.775]
    a, b, c = 1.17, 0.8, 1.1
    grid = uc.time_grid("ReLinear", 7, order=2, time_dist=(a, b, c), gaps=(0.1, 0.0))
    u = [_f32(v) for v in (0.1, 0.325, 0.55, 0.775)]  # cast to float32 before the warp
    expected = [(1 - (1 - v**a) ** b) ** c for v in u] + [0.0]
    assert grid.dtype == torch.float32
    assert grid.tolist() == pytest.approx(expected, rel=2e-6, abs=1e-7)
    # the same warp, reversed, for Linear
    grid = uc.time_grid("Linear", 7, order=2, time_dist=(a, b, c), gaps=(0.1, 0.0))
    assert grid.tolist() == pytest.approx([1 - v for v in expected[:-1]] + [0.0], rel=2e-6, abs=1e-7)


def test_time_grid_matches_transcribed_reference():
    like = torch.zeros(1)
    for name in NAMES:
        for steps in (1, 2, 5, 9):
            for order in (1, 2):
                for td in TIME_DISTS:
                    for gaps in GAPS:
                        ref, _ = ref_grid(name, steps, order, td, gaps, like)
                        got = uc.time_grid(name, steps, order, td, gaps)
                        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


# =============================================================================================
# Argument validation
# =============================================================================================


def _run(**kw):
    args = dict(steps=3)
    args.update(kw)
    return uc.sample(lambda x, t: x, torch.zeros(2, 3), "Linear", **args)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps="4"), "steps"),
        (dict(order=3), "order"),
        (dict(order=0), "order"),
        (dict(gaps=(-0.1, 0.001)), "gaps"),
        (dict(gaps=(0.001, -0.001)), "gaps"),
        (dict(gaps=(0.5, 0.5)), "gaps"),
        (dict(gaps=(0.7, 0.6)), "gaps"),
        (dict(gaps=(1.0, 0.0)), "gaps"),
        (dict(gaps=(0.001,)), "gaps"),
        (dict(time_dist=(0.0, 1.0, 1.0)), "time_dist"),
        (dict(time_dist=(1.0, -1.0, 1.0)), "time_dist"),
        (dict(time_dist=(1.0, 1.0, 0.0)), "time_dist"),
        (dict(time_dist=(1.0, 1.0)), "time_dist"),
        (dict(time_dist=(1.0, 1.0, 1.0, 1.0)), "time_dist"),
        (dict(stochasticity=1.5), "stochasticity"),
        (dict(stochasticity=-0.1), "stochasticity"),
        (dict(stochasticity="sometimes"), "stochasticity"),
        (dict(extrapolation=-0.1), "extrapolation"),
    ],
)
def test_bad_arguments_raise_a_clear_error(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        _run(**kwargs)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(steps=0), "steps"),
        (dict(order=3), "order"),
        (dict(gaps=(0.6, 0.4)), "gaps"),
        (dict(time_dist=(1.0, 0.0, 1.0)), "time_dist"),
    ],
)
def test_time_grid_validates_too(kwargs, argument):
    args = dict(steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        uc.time_grid("Linear", **args)


def test_boundary_arguments_are_accepted():
    for kw in (dict(stochasticity=0.0), dict(stochasticity=1.0), dict(extrapolation=0.0),
               dict(gaps=(0.0, 0.0)), dict(gaps=(0.0, 0.999)), dict(steps=1)):
        out = _run(**kw)
        assert out.shape == (2, 3)


def test_bad_noise_and_transport():
    with pytest.raises(ValueError, match="noise"):
        uc.sample(lambda x, t: x, torch.zeros(2, 3, dtype=torch.int64), "Linear", steps=2)
    with pytest.raises(ValueError, match="transport"):
        uc.sample(lambda x, t: x, torch.zeros(2, 3), "Nope", steps=2)
