"""uc.search: the UCGM-S settings that bring `nfe` model evaluations closest to a many-step reference.

    found = uc.search(model_fn, shape, transport="Linear", nfe=4, num_samples=4096, seed=0, y=labels)
    x = uc.sample(model_fn, noise, transport="Linear", **found)   # exactly `nfe` evaluations

Objective: the Frechet distance d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the
features of `num_samples` low-NFE samples and of a reference set drawn once from the same noise
and labels with `reference` settings (many Euler steps). The noise (and the stochastic-step
noise) is the same in every trial, so two settings are compared on equal draws.

Search space: per structure (order 1, solver "multistep", the reference's order 2), the
Kumaraswamy warp (a, b, c) in [1/4, 4] (log scale), extrapolation in [0, 1], stochasticity in [0, 1],
start gap in [0, 0.2] and end gap in [0, 0.8]; optionally guidance scale and interval, and (with an
`encoder_evals` budget E, for a network that shares its condition encoder) the integer `encoder_refresh` r
in [r_min, nfe], r_min the smallest r with count_encoder_evals = ceil(nfe / r) <= E. Optimiser:
a coarse grid over every structure, then CMA-ES (`cma`) from the best grid point in the unit cube
for the rest of the trial budget; the `validate` best settings (and the starts) are then re-measured
on independent validation noise and the pick minimises the mean of both distances. Each trial is one
line of a JSONL log (written with one append and fsync); a resumed search replays the same
deterministic optimiser and reads back the logged distances, so it ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cma
import numpy as np
import torch
from torch import Tensor

from .console import progress
from .errors import UCGMError
from .metrics.fid import FeatureStats, frechet_distance
from .sampler import ModelFn, count_encoder_evals, count_nfe, num_grid_points, sample
from .seeding import sample_seed
from .sharing import EncoderUse
from .transports import Transport, get_transport
from .trial_log import TrialLog

Features = Callable[[Tensor], np.ndarray]
GuidedFn = Callable[[float, tuple[float, float]], ModelFn]
Stats = tuple[np.ndarray, np.ndarray]
MAX_FEATURE_DIM = 2048  # larger latents are projected (fixed Gaussian map) to keep d x d covariances small
DEFAULT_REFERENCE: dict[str, Any] = {"steps": 256, "order": 1}
LOG_VERSION = 1
VALIDATION_OFFSET = 1 << 20  # validation noise seed = seed + this (the job's fresh table noise is seed + 1)
CMA_SIGMA = 0.08  # initial CMA-ES step in the unit cube: a local refinement of the best grid point
DECIMALS = 4  # settings are rounded before evaluation, so what is written is exactly what was measured


@dataclass(frozen=True)
class Dim:
    """One searched setting: u in [0, 1] maps to lo + u (hi - lo), or geometrically when `log`; rounded to
    the nearest integer when `integer`."""

    name: str
    lo: float
    hi: float
    log: bool = False
    integer: bool = False

    def value(self, u: float) -> float:
        u = min(max(float(u), 0.0), 1.0)
        v = self.lo * (self.hi / self.lo) ** u if self.log else self.lo + u * (self.hi - self.lo)
        return round(v) if self.integer else round(v, DECIMALS)

    def unit(self, v: float) -> float:
        """The inverse map (a start point given as settings), clipped to [0, 1]."""
        v = min(max(float(v), self.lo), self.hi)
        if self.hi == self.lo:
            return 0.0
        u = math.log(v / self.lo) / math.log(self.hi / self.lo) if self.log else (v - self.lo) / (self.hi - self.lo)
        return min(max(u, 0.0), 1.0)


SAMPLER_DIMS = (
    Dim("a", 0.25, 4.0, log=True), Dim("b", 0.25, 4.0, log=True), Dim("c", 0.25, 4.0, log=True),
    Dim("extrapolation", 0.0, 1.0), Dim("stochasticity", 0.0, 1.0),
    Dim("gap_start", 0.0, 0.2), Dim("gap_end", 0.0, 0.8),
)
GUIDANCE_DIMS = (Dim("cfg_scale", 1.0, 4.0), Dim("cfg_lo", 0.0, 0.5), Dim("cfg_hi", 0.5, 1.0))


@dataclass(frozen=True)
class Structure:
    """The discrete part of a setting: solver and order (and so the step count for the budget)."""

    order: int
    solver: str = "ucgm"

    def settings(self, nfe: int, values: Mapping[str, float]) -> dict[str, Any]:
        """`uc.sample` keywords spending exactly `nfe` evaluations (order 2: 2K-1 with an end gap, 2K without)."""
        gap_end = values["gap_end"]
        steps = nfe
        if self.order == 2:
            k = (nfe + 1) // 2
            gap_end = 0.0 if nfe % 2 == 0 else max(gap_end, 10.0**-DECIMALS)
            steps = 2 * k
        # extrapolation starts at the third grid point: with fewer it changes nothing (one key, one trial)
        extrapolation = values["extrapolation"] if num_grid_points(steps, self.order) >= 3 else 0.0
        found = {"steps": steps, "order": self.order, "solver": self.solver, "stochasticity": values["stochasticity"],
                 "extrapolation": extrapolation, "time_dist": [values["a"], values["b"], values["c"]],
                 "gaps": [values["gap_start"], gap_end]}
        if "cfg_scale" in values:
            found |= {"cfg_scale": values["cfg_scale"], "cfg_interval": [values["cfg_lo"], values["cfg_hi"]]}
        if "encoder_refresh" in values:
            found["encoder_refresh"] = int(values["encoder_refresh"])
        return found


def structures(nfe: int) -> list[Structure]:
    """The solver structures that can spend exactly `nfe` evaluations: order 1, the one-evaluation multistep
    correction and the reference's order 2 (from 2 evaluations; with one they equal order 1)."""
    return [Structure(1)] + ([Structure(1, "multistep"), Structure(2)] if nfe >= 2 else [])


