"""UCGM-T: the unified training objective of UCGM, as the reference `training_step` computes it.

For t ~ Beta(a, b) * s and z ~ N(0, I), the network output F_t = model(x_t, t, y) is pulled
towards a target that is, by branch:

- consistency 0: the transport target alpha_to z + gamma_to x (flow matching / diffusion);
- enhanced > 0: the same with x and z replaced by guidance-enhanced targets
  T' = T + r (P_c - P_u) (kept rows inside the enhanced range), where by `enhanced_style`
  (cccvs/UCGM `enhanced_style`; None = LINs-lab/UCGM's rule, ft-vs-fe when consistency is 0,
  else fc-vs-xz) P_c / P_u are: fc-vs-xz teacher(y) / the data target T itself; fc-vs-fe
  teacher(y) / teacher(null) (one batched no-grad forward of 2B rows unless dropout is active);
  ft-vs-fe the online model's own prediction / teacher(null);
- consistency 1: F_t - (alpha_in / dent) * w(t) * clamp(dx_hat/dt, -1, 1), the derivative of
  the online model's clean prediction along the path by central differences (its two extra
  evaluations run as one batched no-grad forward unless dropout is active);
- consistency in (0, 1): the same with a backward difference over lambda t.

With frame "noise-at-1" (cccvs/UCGM's UCGMTS) a transport with noise at t = 0 (gamma_in(0) = 0:
ReLinear) is trained in the mirrored frame s = 1 - t: coefficients swapped (alpha_in <-> gamma_in,
alpha_to <-> gamma_to; ReLinear becomes Linear) and the network read as F(x, s, y) = -net(x, 1 - s, y),
so t's distribution, the weightings and the enhanced range apply with noise at s = 1. Frame
"transport" (LINs-lab/UCGM) uses the transport's own t.

The per-sample loss is the pseudo-Huber sqrt(mean (F - target)^2 + c^2) - c, optionally plus
a cosine term, weighted by cos(1.57 t) with weighting "Cosine".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .transports import HALF_PI, Transport, get_transport

Model = Callable[[Tensor, Tensor, Tensor], Tensor]
WEIGHTINGS = (None, "Cosine")
ENHANCED_STYLES = ("fc-vs-xz", "fc-vs-fe", "ft-vs-fe")  # cccvs/UCGM methodes/unigen.py, every style it has
FRAMES = ("transport", "noise-at-1")


class _RngReplay:
    """Remembers the RNG state before the online forward so extra forwards see the same dropout."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(dim=1)


