"""UCGM-S: the unified sampler of UCGM (arXiv 2505.07447), as `uni_sample` computes it.

One step at grid time t_i with network output F:

    x_hat, z_hat = transport.predictions(x_i, F, t_i)
    x_hat, z_hat += lam * (current - previous raw prediction)          (from the third step)
    x_{i+1} = gamma_in(t_{i+1}) x_hat + alpha_in(t_{i+1}) (sqrt(1-rho) z_hat + sqrt(rho) eps)

with an optional second-order (Heun-like) correction that re-evaluates the network at
t_{i+1} (`order=2`, the reference's), or the one-evaluation multistep correction
(`solver="multistep"`, see `multistep_coefficient`). The returned sample is x_hat of the last step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from .sharing import EncoderUse, sharing
from .transports import Transport, get_transport

ModelFn = Callable[..., Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
Refresh = int | Sequence[int]
SOLVERS = ("ucgm", "multistep")


def num_grid_points(steps: int, order: int) -> int:
    """K, the number of grid points the sampler visits: (steps+1)//2 for order 2, else steps."""
    return (steps + 1) // 2 if order == 2 else steps


def count_nfe(steps: int, order: int = 1, gaps: Sequence[float] = (0.001, 0.001)) -> int:
    """Model evaluations of one `sample` call, exactly as the reference spends them.

    Order 1 evaluates once per grid point. Order 2 adds a correction at every point but
    the last; when the end gap is 0 the reference also corrects at the last point.
    """
    _check_grid_args(steps, order, (1.0, 1.0, 1.0), gaps)
    k = num_grid_points(steps, order)
    if order == 1:
        return k
    return 2 * k if gaps[1] == 0 else 2 * k - 1


def count_encoder_evals(
    steps: int, order: int = 1, gaps: Sequence[float] = (0.001, 0.001), encoder_refresh: Refresh = 1
) -> int:
    """Encoder evaluations of one `sample` call on a model that shares its encoder (see `sharing`).

    The encoder is recomputed at the evaluations (numbered 0 .. NFE-1) that `encoder_refresh`
    selects: every r-th for an integer r, or the listed indices; the decoder runs at all NFE.
    Exact when every forward has the same batch (guidance on everywhere or nowhere); a
    guidance interval switching the batch size adds a recompute at the first forward of a new size.
    """
    refresh = _refresh_rule(encoder_refresh)
    return sum(1 for j in range(count_nfe(steps, order, gaps)) if j == 0 or refresh(j))


def _refresh_rule(encoder_refresh: Refresh) -> Callable[[int], bool]:
    """Which evaluation indices recompute the encoder: every r-th (r >= 1), or a list of indices."""
    if isinstance(encoder_refresh, numbers.Integral) and not isinstance(encoder_refresh, bool):
        if encoder_refresh < 1:
            raise ValueError(f"encoder_refresh must be an integer >= 1 or a list of evaluation indices, "
                             f"got {encoder_refresh!r}")
        rate = int(encoder_refresh)
        return lambda j: j % rate == 0
    if isinstance(encoder_refresh, (str, bytes)) or not isinstance(encoder_refresh, Sequence) or any(
            isinstance(j, bool) or not isinstance(j, numbers.Integral) or j < 0 for j in encoder_refresh):
        raise ValueError(f"encoder_refresh must be an integer >= 1 or a list of evaluation indices >= 0, "
                         f"got {encoder_refresh!r}")
    chosen = {int(j) for j in encoder_refresh}
    return lambda j: j in chosen


