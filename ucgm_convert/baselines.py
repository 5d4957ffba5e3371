"""Baseline solvers driven through the same `model_fn` as `uc.sample`, with exact NFE counts.

Every baseline integrates the rectified-flow ODE in its own variable x_s = s z + (1 - s) x
(s: the flow sigma, 1 = noise, 0 = data) with velocity v = z - x, which is what diffusers'
flow-matching schedulers expect (`prediction_type="flow_prediction"`; DPM-Solver++ and UniPC
turn it into x0 = x_s - s v themselves). Our model works in its transport's variable x_t =
alpha_in(t) z + gamma_in(t) x, so each evaluation maps s to the transport time with the same
signal-to-noise ratio,

    alpha_in(t) / gamma_in(t) = s / (1 - s),      x_t = c x_s,  c = alpha_in(t) / s = gamma_in(t) / (1 - s),

recovers (x_hat, z_hat) from F with `transport.predictions` and returns v = z_hat - x_hat.
This is exact for Linear (t = s, c = 1) and ReLinear (t = 1 - s). TrigFlow and EDM have a finite
largest noise level (alpha/gamma = 1256 and sigma = 78 at t = 1), so the first evaluations at
s close to 1 are clamped to t = 1 — the same start-point mismatch `uc.sample` has for them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor

from .sampler import ModelFn
from .transports import Transport, get_transport

EXACT_TRANSPORTS = ("Linear", "ReLinear")  # where the sigma <-> t map involves no clamping


@dataclass(frozen=True)
class BaselineResult:
    """Samples (float32, the x0 of the last step) and the number of model evaluations spent."""

    samples: Tensor
    nfe: int


def time_of_flow_sigma(transport: Transport, s: float) -> float:
    """The transport time t whose alpha_in/gamma_in equals s/(1-s) (bisection, float64; clamped to [0, 1])."""
    forward = transport.integrates_forward  # noise at t=0: the ratio falls with t
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = torch.tensor((lo + hi) / 2, dtype=torch.float64)
        a, g = float(transport.alpha_in(mid)), float(transport.gamma_in(mid))
        more_noise = a * (1 - s) > s * g  # ratio(mid) > target
        if more_noise != forward:
            hi = float(mid)
        else:
            lo = float(mid)
    return (lo + hi) / 2


class FlowVelocity:
    """The flow velocity v(x_s, s) = z_hat - x_hat of a model_fn in any transport; counts evaluations."""

    def __init__(self, model_fn: ModelFn, transport: str | Transport, dtype: torch.dtype,
                 model_kwargs: dict[str, Any]) -> None:
        self.model_fn, self.transport, self.dtype = model_fn, get_transport(transport), dtype
        self.model_kwargs, self.nfe = model_kwargs, 0

    def __call__(self, x_s: Tensor, s: float) -> Tensor:
        s = float(s)
        t = torch.tensor(time_of_flow_sigma(self.transport, s), dtype=torch.float64)
        a, g = self.transport.alpha_in(t), self.transport.gamma_in(t)
        c = a / s if s >= 0.5 else g / (1 - s)
        x_t = (c * x_s.double()).to(self.dtype)
        t32 = t.float().expand(x_s.shape[0])  # evaluated at float32 t, as uc.sample does
        f = self.model_fn(x_t, t32, **self.model_kwargs).double()
        x_hat, z_hat = self.transport.predictions(x_t.double(), f, t.double())
        self.nfe += 1
        return z_hat - x_hat


def _uniform_sigmas(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def euler(v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """Explicit Euler on a uniform sigma grid: nfe steps, x_{s'} = x_s + (s' - s) v(x_s, s)."""
    x, sig = noise.double(), _uniform_sigmas(nfe)
    for s, s_next in itertools.pairwise(sig):
        x = x + (s_next - s) * v(x, s)
    return x


def heun(v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """Heun (explicit trapezoid) on a uniform sigma grid: nfe // 2 steps of two evaluations each."""
    if nfe < 2:
        raise ValueError(f"Heun needs nfe >= 2 (two evaluations per step), got {nfe}")
    x, sig = noise.double(), _uniform_sigmas(nfe // 2)
    for s, s_next in itertools.pairwise(sig):
        d = v(x, s)
        pred = x + (s_next - s) * d
        x = x + (s_next - s) * 0.5 * (d + v(pred, s_next))
    return x


def _scheduler_loop(scheduler: Any, v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """Drive a diffusers scheduler for nfe inference steps (one evaluation each) at its own sigmas."""
    scheduler.set_timesteps(nfe)
    x = noise.double()
    for i, timestep in enumerate(scheduler.timesteps):
        out = v(x, float(scheduler.sigmas[i]))
        x = scheduler.step(out, timestep, x, return_dict=False)[0].double()
    return x


def flow_euler(v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """diffusers FlowMatchEulerDiscreteScheduler (shift 1)."""
    return _scheduler_loop(FlowMatchEulerDiscreteScheduler(shift=1.0), v, noise, nfe)


def dpm_2m(v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """diffusers DPMSolverMultistepScheduler: DPM-Solver++(2M) with flow sigmas (flow shift 1)."""
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True, flow_shift=1.0,
        prediction_type="flow_prediction")
    return _scheduler_loop(scheduler, v, noise, nfe)


def unipc(v: FlowVelocity, noise: Tensor, nfe: int) -> Tensor:
    """diffusers UniPCMultistepScheduler (bh2, order 2) with flow sigmas (flow shift 1)."""
    scheduler = UniPCMultistepScheduler(
        solver_order=2, use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction")
    return _scheduler_loop(scheduler, v, noise, nfe)


BASELINES: dict[str, Callable[[FlowVelocity, Tensor, int], Tensor]] = {
    "euler": euler, "heun": heun, "flow-euler": flow_euler, "dpm++2m": dpm_2m, "unipc": unipc,
}


def run_baseline(
    name: str, model_fn: ModelFn, noise: Tensor, nfe: int, transport: str | Transport = "Linear",
    **model_kwargs: Any,
) -> BaselineResult:
    """Sample with baseline `name` (a key of BASELINES) in at most `nfe` evaluations of model_fn.

    `model_fn(x_t, t, **model_kwargs)` is called exactly as `uc.sample` calls it (x_t in noise's
    dtype, t [B] float32, in the transport's own time); the returned nfe is the count of calls.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    v = FlowVelocity(model_fn, transport, noise.dtype, model_kwargs)
    x = BASELINES[name](v, noise, nfe)
    return BaselineResult(x.float(), v.nfe)
