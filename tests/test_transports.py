"""Transports: coefficient formulas, exact recovery of (x, z) from (x_t, F), direction, lookup.

Every expected value here is computed from the formulas of the method notes
(shared/reference/ucgm-method.md), written out independently with Python's `math` module,
never copied from the library's output.
"""

from __future__ import annotations

import math

import pytest
import torch

import ucgm_convert as uc
from ucgm_convert.transports import Transport

NAMES = ("Linear", "ReLinear", "TrigFlow", "EDM", "TrigLinear", "Random")
ALL_NAMES = (*NAMES, "DiscreteVP")  # DiscreteVP (a table, not a formula) has its own test module


# --- the formulas of the method notes, on Python floats -------------------------------------


def _edm_sigma(t: float) -> float:
    return math.exp(4 * (2.68 * t - 1.59))


def _edm_n(t: float) -> float:
    return math.sqrt(_edm_sigma(t) ** 2 + 0.25)


FORMULAS = {
    # name: (alpha_in, gamma_in, alpha_to, gamma_to)
    "Linear": (lambda t: t, lambda t: 1 - t, lambda t: 1.0, lambda t: -1.0),
    "ReLinear": (lambda t: 1 - t, lambda t: t, lambda t: -1.0, lambda t: 1.0),
    # TrigFlow uses 1.57, NOT pi/2 (the reference's constant)
    "TrigFlow": (
        lambda t: math.sin(1.57 * t),
        lambda t: math.cos(1.57 * t),
        lambda t: math.cos(1.57 * t),
        lambda t: -math.sin(1.57 * t),
    ),
    "EDM": (
        lambda t: _edm_sigma(t) / _edm_n(t),
        lambda t: 1 / _edm_n(t),
        lambda t: -0.5 / _edm_n(t),
        lambda t: 2 * _edm_sigma(t) / _edm_n(t),
    ),
    # TrigLinear: TrigFlow's path with Linear's target
    "TrigLinear": (lambda t: math.sin(1.57 * t), lambda t: math.cos(1.57 * t), lambda t: 1.0, lambda t: -1.0),
    # "Random" is a fixed transport despite its name (methods/transports/random.py)
    "Random": (lambda t: math.sin(1.57 * t), lambda t: 1 - t, lambda t: 1.0, lambda t: -1 - math.exp(-5 * t)),
}

# 101 times covering [0, 1] including both endpoints, plus a few irregular ones.
TIMES = [i / 100 for i in range(101)] + [1e-6, 0.001, 0.0173, 0.31415, 0.5 + 1e-9, 0.999, 1 - 1e-6]


def _coeffs(T, t):
    return T.alpha_in(t), T.gamma_in(t), T.alpha_to(t), T.gamma_to(t)


# --- coefficient values ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_match_the_formulas(name):
    T = uc.get_transport(name)
    t = torch.tensor(TIMES, dtype=torch.float64)
    got = _coeffs(T, t)
    for which, fn, value in zip(("alpha_in", "gamma_in", "alpha_to", "gamma_to"), FORMULAS[name], got):
        expected = torch.tensor([fn(v) for v in TIMES], dtype=torch.float64)
        assert value.shape == t.shape, which
        assert value.dtype == torch.float64, which
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14, msg=f"{name}.{which}")