def multistep_coefficient(
    transport: Transport, t_prev: Tensor, t_cur: Tensor, t_next: Tensor, rho: Tensor | float
) -> Tensor:
    """Weight c of the multistep correction x_{i+1} += c (x_hat_i - x_hat_{i-1}) (float64 scalar).

    Derivation. With a = alpha_in, g = gamma_in, the log signal-to-noise lambda = log g - log a
    and y = x_t / a = z + e^lambda x, the probability-flow ODE is dy / d(e^lambda) = x_hat, so

        x_{i+1} = (a_{i+1} / a_i) x_i + a_{i+1} int_{lambda_i}^{lambda_{i+1}} e^lambda x_hat(lambda) dlambda.

    x_hat constant gives the UCGM-S step (rho = 0): x_{i+1} = g_{i+1} x_hat_i + a_{i+1} z_hat_i.
    x_hat linear in lambda through the last two predictions (DPM-Solver++ 2M, Lu et al. 2022),
    x_hat(lambda) ~ x_hat_i + (lambda - lambda_i) (x_hat_i - x_hat_{i-1}) / h_{i-1}, with
    h_i = lambda_{i+1} - lambda_i, adds, to second order in h,

        g_{i+1} (1 - e^{-h_i}) h_i / (2 h_{i-1}) (x_hat_i - x_hat_{i-1})

    (the midpoint form of 2M; its local error is O(h^3), so the global error is O(h^2)). With
    stochasticity rho, the step keeps sqrt(1-rho) of z_hat, and the coefficient of x_hat in
    x_{i+1} = g_{i+1} (1 - sqrt(1-rho) e^{-h_i}) x_hat_i + (a_{i+1}/a_i) sqrt(1-rho) x_i + noise
    replaces g_{i+1} (1 - e^{-h_i}) (as DPM-Solver++ 2M SDE does for its e^{-h} = sqrt(1-rho)), so

        c = g_{i+1} (1 - sqrt(1-rho) e^{-h_i}) h_i / (2 h_{i-1}).

    Conditioning: only logs of the coefficients are taken and only h_{i-1} > 0 divides. A vanishing
    g_i at the noise end (start gap 0) gives h_{i-1} = inf and c = 0, never a division by g_i ~ 0
    (the reference's order 2 divides x_i by g_i); a_{i+1} > 0 because the sample is the x_hat of the
    last grid point, so a step never lands on the data end.
    """
    def lam(t: Tensor) -> Tensor:
        t = t.double()
        return torch.log(transport.gamma_in(t)) - torch.log(transport.alpha_in(t))

    h_prev, h = lam(t_cur) - lam(t_prev), lam(t_next) - lam(t_cur)
    keep = torch.as_tensor(1.0 - rho, dtype=torch.float64).sqrt()
    ratio = torch.where(h_prev > 0, h / (2 * h_prev), torch.zeros_like(h))
    return transport.gamma_in(t_next.double()) * (1 - keep * torch.exp(-h)) * ratio


def kumaraswamy(u: Tensor, a: float, b: float, c: float) -> Tensor:
    """The warp u -> (1 - (1 - u^a)^b)^c of [0, 1] onto itself."""
    return (1 - (1 - u**a) ** b) ** c


def time_grid(
    transport: str | Transport,
    steps: int,
    order: int = 1,
    time_dist: Sequence[float] = (1.0, 1.0, 1.0),
    gaps: Sequence[float] = (0.001, 0.001),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The K+1 times t_0 .. t_K visited by `sample` (t_K = 0 is appended as the reference does).

    u = linspace over [g0, 1-g1] (K points; K+1 with the last dropped when g1 = 0), built in
    float64 and cast to `dtype` before the Kumaraswamy warp; t = 1-u when noise sits at t=1.
    """
    transport = get_transport(transport)
    _check_grid_args(steps, order, time_dist, gaps)
    k = num_grid_points(int(steps), order)
    g0, g1 = float(gaps[0]), float(gaps[1])
    if g1 == 0:
        u = torch.linspace(g0, 1.0, k + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, k, dtype=torch.float64)
    u = kumaraswamy(u.to(dtype=dtype, device=device), *[float(v) for v in time_dist])
    t = u if transport.integrates_forward else 1 - u
    return torch.cat([t, torch.zeros_like(t[:1])])


def _check_grid_args(
    steps: int, order: int, time_dist: Sequence[float], gaps: Sequence[float]
) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if len(time_dist) != 3 or any(not float(v) > 0 for v in time_dist):
        raise ValueError(
            f"time_dist must be three Kumaraswamy parameters (a, b, c), each > 0; got {tuple(time_dist)!r}"
        )
    if len(gaps) != 2 or any(not float(g) >= 0 for g in gaps):
        raise ValueError(f"gaps must be two numbers >= 0 (start, end); got {tuple(gaps)!r}")
    if float(gaps[0]) + float(gaps[1]) >= 1:
        raise ValueError(f"gaps must leave part of [0, 1] to sample: start + end < 1, got {tuple(gaps)!r}")


def _check_stochasticity(stochasticity: float | str) -> float | None:
    """The fixed ratio rho, or None for "auto" (recomputed from the grid at every step)."""
    if isinstance(stochasticity, str):
        if stochasticity.lower() == "auto":
            return None
        raise ValueError(f"stochasticity must be a number in [0, 1] or 'auto', got {stochasticity!r}")
    rho = float(stochasticity)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"stochasticity must be in [0, 1] or 'auto', got {stochasticity!r}")
    return rho


def _randn(like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like `like` (float64), one generator per row if given a list."""
    if generator is None:
        return torch.randn(like.shape, device=like.device).to(like)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=generator.device).to(like)
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(like)