def refresh_dim(nfe: int, encoder_evals: int) -> Dim:
    """The searched `encoder_refresh` r under a budget of `encoder_evals` encoder evaluations: the integers from
    the smallest r with count_encoder_evals(r) = ceil(nfe / r) <= budget (fewer encoder forwards as r grows) to nfe."""
    if isinstance(encoder_evals, bool) or not isinstance(encoder_evals, int) or encoder_evals < 1:
        raise UCGMError(f"encoder_evals must be an integer >= 1, got {encoder_evals!r}")
    r_min = next(r for r in range(1, nfe + 1) if count_encoder_evals(nfe, 1, (0.001, 0.001), r) <= encoder_evals)
    return Dim("encoder_refresh", r_min, nfe, integer=True)


def latent_features(max_dim: int = MAX_FEATURE_DIM, seed: int = 0) -> Features:
    """Samples flattened to rows; above `max_dim` dimensions projected by a fixed N(0, 1/max_dim) matrix
    (Johnson-Lindenstrauss: distances kept to a few percent), the same matrix for every trial."""
    cache: dict[int, Tensor] = {}

    def features(x: Tensor) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1).double().cpu()
        d = flat.shape[1]
        if d <= max_dim:
            return flat.numpy()
        if d not in cache:
            g = torch.Generator().manual_seed(seed)
            cache[d] = torch.randn(d, max_dim, generator=g, dtype=torch.float64) / math.sqrt(max_dim)
        return (flat @ cache[d]).numpy()

    return features


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of feature rows in float64."""
    stats = FeatureStats(features.shape[1])
    stats.update(features)
    return stats.mu_sigma()


def frechet_to(features: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance of feature rows to reference statistics; inf when the samples are not finite."""
    if not np.isfinite(features).all():
        return math.inf
    value = frechet_distance(*stats_of(features), *ref)
    return value if math.isfinite(value) else math.inf


@dataclass
class Outcome:
    """The best setting found, its distance on the search noise, and every trial (settings, distance)."""

    settings: dict[str, Any]
    distance: float
    trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    reference_stats: list[Stats] = field(default_factory=list)  # search and validation references, for other budgets
    validated: list[tuple[dict[str, Any], float, float]] = field(default_factory=list)  # (settings, search, validation)


