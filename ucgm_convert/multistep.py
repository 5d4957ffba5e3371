"""Multistep corrections of the UCGM-S step: second order at one model evaluation per step.

Derivation. With a = alpha_in, g = gamma_in, the log signal-to-noise lambda = log g - log a and
y = x_t / a = z + e^lambda x, the probability-flow ODE is dy / d(e^lambda) = x_hat, so over one
step of h_i = lambda_{i+1} - lambda_i

    x_{i+1} = (a_{i+1} / a_i) x_i + a_{i+1} int_{lambda_i}^{lambda_{i+1}} e^lambda x_hat(lambda) dlambda.

x_hat held at x_hat_i gives the UCGM-S step x_{i+1} = g_{i+1} x_hat_i + a_{i+1} z_hat_i (rho = 0);
its coefficient of x_hat_i is C_i = g_{i+1} (1 - e^{-h_i}). With stochasticity rho the step keeps
sqrt(1-rho) of z_hat, x_{i+1} = C_i x_hat_i + sqrt(1-rho) (a_{i+1}/a_i) x_i + noise with
C_i = g_{i+1} (1 - sqrt(1-rho) e^{-h_i}) (DPM-Solver++ SDE's e^{-h} = sqrt(1-rho)); the corrections
below are scaled by this C_i.

Predictor ("multistep", DPM-Solver++ 2M, Lu et al. 2022): x_hat linear in lambda through the
last two predictions m_{i-1}, m_i (m = raw x_hat) adds, in 2M's midpoint form,

    C_i * h_i / (2 h_{i-1}) * (m_i - m_{i-1})                             (local error O(h^3))

Corrector ("multistep-pc", UniPC's B(h) = e^h - 1 corrector "bh2", Zhao et al. 2023): once m_{i+1}
has been evaluated at the predicted x_{i+1}, the step i -> i+1 is redone with x_hat interpolating
m_{i-1}, m_i, m_{i+1}; the corrected state differs from the predicted one by

    s_{i+1} = C_i * (r_prev (h_i / h_{i-1}) (m_i - m_{i-1}) + r_cur (m_{i+1} - m_i)) - (predictor term of step i)

with (r_prev, r_cur) solving [[1, 1], [-h_{i-1}/h_i, 1]] r = (phi_2, 2 phi_3) / B(-h_i) (UniC's order
conditions; r_cur = 1/2, r_prev = 0 when there is no m_{i-1}). m_{i+1} is not re-evaluated, so
this costs nothing; s_{i+1} enters the next step through its coefficient sqrt(1-rho) a_{i+2}/a_{i+1}.

Conditioning: only logs of the coefficients are taken; the divisions are by h_{i-1} > 0, by
1 + h_{i-1}/h_i > 1 and by B(-h_i) = e^{-h_i} - 1 != 0, and a_{i+2}/a_{i+1} <= 1. A vanishing g_i at the
noise end (start gap 0) gives h = inf and zero weights, never a division by g_i ~ 0 (the reference's
order 2 divides x_i by g_i). The last grid point is never a step's start, so a_i > 0 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .transports import Transport


def log_snr(transport: Transport, t: Tensor) -> Tensor:
    """lambda(t) = log gamma_in(t) - log alpha_in(t) in float64 (-inf where gamma_in = 0)."""
    t = t.double()
    return torch.log(transport.gamma_in(t)) - torch.log(transport.alpha_in(t))


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den for step sizes, 0 where den is not a positive step (inf / inf never happens: num is finite)."""
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def corrector_weights(h_before: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
    """UniC (bh2) weights (r_prev * h / h_before, r_cur) of (m_i - m_{i-1}) and (m_{i+1} - m_i)."""
    hh = -h
    b_h = torch.expm1(hh)
    phi_2 = torch.expm1(hh) / hh - 1
    phi_3 = phi_2 / hh - 0.5
    b1, b2 = phi_2 / b_h, 2 * phi_3 / b_h
    if h_before is None:
        return torch.zeros_like(h), torch.full_like(h, 0.5)
    rk = -_ratio(h_before, h) if bool(h_before < torch.inf) else -torch.full_like(h, torch.inf)
    r_prev = (b1 - b2) / (1 - rk)
    return r_prev * _ratio(h, h_before), b1 - r_prev


class Multistep:
    """The history a multistep solver keeps along one `sample` call: raw predictions and corrections."""

    def __init__(self, transport: Transport, grid: Tensor, corrector: bool) -> None:
        self.transport, self.corrector = transport, corrector
        self.t = grid.double().cpu()  # scalar coefficients on the host: no device syncs in the loop
        self.lam = log_snr(transport, self.t)
        self.m: list[Tensor] = []  # m_{i-1}, m_i
        self.coef = self.pred = None  # C and the predictor term (without C) of the previous step

    def h(self, i: int) -> Tensor:
        """h_i = lambda(t_{i+1}) - lambda(t_i)."""
        return self.lam[i + 1] - self.lam[i]

    def step(self, i: int, m: Tensor, rho: Tensor | float) -> Tensor:
        """What to add to the UCGM-S x_{i+1} after the evaluation at t_i gave the raw prediction m."""
        keep = torch.as_tensor(1.0 - rho, dtype=torch.float64).sqrt()
        a_cur, a_next = self.transport.alpha_in(self.t[i]), self.transport.alpha_in(self.t[i + 1])
        coef = self.transport.gamma_in(self.t[i + 1]) * (1 - keep * torch.exp(-self.h(i)))
        extra = torch.zeros_like(m)
        if self.corrector and self.m:  # s_i: corrected minus predicted x_i, carried by the x_i coefficient
            w_prev, w_cur = corrector_weights(self.h(i - 2) if i >= 2 else None, self.h(i - 1))
            shift = w_cur * (m - self.m[-1]) - self.pred
            if i >= 2:
                shift = shift + w_prev * (self.m[-1] - self.m[-2])
            extra = extra + keep * (a_next / a_cur) * self.coef * shift
        pred = _ratio(self.h(i), 2 * self.h(i - 1)) * (m - self.m[-1]) if self.m else torch.zeros_like(m)
        self.m = [*self.m[-1:], m]
        self.coef, self.pred = coef, pred
        return extra + coef * pred