class UCGMObjective:
    """The UCGM-T loss; call it as `loss = obj(model, x, y, teacher=None, t=None, z=None)`.

    Parameter names map to the reference: consistency = consistc_ratio, enhanced =
    enhanced_ratio, huber_eps = scaled_cbl_eps, cosine_loss = wt_cosine_loss, weighting =
    weight_funcion, time_dist = time_dist_ctrl, label_drop = lab_drop_ratio, enhanced_style =
    enhanced_style (cccvs/UCGM; None = LINs-lab/UCGM's hard-coded choice, see the module doc); frame:
    "noise-at-1" trains a noise-at-0 transport (ReLinear) in the mirrored frame as cccvs/UCGM does.
    """

    def __init__(
        self,
        transport: str | Transport = "Linear",
        consistency: float = 0.0,
        enhanced: float = 0.0,
        enhanced_range: Sequence[float] = (0.0, 0.75),
        label_drop: float = 0.1,
        huber_eps: float = 0.0,
        cosine_loss: bool = False,
        weighting: str | None = None,
        time_dist: Sequence[float] = (1.0, 1.0, 1.0),
        fd_eps: float = 0.005,
        num_classes: int = 1000,
        enhanced_style: str | None = None,
        frame: str = "transport",
    ) -> None:
        self.transport = get_transport(transport)
        _require(0.0 <= consistency <= 1.0, f"consistency must be in [0, 1], got {consistency!r}")
        _require(enhanced >= 0.0, f"enhanced must be >= 0, got {enhanced!r}")
        _require(
            len(enhanced_range) == 2 and enhanced_range[0] <= enhanced_range[1],
            f"enhanced_range must be (lo, hi) with lo <= hi, got {tuple(enhanced_range)!r}",
        )
        _require(0.0 <= label_drop <= 1.0, f"label_drop must be in [0, 1], got {label_drop!r}")
        _require(huber_eps >= 0.0, f"huber_eps must be >= 0, got {huber_eps!r}")
        _require(weighting in WEIGHTINGS, f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        _require(
            len(time_dist) == 3 and all(v > 0 for v in time_dist),
            f"time_dist must be (a, b, scale) with every entry > 0, got {tuple(time_dist)!r}",
        )
        _require(fd_eps > 0.0, f"fd_eps must be > 0, got {fd_eps!r}")
        _require(num_classes >= 1, f"num_classes must be >= 1, got {num_classes!r}")
        _require(enhanced_style is None or enhanced_style in ENHANCED_STYLES,
                 f"enhanced_style must be one of {ENHANCED_STYLES} (cccvs/UCGM's target enhancement styles) or None, "
                 f"got {enhanced_style!r}")
        self.consistency = float(consistency)
        # As the reference: a ratio >= 1 without consistency is rescaled to (r - 1) / r.
        if enhanced >= 1.0 and consistency == 0.0:
            enhanced = (enhanced - 1.0) / enhanced
        self.enhanced = float(enhanced)
        self.enhanced_range = (float(enhanced_range[0]), float(enhanced_range[1]))
        self.label_drop = float(label_drop)
        self.huber_eps = float(huber_eps)
        self.cosine_loss = bool(cosine_loss)
        self.weighting = weighting
        self.time_dist = tuple(float(v) for v in time_dist)
        self.fd_eps = float(fd_eps)
        self.num_classes = int(num_classes)
        _require(frame in FRAMES, f"frame must be one of {FRAMES}, got {frame!r}")
        self.frame = frame
        # The transport the loss is computed in: the mirrored one when the frame asks for it (module doc).
        self.mirrored = frame == "noise-at-1" and self.transport.integrates_forward
        self._tr = _Mirrored(self.transport) if self.mirrored else self.transport
        self.enhanced_style = enhanced_style or ("ft-vs-fe" if self.consistency == 0.0 else "fc-vs-xz")

    @property
    def no_grad_forwards(self) -> int:
        """Extra no-grad network evaluations per sample and step, beyond the one with gradient (batched
        evaluations count once per row): the teacher's (2 for fc-vs-fe) plus the consistency branch's."""
        teacher = 0 if self.enhanced == 0.0 else (2 if self.enhanced_style == "fc-vs-fe" else 1)
        consistency = 0 if self.consistency == 0.0 else (2 if self.consistency == 1.0 else 1)
        return teacher + consistency

    def sample_t(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """t ~ Beta(a, b), scaled by s and clamped to [0, 1] (global RNG, as the reference)."""
        a, b, s = self.time_dist
        t = torch.distributions.Beta(a, b).sample((batch,)).to(device)
        return torch.clamp(t * s, 0.0, 1.0)

    def num_dropped(self, batch: int) -> int:
        """How many of the last labels become the null class (Python rounding, as the reference)."""
        return round(self.label_drop * batch)

    def __call__(
        self,
        model: Model,
        x: Tensor,
        y: Tensor,
        teacher: Model | None = None,
        t: Tensor | None = None,
        z: Tensor | None = None,
        ndrop: int | None = None,
    ) -> Tensor:
        """The scalar loss for data x [B, ...] with labels y [B]; differentiable through model.

        `ndrop` overrides how many of the last labels become the null class (default
        round(label_drop * B)); tuning passes each micro-batch its share of the rows dropped over the
        global batch (`jobs/tune/data.chunk_drops`).
        """
        batch = x.shape[0]
        if t is None:
            t = self.sample_t(batch, x.device)
        if z is None:
            z = torch.randn_like(x)
        _require(t.shape == (batch,), f"t must have shape [{batch}], got {list(t.shape)}")
        _require(z.shape == x.shape, f"z must have x's shape {list(x.shape)}, got {list(z.shape)}")
        _require(y.shape == (batch,), f"y must have shape [{batch}], got {list(y.shape)}")
        tr = self._tr
        if self.mirrored:
            model, teacher = _MirroredNet(model), (_MirroredNet(teacher) if teacher is not None else None)
        t_flat = t.to(x)
        t = t_flat.view((batch,) + (1,) * (x.ndim - 1))
        ndrop = self.num_dropped(batch) if ndrop is None else int(ndrop)
        _require(0 <= ndrop <= batch, f"ndrop must be in [0, {batch}], got {ndrop}")
        y = y.clone()
        if ndrop:
            y[batch - ndrop :] = self.num_classes

        x_t = tr.interpolate(x, z, t)
        replay = _RngReplay(x.device)
        f_t = model(x_t, t_flat, y)
        dent = tr.dent(t)
        target = tr.target(x, z, t)

        if self.consistency != 0.0 or self.enhanced != 0.0:
            with torch.no_grad():
                target = self._target(model, teacher or model, replay, x, z, y, t, x_t, f_t.detach(), dent, ndrop)

        loss = torch.sqrt(_per_sample_mean((f_t - target) ** 2) + self.huber_eps**2) - self.huber_eps
        if self.cosine_loss:
            cos = F.cosine_similarity(f_t, target, dim=1)
            loss = loss + (_per_sample_mean(1 - cos) if cos.ndim > 1 else 1 - cos)
        if self.weighting == "Cosine":
            loss = loss * torch.cos(t_flat * HALF_PI)
        return loss.mean()

    def _target(
        self,
        model: Model,
        teacher: Model,
        replay: _RngReplay,
        x: Tensor,
        z: Tensor,
        y: Tensor,
        t: Tensor,
        x_t: Tensor,
        f_t: Tensor,
        dent: Tensor,
        ndrop: int,
    ) -> Tensor:
        """The no-grad target of the enhanced and consistency branches.

        As the reference: the forwards of the online model replay the RNG of its first forward (same
        dropout); the teacher's conditional forward of fc-vs-xz does not (a fresh draw, as LINs-lab/UCGM's
        train-mode teacher); fc-vs-fe replays before each teacher forward, as cccvs/UCGM."""
        tr = self._tr
        t_flat = t.flatten()
        lo, hi = self.enhanced_range
        inside = (t_flat > lo) & (t_flat < hi)
        x_tar, z_tar = x, z

        def predict(net: Model, x_in: Tensor, t_in: Tensor, labels: Tensor, same_draws: bool = True
                    ) -> tuple[Tensor, Tensor]:
            with replay() if same_draws else contextlib.nullcontext():
                f = net(x_in, t_in.flatten(), labels)
            return tr.predictions(x_in, f, t_in)

        if self.enhanced != 0.0:
            (x_c, z_c), (x_u, z_u) = self._enhancement_pair(teacher, predict, x, z, y, t, x_t, f_t)
            x_tar = self._enhance(x_tar, inside, ndrop, x_c, x_u)
            z_tar = self._enhance(z_tar, inside, ndrop, z_c, z_u)
            if self.consistency == 0.0:
                return tr.target(x_tar, z_tar, t)

        def x_hat_online(times: Sequence[Tensor]) -> list[Tensor]:
            """The online model's clean prediction at each time: one batched forward, or one
            replayed forward per time when dropout is active (so every time sees the same masks)."""
            x_in = [tr.interpolate(x_tar, z_tar, r) for r in times]
            if _has_active_dropout(model):
                return [predict(model, xi, r, y)[0] for xi, r in zip(x_in, times)]
            x_hat, _ = predict(model, torch.cat(x_in), torch.cat(list(times)), y.repeat(len(times)))
            return list(x_hat.chunk(len(times)))

        if self.consistency == 1.0:
            rate = 1 / (2 * self.fd_eps)
            y_plus, y_minus = x_hat_online([t + self.fd_eps, t - self.fd_eps])
            deriv = y_plus * rate - y_minus * rate
        else:
            step = t - self.consistency * t
            rate = 1 / step
            x_t_tar = tr.interpolate(x_tar, z_tar, t)
            x_to_t = f_t * tr.alpha_in(t) - x_t_tar * tr.alpha_to(t)
            (y_back,) = x_hat_online([t - step])
            deriv = x_to_t / dent * rate - y_back * rate
        deriv = torch.clamp(deriv, -1.0, 1.0)
        weight = 4 / torch.sin(t * HALF_PI)
        return f_t - (tr.alpha_in(t) / dent * weight) * deriv

    def _enhancement_pair(
        self, teacher: Model, predict: Callable[..., tuple[Tensor, Tensor]], x: Tensor, z: Tensor, y: Tensor,
        t: Tensor, x_t: Tensor, f_t: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """((x, z) conditional, (x, z) reference) predictions of `enhanced_style` (module doc)."""
        null = torch.full_like(y, self.num_classes)
        if self.enhanced_style == "fc-vs-xz":
            return predict(teacher, x_t, t, y, same_draws=False), (x, z)
        if self.enhanced_style == "ft-vs-fe":
            return self._tr.predictions(x_t, f_t, t), predict(teacher, x_t, t, null)
        if _has_active_dropout(teacher):  # fc-vs-fe, two replayed forwards: the same masks as the reference
            return predict(teacher, x_t, t, y), predict(teacher, x_t, t, null)
        x_hat, z_hat = predict(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        (x_c, x_u), (z_c, z_u) = x_hat.chunk(2), z_hat.chunk(2)
        return (x_c, z_c), (x_u, z_u)

    def _enhance(self, target: Tensor, inside: Tensor, ndrop: int, p_cond: Tensor, p_uncond: Tensor) -> Tensor:
        """Kept rows: T + r (P_c - P_u) inside the range, (T + P_c)/2 outside; dropped rows: (T + P_u)/2."""
        keep = target.shape[0] - ndrop
        mask = inside.view((-1,) + (1,) * (target.ndim - 1))
        kept = torch.where(
            mask[:keep],
            target[:keep] + self.enhanced * (p_cond[:keep] - p_uncond[:keep]),
            (target[:keep] + p_cond[:keep]) * 0.5,
        )
        dropped = (target[keep:] + p_uncond[keep:]) * 0.5
        return torch.cat([kept, dropped])


class _Mirrored(Transport):
    """A transport with noise at t = 0 seen from s = 1 - t: the coefficient pairs swapped, as cccvs/UCGM."""

    def __init__(self, base: Transport) -> None:
        self.base, self.name = base, f"{base.name} (noise at 1)"
        self.alpha_in, self.gamma_in = base.gamma_in, base.alpha_in  # type: ignore[method-assign]
        self.alpha_to, self.gamma_to = base.gamma_to, base.alpha_to  # type: ignore[method-assign]


class _MirroredNet:
    """The network in the mirrored frame: F(x, s, y) = -net(x, 1 - s, y)."""

    def __init__(self, net: Model) -> None:
        self.net = net

    def __call__(self, x: Tensor, s: Tensor, y: Tensor) -> Tensor:
        return -self.net(x, 1 - s, y)


def _has_active_dropout(model: Model) -> bool:
    """True for a module in training mode whose forward draws random numbers: a dropout layer of p > 0,
    or a submodule whose `draws_randomly()` says so (train-mode label dropout without given draws)."""
    model = model.net if isinstance(model, _MirroredNet) else model
    return isinstance(model, torch.nn.Module) and model.training and any(
        (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)
        or bool(getattr(m, "draws_randomly", lambda: False)())
        for m in model.modules()
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