class Objective:
    """Distance of a setting's samples to the reference, for fixed noise and labels; settings -> float."""

    def __init__(self, model_fn: ModelFn, noise: Tensor, transport: Transport, seed: int,
                 features: Features, reference: Mapping[str, Any], guided_fn: GuidedFn | None,
                 batch_size: int, model_kwargs: Mapping[str, Any], ref: Stats | None = None) -> None:
        self.model_fn, self.noise, self.transport, self.seed = model_fn, noise, transport, seed
        self.features, self.guided_fn, self.batch_size = features, guided_fn, batch_size
        self.model_kwargs = dict(model_kwargs)
        self.row_seeds = [sample_seed(seed, i) for i in range(noise.shape[0])]  # CPU generators: any device
        self.ref = ref if ref is not None else stats_of(self.features(self.generate(dict(reference), model_fn)))

    def generate(self, settings: dict[str, Any], model_fn: ModelFn) -> Tensor:
        """Samples of the fixed noise in batches; stochastic noise from one generator per row (seed, index), so
        the batch size changes no sample."""
        parts = []
        for start in range(0, self.noise.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            kwargs = rows_of(self.model_kwargs, self.noise.shape[0], rows)
            gens = [torch.Generator().manual_seed(s) for s in self.row_seeds[rows]] \
                if settings.get("stochasticity", 0.0) != 0.0 else None
            with torch.no_grad():
                parts.append(sample(model_fn, self.noise[rows], transport=self.transport, generator=gens,
                                    **settings, **kwargs).cpu())
        return torch.cat(parts)

    def __call__(self, settings: dict[str, Any]) -> float:
        sample_kwargs = {k: v for k, v in settings.items() if not k.startswith("cfg_")}
        fn = self.model_fn
        if "cfg_scale" in settings and self.guided_fn is not None:
            fn = self.guided_fn(settings["cfg_scale"], tuple(settings["cfg_interval"]))
        return self.distance(self.generate(sample_kwargs, fn))

    def distance(self, samples: Tensor) -> float:
        """Frechet distance of any samples (e.g. another solver's, of the same noise) to the reference."""
        with np.errstate(all="ignore"):
            return frechet_to(self.features(samples), self.ref)


def rows_of(model_kwargs: Mapping[str, Any], n: int, rows: slice) -> dict[str, Any]:
    """The model keyword arguments of these noise rows (per-sample tensors of n rows sliced, the rest as given)."""
    return {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == (n,) else v) for k, v in model_kwargs.items()}


def shares_encoder(model_fn: ModelFn, noise: Tensor, transport: Transport, model_kwargs: Mapping[str, Any]) -> bool:
    """Whether the network computes its condition encoder through `sharing.shared_encoder` (one probe forward
    of one sample, counted in an `EncoderUse`), so that `encoder_refresh` may be searched."""
    use = EncoderUse()
    with torch.no_grad():
        sample(model_fn, noise[:1], transport=transport, steps=1, encoder_use=use,
               **rows_of(model_kwargs, noise.shape[0], slice(0, 1)))
    return use.decoder_evals > 0


def _to_unit(dims: Sequence[Dim], settings: Mapping[str, Any]) -> list[float]:
    """A start setting (uc.sample keywords) as a point of the unit cube."""
    a, b, c = settings.get("time_dist", (1.0, 1.0, 1.0))
    g0, g1 = settings.get("gaps", (0.001, 0.001))
    lo, hi = settings.get("cfg_interval", (0.0, 1.0))
    rho = settings.get("stochasticity", 0.0)
    named = {"a": a, "b": b, "c": c, "extrapolation": settings.get("extrapolation", 0.0),
             "stochasticity": 0.5 if isinstance(rho, str) else rho, "gap_start": g0, "gap_end": g1,
             "cfg_scale": settings.get("cfg_scale", 1.0), "cfg_lo": lo, "cfg_hi": hi,
             "encoder_refresh": settings.get("encoder_refresh", 1)}
    return [d.unit(named[d.name]) for d in dims]


