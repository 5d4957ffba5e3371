"""Transports: the interpolation between data and noise and the network's target.

Every transport is four coefficient functions of the time t in [0, 1]:

    x_t = alpha_in(t) * z + gamma_in(t) * x        (z: noise, x: data)
    F   = alpha_to(t) * z + gamma_to(t) * x        (what the network predicts)

so that, with dent = alpha_in * gamma_to - gamma_in * alpha_to, both endpoints are
recovered from (x_t, F):

    z = (x_t * gamma_to - F * gamma_in) / dent,    x = (F * alpha_in - x_t * alpha_to) / dent

Values follow the UCGM reference implementation (LINs-lab/UCGM, methods/transports/), except
DiscreteVP (DiT's discrete schedule, which the reference lacks). `network_time(t)` is the time
input the network was trained with (t itself, except DiscreteVP's timestep index).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

HALF_PI = 1.57  # the reference uses 1.57, not pi / 2; kept for exact agreement


class Transport:
    """Base class: subclasses define the four coefficients as tensor functions of t."""

    name: str = ""

    def alpha_in(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def gamma_in(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha_to(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def gamma_to(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dent(self, t: Tensor) -> Tensor:
        """The determinant alpha_in * gamma_to - gamma_in * alpha_to (never 0 on [0, 1])."""
        return self.alpha_in(t) * self.gamma_to(t) - self.gamma_in(t) * self.alpha_to(t)

    def interpolate(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_in(t) z + gamma_in(t) x; t broadcasts against x."""
        return self.alpha_in(t) * z + self.gamma_in(t) * x

    def target(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The network target F = alpha_to(t) z + gamma_to(t) x."""
        return self.alpha_to(t) * z + self.gamma_to(t) * x

    def predictions(self, x_t: Tensor, f: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat, z_hat): the data and noise implied by the network output F at (x_t, t)."""
        dent = self.dent(t)
        x_hat = (f * self.alpha_in(t) - x_t * self.alpha_to(t)) / dent
        z_hat = (x_t * self.gamma_to(t) - f * self.gamma_in(t)) / dent
        return x_hat, z_hat

    def network_time(self, t: Tensor) -> Tensor:
        """The time input the network was trained on at transport time t; the identity by default."""
        return t

    @property
    def integrates_forward(self) -> bool:
        """True when sampling runs t: 0 -> 1 (noise at t=0), False for 1 -> 0.

        Detected as the reference does: |gamma_in(0)| < 0.005 means t=0 is pure noise;
        else |alpha_in(0)| < 0.005 means t=0 is pure data.
        """
        zero = torch.zeros((), dtype=torch.float64)
        if self.gamma_in(zero).abs().item() < 0.005:
            return True
        if self.alpha_in(zero).abs().item() < 0.005:
            return False
        raise ValueError(
            f"transport {self.name!r} has neither gamma_in(0)=0 nor alpha_in(0)=0: "
            "no integration direction"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _const(t: Tensor, value: float) -> Tensor:
    """A constant coefficient with t's shape, dtype and device."""
    return torch.full_like(t, value)


class Linear(Transport):
    """Rectified flow with noise at t=1: x_t = t z + (1-t) x, F = z - x (SiT, REPA-E)."""

    name = "Linear"

    def alpha_in(self, t: Tensor) -> Tensor:
        return t * 1.0

    def gamma_in(self, t: Tensor) -> Tensor:
        return 1 - t

    def alpha_to(self, t: Tensor) -> Tensor:
        return _const(t, 1.0)

    def gamma_to(self, t: Tensor) -> Tensor:
        return _const(t, -1.0)


class ReLinear(Transport):
    """Rectified flow with noise at t=0: x_t = (1-t) z + t x, F = x - z (LightningDiT, DDT)."""

    name = "ReLinear"

    def alpha_in(self, t: Tensor) -> Tensor:
        return 1 - t

    def gamma_in(self, t: Tensor) -> Tensor:
        return t * 1.0

    def alpha_to(self, t: Tensor) -> Tensor:
        return _const(t, -1.0)

    def gamma_to(self, t: Tensor) -> Tensor:
        return _const(t, 1.0)


class TrigFlow(Transport):
    """Trigonometric flow: x_t = sin(1.57 t) z + cos(1.57 t) x, F = cos z - sin x."""

    name = "TrigFlow"

    def alpha_in(self, t: Tensor) -> Tensor:
        return torch.sin(t * HALF_PI)

    def gamma_in(self, t: Tensor) -> Tensor:
        return torch.cos(t * HALF_PI)

    def alpha_to(self, t: Tensor) -> Tensor:
        return torch.cos(t * HALF_PI)

    def gamma_to(self, t: Tensor) -> Tensor:
        return -torch.sin(t * HALF_PI)


class EDM(Transport):
    """EDM (Karras et al.) with sigma = exp(4 (2.68 t - 1.59)) and sigma_data = 0.5.

    x_t is the c_in-scaled noisy input (x + sigma z) / n and F the raw network target
    (2 sigma x - 0.5 z) / n, where n = sqrt(sigma^2 + sigma_data^2).
    """

    name = "EDM"
    sigma_data = 0.5

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        """The EDM noise level at time t; t in [0, 1] spans sigma 0.0017 .. 78."""
        return ((t * 2.68 - 1.59) * 4).exp()

    @staticmethod
    def time_of_sigma(sigma: Tensor) -> Tensor:
        """Inverse of `sigma`: t = (ln(sigma) / 4 + 1.59) / 2.68."""
        return (torch.log(sigma) / 4 + 1.59) / 2.68

    def _norm(self, t: Tensor) -> Tensor:
        return (self.sigma(t) ** 2 + self.sigma_data**2) ** 0.5

    def alpha_in(self, t: Tensor) -> Tensor:
        return self.sigma(t) / self._norm(t)

    def gamma_in(self, t: Tensor) -> Tensor:
        return 1 / self._norm(t)

    def alpha_to(self, t: Tensor) -> Tensor:
        return -self.sigma_data / self._norm(t)

    def gamma_to(self, t: Tensor) -> Tensor:
        return 2 * self.sigma(t) / self._norm(t)


class TrigLinear(Transport):
    """Trigonometric path with a linear target: x_t = sin(1.57 t) z + cos(1.57 t) x, F = z - x."""

    name = "TrigLinear"

    def alpha_in(self, t: Tensor) -> Tensor:
        return torch.sin(t * HALF_PI)

    def gamma_in(self, t: Tensor) -> Tensor:
        return torch.cos(t * HALF_PI)

    def alpha_to(self, t: Tensor) -> Tensor:
        return _const(t, 1.0)

    def gamma_to(self, t: Tensor) -> Tensor:
        return _const(t, -1.0)


class Random(Transport):
    """The reference's "Random" transport, a fixed (not random) mixed path:
    x_t = sin(1.57 t) z + (1-t) x, F = z - (1 + exp(-5 t)) x."""

    name = "Random"

    def alpha_in(self, t: Tensor) -> Tensor:
        return torch.sin(t * HALF_PI)

    def gamma_in(self, t: Tensor) -> Tensor:
        return 1 - t

    def alpha_to(self, t: Tensor) -> Tensor:
        return _const(t, 1.0)

    def gamma_to(self, t: Tensor) -> Tensor:
        return -1 - torch.exp(-5 * t)


class DiscreteVP(Transport):
    """DiT's discrete VP schedule with epsilon prediction: x_t = sqrt(1-abar) z + sqrt(abar) x, F = z.

    betas = linspace(1e-4, 0.02, 1000) and abar_k = prod_{i<=k}(1 - beta_i) (float64, as DiT).
    Timestep k in 0..999 sits at t = (k + 1) / 1000 and t = 0 is clean data (abar = 1, DDPM's
    alphas_cumprod_prev[0]): alpha_in(0) = 0, so sampling runs t: 1 -> 0 like Linear. Between steps
    abar is interpolated geometrically (log-linearly), which is exact at every step.
    """

    name = "DiscreteVP"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000) -> None:
        self.steps = steps
        betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)  # numpy's, bit for bit DiT's
        self.table = torch.from_numpy(np.append(1.0, np.cumprod(1.0 - betas)))

    def _position(self, t: Tensor) -> Tensor:
        """s = steps t in float64, snapped to the integer within 1e-9 so that float64 t = k/steps is exact."""
        s = t.to(torch.float64) * self.steps
        whole = s.round()
        return torch.where((s - whole).abs() < 1e-9, whole, s)

    def alphas_cumprod(self, t: Tensor) -> Tensor:
        """abar(t) in float64: A_j^(1-f) A_{j+1}^f at s = steps t = j + f, A = [1, abar_0, ..., abar_999]."""
        s = self._position(t)
        j = s.floor().clamp(0, self.steps - 1)
        frac = s - j
        table = self.table.to(s.device)
        j = j.long()
        return table[j] ** (1 - frac) * table[j + 1] ** frac

    def network_time(self, t: Tensor) -> Tensor:
        """DiT's timestep k = steps t - 1, clamped to the trained range [0, steps - 1]."""
        return (self._position(t) - 1).clamp(0, self.steps - 1).to(t.dtype)

    def alpha_in(self, t: Tensor) -> Tensor:
        return (1 - self.alphas_cumprod(t)).clamp(min=0).sqrt().to(t.dtype)

    def gamma_in(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod(t).sqrt().to(t.dtype)

    def alpha_to(self, t: Tensor) -> Tensor:
        return _const(t, 1.0)

    def gamma_to(self, t: Tensor) -> Tensor:
        return _const(t, 0.0)

    def __repr__(self) -> str:
        return f"DiscreteVP(steps={self.steps})"


TRANSPORTS: dict[str, type[Transport]] = {
    cls.name: cls for cls in (Linear, ReLinear, TrigFlow, EDM, TrigLinear, Random, DiscreteVP)
}


def get_transport(name: str | Transport) -> Transport:
    """Return the transport called `name` (case-insensitive); a Transport passes through."""
    if isinstance(name, Transport):
        return name
    if not isinstance(name, str):
        raise TypeError(f"transport must be a name or a Transport, got {type(name).__name__}")
    by_lower = {key.lower(): cls for key, cls in TRANSPORTS.items()}
    cls = by_lower.get(name.lower())
    if cls is None:
        known = ", ".join(TRANSPORTS)
        raise ValueError(f"unknown transport {name!r}; known transports: {known}")
    return cls()