def test_edm_coefficients_at_hand_picked_times():
    """EDM written out once more, literally: sigma = exp(4(2.68 t - 1.59)), n = sqrt(sigma^2+1/4)."""
    T = uc.get_transport("EDM")
    for t in (0.0, 0.25, 0.5, 0.593283582, 0.75, 1.0):
        sigma = math.exp(4 * (2.68 * t - 1.59))
        n = math.sqrt(sigma * sigma + 0.25)
        tt = torch.tensor(t, dtype=torch.float64)
        assert T.alpha_in(tt).item() == pytest.approx(sigma / n, rel=1e-12)
        assert T.gamma_in(tt).item() == pytest.approx(1 / n, rel=1e-12)
        assert T.alpha_to(tt).item() == pytest.approx(-0.5 / n, rel=1e-12)
        assert T.gamma_to(tt).item() == pytest.approx(2 * sigma / n, rel=1e-12)
    # the noise-level range the notes quote: t in [0, 1] spans sigma ~ 0.0017 .. 78
    assert T.sigma(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(math.exp(-6.36), rel=1e-12)
    assert T.sigma(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(math.exp(4.36), rel=1e-12)
    # the inverse of sigma(t)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(T.time_of_sigma(T.sigma(t)), t, rtol=0, atol=1e-12)


def test_trigflow_uses_1_57_not_half_pi():
    T = uc.get_transport("TrigFlow")
    one = torch.tensor(1.0, dtype=torch.float64)
    # cos(1.57) = 7.963e-4, whereas cos(pi/2) would be ~6e-17
    assert T.gamma_in(one).item() == pytest.approx(math.cos(1.57), rel=1e-12)
    assert T.gamma_in(one).item() > 7e-4
    assert T.alpha_in(one).item() == pytest.approx(math.sin(1.57), rel=1e-12)
    assert T.alpha_in(one).item() < 1.0


@pytest.mark.parametrize("name", ("Linear", "ReLinear", "TrigFlow", "EDM"))
def test_dent_is_constant_and_never_zero(name):
    """dent = alpha_in gamma_to - gamma_in alpha_to: -1, 1, -(sin^2+cos^2) = -1 and
    (2 sigma^2 + 1/2)/n^2 = 2, so no transport is singular anywhere on [0, 1], endpoints included."""
    expected = {"Linear": -1.0, "ReLinear": 1.0, "TrigFlow": -1.0, "EDM": 2.0}[name]
    T = uc.get_transport(name)
    t = torch.tensor(TIMES, dtype=torch.float64)
    dent = T.dent(t)
    torch.testing.assert_close(dent, torch.full_like(t, expected), rtol=1e-12, atol=1e-12)
    a, g, ao, go = (torch.tensor([fn(v) for v in TIMES], dtype=torch.float64) for fn in FORMULAS[name])
    torch.testing.assert_close(dent, a * go - g * ao, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_keep_shape_and_dtype(name, dtype):
    """Constant coefficients too (Linear's alpha_to = 1) come back as tensors shaped and typed like t."""
    T = uc.get_transport(name)
    t = torch.rand(5, 1, 1, 1, dtype=dtype)
    for value in (*_coeffs(T, t), T.dent(t)):
        assert torch.is_tensor(value)
        assert value.shape == t.shape
        assert value.dtype == dtype


@pytest.mark.parametrize("name", ("TrigLinear", "Random"))
def test_varying_dent_stays_away_from_zero(name):
    """TrigLinear: dent = -(sin + cos)(1.57 t), in [-1.415, -1]; Random: -sin(1.57 t)(1 + e^-5t) - (1 - t),
    in [-1.268, -1]: both bounded away from 0 on [0, 1] (measured on 10001 points)."""
    T = uc.get_transport(name)
    t = torch.linspace(0, 1, 10001, dtype=torch.float64)
    a, g, ao, go = (torch.tensor([fn(v) for v in t.tolist()], dtype=torch.float64) for fn in FORMULAS[name])
    torch.testing.assert_close(T.dent(t), a * go - g * ao, rtol=1e-12, atol=1e-12)
    assert T.dent(t).max().item() < -0.99


# --- exact recovery of x and z from (x_t, F) ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_predictions_recover_x_and_z_for_scalar_times(name):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 1.7 + 0.3
    z = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    T = uc.get_transport(name)
    a_in, g_in, a_to, g_to = FORMULAS[name]
    for tv in TIMES:
        t = torch.tensor(tv, dtype=torch.float64)
        # built from the notes' formulas, not from the library
        x_t = a_in(tv) * z + g_in(tv) * x
        f = a_to(tv) * z + g_to(tv) * x
        torch.testing.assert_close(T.interpolate(x, z, t), x_t, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(T.target(x, z, t), f, rtol=1e-13, atol=1e-13)
        x_hat, z_hat = T.predictions(x_t, f, t)
        torch.testing.assert_close(x_hat, x, rtol=1e-12, atol=1e-12, msg=f"{name} x at t={tv}")
        torch.testing.assert_close(z_hat, z, rtol=1e-12, atol=1e-12, msg=f"{name} z at t={tv}")


@pytest.mark.parametrize("name", NAMES)
def test_predictions_broadcast_per_sample_times(name):
    """t of shape [B,1,1,1] against x of [B,C,H,W]: every row uses its own time."""
    gen = torch.Generator().manual_seed(7)
    tv = [0.0, 0.001, 0.2, 0.5, 0.77, 0.999, 1.0]
    b = len(tv)
    x = torch.randn(b, 2, 3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(b, 2, 3, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor(tv, dtype=torch.float64).view(b, 1, 1, 1)
    T = uc.get_transport(name)
    a_in, g_in, a_to, g_to = FORMULAS[name]
    col = lambda fn: torch.tensor([fn(v) for v in tv], dtype=torch.float64).view(b, 1, 1, 1)  # noqa: E731
    x_t = col(a_in) * z + col(g_in) * x
    f = col(a_to) * z + col(g_to) * x
    torch.testing.assert_close(T.interpolate(x, z, t), x_t, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(T.target(x, z, t), f, rtol=1e-13, atol=1e-13)
    x_hat, z_hat = T.predictions(x_t, f, t)
    assert x_hat.shape == x.shape and z_hat.shape == z.shape
    torch.testing.assert_close(x_hat, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_hat, z, rtol=1e-12, atol=1e-12)
    # row i agrees with a scalar-time call at tv[i]
    for i, v in enumerate(tv):
        xi, zi = T.predictions(x_t[i], f[i], torch.tensor(v, dtype=torch.float64))
        torch.testing.assert_close(x_hat[i], xi, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(z_hat[i], zi, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_predictions_are_consistent_for_arbitrary_outputs(name):
    """For any F (not only a true target), x_hat and z_hat re-interpolate to x_t and re-target to F."""
    gen = torch.Generator().manual_seed(99)
    x_t = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    f = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    T = uc.get_transport(name)
    x_hat, z_hat = T.predictions(x_t, f, t)
    torch.testing.assert_close(T.interpolate(x_hat, z_hat, t), x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.target(x_hat, z_hat, t), f, rtol=1e-12, atol=1e-12)


# --- integration direction ------------------------------------------------------------------


@pytest.mark.parametrize("name, forward", [("Linear", False), ("ReLinear", True), ("TrigFlow", False), ("EDM", False),
                                           ("TrigLinear", False), ("Random", False), ("DiscreteVP", False)])
def test_integration_direction(name, forward):
    assert uc.get_transport(name).integrates_forward is forward


class _Custom(Transport):
    """A transport with chosen values at t = 0 (the coefficients only matter at 0 here)."""

    name = "Custom"

    def __init__(self, a0: float, g0: float):
        self.a0, self.g0 = a0, g0

    def alpha_in(self, t):
        return self.a0 + (1 - self.a0) * t

    def gamma_in(self, t):
        return self.g0 * (1 - t)

    def alpha_to(self, t):
        return torch.ones_like(t)

    def gamma_to(self, t):
        return -torch.ones_like(t)


def test_custom_transport_without_a_zero_endpoint_is_rejected():
    T = _Custom(a0=0.5, g0=0.5)
    with pytest.raises(ValueError):
        T.integrates_forward
    # and the sampler refuses it rather than sampling along a meaningless grid
    with pytest.raises(ValueError):
        uc.sample(lambda x, t: x, torch.zeros(1, 2), transport=T, steps=2)


def test_direction_threshold_is_the_references_0_005():
    assert _Custom(a0=0.5, g0=0.004).integrates_forward is True  # |gamma_in(0)| < 0.005
    assert _Custom(a0=0.004, g0=0.5).integrates_forward is False  # |alpha_in(0)| < 0.005
    assert _Custom(a0=-0.004, g0=0.5).integrates_forward is False  # absolute value
    with pytest.raises(ValueError):
        _Custom(a0=0.006, g0=0.006).integrates_forward
    # gamma_in(0) ~ 0 wins when both are ~0, as in the reference's if/elif
    assert _Custom(a0=0.001, g0=0.001).integrates_forward is True


# --- lookup ---------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        uc.get_transport("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ALL_NAMES:
        assert name in message


@pytest.mark.parametrize("spelling", ["linear", "LINEAR", "Linear", "relinear", "ReLINEAR", "trigflow", "TRIGFLOW", "edm", "Edm",
                                      "triglinear", "RANDOM", "discretevp"])
def test_names_are_case_insensitive(spelling):
    T = uc.get_transport(spelling)
    assert T.name.lower() == spelling.lower()
    assert isinstance(T, Transport)


def test_known_transports_and_distinct_instances():
    assert set(uc.TRANSPORTS) == set(ALL_NAMES)
    for name in ALL_NAMES:
        T = uc.get_transport(name)
        assert type(T).__name__ == name
        assert isinstance(T, uc.TRANSPORTS[name])


def test_transport_instance_passes_through():
    T = uc.get_transport("EDM")
    assert uc.get_transport(T) is T
    custom = _Custom(a0=0.0, g0=1.0)
    assert uc.get_transport(custom) is custom


def test_non_string_non_transport_is_rejected():
    with pytest.raises((TypeError, ValueError)):
        uc.get_transport(3)