def grid_points(dims: Sequence[Dim], starts: Sequence[Mapping[str, Any]], nfe: int) -> list[list[float]]:
    """The coarse grid: the start settings, then c (where the steps bunch) x end gap (0.001, 0.5 / nfe: the last
    step of a uniform grid, 0.3, 0.6) x (extrapolation, stochasticity) in {(0, 0), (0.5, 0.2)}, with a = b = 1,
    the default start gap, the first start's guidance and the smallest allowed encoder refresh; then, when it is
    searched, the first such point at the smallest refresh of every other encoder-evaluation count."""
    points = [_to_unit(dims, s) for s in starts]
    guidance = {k: v for k, v in (starts[0] if starts else {}).items() if k.startswith("cfg_")}
    for c in (0.67, 1.0, 1.5):
        for g1 in dict.fromkeys((0.001, round(0.5 / nfe, DECIMALS), 0.3, 0.6)):
            for lam, rho in ((0.0, 0.0), (0.5, 0.2)):
                points.append(_to_unit(dims, {"time_dist": (1.0, 1.0, c), "extrapolation": lam, "stochasticity": rho,
                                              "gaps": (0.001, g1), **guidance}))
    refresh = next((d for d in dims if d.name == "encoder_refresh"), None)
    if refresh is not None:
        counts = {-(-nfe // r): r for r in range(int(refresh.hi), int(refresh.lo) - 1, -1)}  # count -> smallest r
        first = {"time_dist": (1.0, 1.0, 0.67), "gaps": (0.001, 0.001), **guidance}
        points += [_to_unit(dims, {**first, "encoder_refresh": r}) for r in sorted(counts.values())[1:]]
    return points


class _Search:
    """Grid then CMA-ES over one budget, every evaluation cached in the trial log."""

    def __init__(self, objective: Callable[[dict[str, Any]], float], nfe: int, dims: Sequence[Dim],
                 log: TrialLog, budget: int, seed: int, bar: Any, task: Any,
                 validation: Callable[[dict[str, Any]], float] | None = None, top: int = 0) -> None:
        self.objective, self.nfe, self.dims, self.log = objective, nfe, dims, log
        self.validation, self.top = validation, top
        self.start_keys: set[str] = set()  # the start settings in their own structure: always validated
        self.budget, self.seed, self.bar, self.task = budget, seed, bar, task
        self.trials: list[tuple[dict[str, Any], float]] = []
        self.best: tuple[float, dict[str, Any]] | None = None

    def evaluate(self, structure: Structure, u: Sequence[float], start: bool = False) -> float:
        settings = structure.settings(self.nfe, {d.name: d.value(x) for d, x in zip(self.dims, u, strict=True)})
        key = json.dumps(settings, sort_keys=True)
        if start:
            self.start_keys.add(key)
        distance = self.log.cache.get(key)
        if distance is None:
            distance = self.objective(settings)
            self.log.record(key, distance)
        self.trials.append((settings, distance))
        if self.best is None or distance < self.best[0]:
            self.best = (distance, settings)
        self.bar.update(self.task, advance=1, best=f"best {self.best[0]:.4g}")
        return distance

    def run(self, starts: Sequence[Mapping[str, Any]]) -> Outcome:
        """The grid over every structure, then CMA-ES on the structure of the best grid point."""
        grid = grid_points(self.dims, starts, self.nfe)
        scored = []
        for structure in structures(self.nfe):
            for i, u in enumerate(grid):
                own = i < len(starts) and (starts[i].get("order", 1), starts[i].get("solver", "ucgm")) == \
                    (structure.order, structure.solver)
                if len(self.trials) < self.budget:
                    scored.append((self.evaluate(structure, u, own), structure, u))
        _, structure, x0 = min(scored, key=lambda s: s[0])
        es = cma.CMAEvolutionStrategy(x0, CMA_SIGMA, {"bounds": [0.0, 1.0], "seed": self.seed + 1,
                                                "verbose": -9, "tolfun": 1e-12})
        while len(self.trials) < self.budget and not es.stop():
            xs = es.ask()
            xs = xs[: self.budget - len(self.trials)]
            values = [self.evaluate(structure, x) for x in xs]
            if len(values) < es.popsize:
                break
            es.tell(xs, [v if math.isfinite(v) else 1e30 for v in values])
        assert self.best is not None
        if self.validation is None or self.top < 1:
            return Outcome(self.best[1], self.best[0], self.trials)
        return self.validated()

    def validated(self) -> Outcome:
        """The `top` best distinct settings and the start settings re-measured on independent validation noise;
        the pick minimises the mean of both distances (a single noise draw rewards settings that fit its chance
        fluctuations), so it is never worse than a start setting by that mean."""
        assert self.validation is not None
        distinct = {json.dumps(s, sort_keys=True): (d, s) for s, d in self.trials}
        ranked = sorted(distinct.items(), key=lambda kv: kv[1][0])
        chosen = ranked[: self.top] + [kv for kv in ranked[self.top :] if kv[0] in self.start_keys]
        best: tuple[float, dict[str, Any]] | None = None
        checked = []
        for key, (distance, settings) in chosen:
            check = self.log.cache.get("validation " + key)
            if check is None:
                check = self.validation(settings)
                self.log.record("validation " + key, check)
            score = (distance + check) / 2
            checked.append((settings, distance, check))
            if best is None or score < best[0]:
                best = (score, settings)
            self.bar.update(self.task, advance=1, best=f"validated {best[0]:.4g}")
        assert best is not None
        return Outcome(best[1], best[0], self.trials, validated=checked)


def search_outcome(
    model_fn: ModelFn,
    shape: Sequence[int],
    transport: str | Transport = "Linear",
    nfe: int = 4,
    num_samples: int = 4096,
    seed: int = 0,
    *,
    trials: int = 200,
    reference: Mapping[str, Any] | None = None,
    features: Features | None = None,
    start: Sequence[Mapping[str, Any]] = (),
    guided_fn: GuidedFn | None = None,
    log: str | Path | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    reference_stats: Sequence[Stats] = (),
    validate: int = 5,
    encoder_evals: int | None = None,
    **model_kwargs: Any,
) -> Outcome:
    """`search` with its record: the best setting, its distance on the search noise and every trial.

    `guided_fn(scale, interval)` (optional) returns the guided model_fn: guidance scale and interval
    are then searched too, against the same reference (model_fn at `reference` settings).
    `log`: the JSONL trial log that makes the search resumable; `fingerprint` names the model in it.
    `validate`: the number of best settings re-measured on independent validation noise (0: none).
    `reference_stats`: `Outcome.reference_stats` of an earlier search of the same model, noise and
    reference settings (other budgets), so each many-step reference is drawn once.
    `encoder_evals`: a budget of condition-encoder evaluations per sample for a network that shares its encoder
    (`sharing`); `encoder_refresh` is then searched within it. None: recomputed at every evaluation.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise UCGMError(f"nfe must be an integer >= 1, got {nfe!r}")
    if trials < 1 or num_samples < 2:
        raise UCGMError(f"need trials >= 1 and num_samples >= 2, got {trials} and {num_samples}")
    transport = get_transport(transport)
    reference = dict(reference or DEFAULT_REFERENCE)
    noise = torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    dims = SAMPLER_DIMS + (GUIDANCE_DIMS if guided_fn is not None else ()) + \
        ((refresh_dim(nfe, encoder_evals),) if encoder_evals is not None else ())
    header = {"version": LOG_VERSION, "nfe": nfe, "transport": transport.name, "num_samples": num_samples,
              "seed": seed, "trials": trials, "reference": reference, "guidance": guided_fn is not None,
              "start": [dict(s) for s in start], "fingerprint": dict(fingerprint or {}), "validate": validate,
              "inputs": _digest(noise, model_kwargs)}
    if encoder_evals is not None:  # only then: the logs of searches without a budget stay valid
        header["encoder_evals"] = encoder_evals
    if encoder_evals is not None and not shares_encoder(model_fn, noise, transport, model_kwargs):
        raise UCGMError(f"encoder_evals={encoder_evals}: this model's network does not share its condition "
                        "encoder (sharing.shared_encoder); search it without an encoder budget")
    trial_log = TrialLog(Path(log) if log is not None else None, json.loads(json.dumps(header)))
    with progress("trial", "best", enabled=show_progress) as bar:
        task = bar.add_task(f"search NFE {nfe}", total=trials + validate, best="")
        features = features or latent_features()
        objectives = [Objective(model_fn, n, transport, s, features, reference, guided_fn, batch_size, model_kwargs,
                                ref) for n, s, ref in _inputs(noise, seed, validate, reference_stats, device)]
        outcome = _Search(objectives[0], nfe, dims, trial_log, trials, seed, bar, task,
                          objectives[-1] if validate else None, validate).run(start)
    outcome.reference_stats = [o.ref for o in objectives]
    return outcome


def _inputs(noise: Tensor, seed: int, validate: int, stats: Sequence[Stats],
            device: torch.device | str | None) -> list[tuple[Tensor, int, Stats | None]]:
    """(noise, seed, known reference statistics) of the search objective and, with `validate`, the validation one
    (its own noise, seed + VALIDATION_OFFSET)."""
    inputs: list[tuple[Tensor, int, Stats | None]] = [(noise, seed, stats[0] if stats else None)]
    if validate:
        other = seed + VALIDATION_OFFSET
        val_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(other)).to(device)
        inputs.append((val_noise, other, stats[1] if len(stats) > 1 else None))
    return inputs


def _digest(noise: Tensor, model_kwargs: Mapping[str, Any]) -> str:
    """A short hash of the search inputs (noise and tensor keyword arguments), for the log header."""
    h = hashlib.sha256(noise.detach().cpu().numpy().tobytes())
    for key in sorted(model_kwargs):
        value = model_kwargs[key]
        h.update(key.encode())
        h.update(value.detach().cpu().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return h.hexdigest()[:16]


def search(
    model_fn: ModelFn,
    shape: Sequence[int],
    transport: str | Transport = "Linear",
    nfe: int = 4,
    num_samples: int = 4096,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """The `uc.sample` keyword arguments that spend exactly `nfe` evaluations and bring the samples of
    `model_fn` closest (Frechet distance) to its many-step reference; see `search_outcome` for options
    (trials, reference, features, start, guided_fn, log, ...); other keywords go to `model_fn`."""
    return search_outcome(model_fn, shape, transport, nfe, num_samples, seed, **kwargs).settings


def at_nfe(settings: Mapping[str, Any], nfe: int) -> dict[str, Any]:
    """A given setting (e.g. a recipe's) with its steps (and order-2 end gap) changed to spend exactly `nfe`."""
    a, b, c = settings.get("time_dist", (1.0, 1.0, 1.0))
    g0, g1 = settings.get("gaps", (0.001, 0.001))
    values = {"a": a, "b": b, "c": c, "extrapolation": settings.get("extrapolation", 0.0),
              "stochasticity": settings.get("stochasticity", 0.0), "gap_start": g0, "gap_end": g1}
    order = int(settings.get("order", 1)) if nfe >= 2 else 1
    solver = str(settings.get("solver", "ucgm")) if nfe >= 2 else "ucgm"
    guidance = {k: settings[k] for k in ("cfg_scale", "cfg_interval") if k in settings}
    return {**Structure(order, solver).settings(nfe, values), **guidance}


def nfe_of(settings: Mapping[str, Any]) -> int:
    """Model evaluations of a found setting (`count_nfe`)."""
    return count_nfe(settings["steps"], settings["order"], settings["gaps"])


def encoder_evals_of(settings: Mapping[str, Any]) -> int:
    """Condition-encoder evaluations of a found setting (`count_encoder_evals`; NFE when it is not shared)."""
    return count_encoder_evals(settings["steps"], settings["order"], settings["gaps"],
                               settings.get("encoder_refresh", 1))