def sample(
    model_fn: ModelFn,
    noise: Tensor,
    transport: str | Transport = "Linear",
    steps: int = 40,
    order: int = 1,
    stochasticity: float | str = 0.0,
    extrapolation: float = 0.0,
    time_dist: Sequence[float] = (1.0, 1.0, 1.0),
    gaps: Sequence[float] = (0.001, 0.001),
    generator: Generators = None,
    return_trajectory: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    solver: str = "ucgm",
    encoder_refresh: Refresh = 1,
    encoder_use: EncoderUse | None = None,
    **model_kwargs: Any,
) -> Tensor:
    """Run UCGM-S from `noise` and return the clean sample x_hat (float32).

    `model_fn(x_t, t, **model_kwargs)` gets x_t [B, ...] and t [B] in float32 and returns F.
    `stochasticity` is rho in [0, 1] or "auto"; its noise comes from `generator` (one
    generator, or one per batch row so that each row is reproducible on its own).
    `solver="multistep"` (order 1 only) adds the multistep correction (`multistep_coefficient`).
    `encoder_refresh` (r, or a list of evaluation indices): on a network that shares its
    condition encoder (`sharing.shared_encoder`), recompute it only at those evaluations;
    `encoder_use` receives the encoder and decoder evaluation counts.
    `return_trajectory=True` returns the stack [noise, x_hat_1, ..., x_hat_K].
    `callback(i, x_hat)` is called after each grid point (for progress bars).
    """
    transport = get_transport(transport)
    rho_fixed = _check_stochasticity(stochasticity)
    if not float(extrapolation) >= 0:
        raise ValueError(f"extrapolation must be a number >= 0, got {extrapolation!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if solver == "multistep" and order != 1:
        raise ValueError("solver 'multistep' evaluates the model once per step: order must be 1")
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating-point tensor with a batch dimension")
    grid = time_grid(transport, steps, order, time_dist, gaps, noise.dtype, noise.device)
    k = grid.numel() - 1
    correct_last = order == 2 and float(gaps[1]) == 0
    batch = noise.shape[0]
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
    refresh = _refresh_rule(encoder_refresh)
    shares = encoder_use is not None or encoder_refresh != 1
    use = encoder_use if encoder_use is not None else EncoderUse()
    evaluations = 0

    def predict(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal evaluations
        use.refresh = evaluations == 0 or refresh(evaluations)
        t32 = t.float()  # the reference evaluates the model and the (x, z) recovery at float32 t
        f = model_fn(x, t32.expand(batch), **model_kwargs).float()
        evaluations += 1
        if shares and encoder_refresh != 1 and use.decoder_evals == 0:
            raise ValueError("encoder_refresh needs a model whose network shares its condition encoder "
                             "(sharing.shared_encoder); this model's does not")
        return transport.predictions(x, f, t32)

    x_cur = noise.to(torch.float64)
    trajectory = [noise]
    x_prev = z_prev = None
    with sharing(use) if shares else nullcontext():
        for i in range(k):
            t_cur, t_next = grid[i], grid[i + 1]
            x_hat, z_hat = predict(x_cur.float(), t_cur)
            trajectory.append(x_hat)
            if callback is not None:
                callback(i, x_hat)
            x_hat, z_hat = x_hat.double(), z_hat.double()
            x_raw, z_raw = x_hat, z_hat

            if extrapolation > 0 and i >= 2:
                z_hat = z_hat + extrapolation * (z_hat - z_prev)
                x_hat = x_hat + extrapolation * (x_hat - x_prev)

            if rho_fixed is None:
                ratio = (t_next - t_cur).abs().sqrt() * (2 * transport.alpha_in(t_cur)).sqrt()
                rho = torch.clamp((ratio / transport.alpha_in(t_next)) ** 2, 0, 1)
            else:
                rho = rho_fixed
            z_mix = z_hat * (1 - rho) ** 0.5
            if rho_fixed != 0.0:
                z_mix = z_mix + _randn(x_cur, generator) * rho**0.5
            x_next = transport.gamma_in(t_next) * x_hat + transport.alpha_in(t_next) * z_mix
            if solver == "multistep" and i >= 1:
                x_next = x_next + multistep_coefficient(transport, grid[i - 1], t_cur, t_next, rho) * (
                    x_raw - x_prev)

            if order == 2 and (i < k - 1 or correct_last):
                _, z_pri = predict(x_next.float(), t_next)
                g_cur, g_next = transport.gamma_in(t_cur), transport.gamma_in(t_next)
                a_cur, a_next = transport.alpha_in(t_cur), transport.alpha_in(t_next)
                x_next = x_cur * g_next / g_cur + (a_next - g_next * a_cur / g_cur) * (
                    0.5 * z_hat + 0.5 * z_pri.double()
                )
            x_prev, z_prev = x_raw, z_raw
            x_cur = x_next

    if return_trajectory:
        return torch.stack(trajectory).float()
    return trajectory[-1].float()
