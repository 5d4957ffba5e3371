"""Quality per model evaluation on an analytic Gaussian mixture whose exact network output is known.

The model is exact (ucgm_convert.analytic), so only the sampler is measured: the Frechet distance of
the samples' Gaussian fit to the mixture's exact moments, and the sliced Wasserstein distance to
exact draws, mean and standard deviation over seeds (each seed: a new mixture and new noise), at
NFE 2..40, in several dimensions. NFE is every model evaluation (a second-order step costs two);
a method that cannot spend exactly N evaluations is run with the most it can spend below N and
plotted at its true count. UCGM-S runs in each recipe's own transport (the data distribution is the
same for every transport); Euler, Heun and diffusers' schedulers run on the Linear (flow) path.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture, sliced_wasserstein
from ucgm_convert.baselines import run_baseline
from ucgm_convert.recipe import list_recipes

from .core import Options, Result, save_figure

TITLE = "Quality per NFE: analytic Gaussian mixture (exact model), FD and sliced Wasserstein"
NFES = (2, 4, 6, 8, 10, 20, 40)
# dimension -> (samples, seeds): the 16-D table gets the most; the floor of FD is about d^2 / (2 samples).
DIMS = {2: (2000, 2), 16: (4000, 3), 64: (2000, 2)}
QUICK_DIMS = {2: (1000, 2), 16: (1000, 2)}
PROJECTIONS = 64
COMPONENTS = 8
BASELINES = {"Euler": "euler", "Heun": "heun", "diffusers FlowMatchEuler": "flow-euler",
             "diffusers DPM-Solver++ 2M": "dpm++2m", "diffusers UniPC": "unipc"}
Method = Callable[[GaussianMixture, torch.Tensor, int], tuple[torch.Tensor, int]]


def _steps_for(nfe: int, order: int, gaps: tuple[float, float]) -> int | None:
    """The most steps whose evaluation count is <= nfe (None if even one step costs more)."""
    fitting = [s for s in range(1, 2 * nfe + 2) if uc.count_nfe(s, order, gaps) <= nfe]
    return max(fitting) if fitting else None


def ucgm_method(transport: str, end_gap: float | None = None, **kwargs: Any) -> Method:
    """UCGM-S with fixed settings, its steps chosen for the NFE budget; `end_gap` c sets gaps = (0.001, c / NFE)."""
    order = kwargs.get("order", 1)

    def run(gm: GaussianMixture, noise: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
        settings = {**kwargs, "gaps": (0.001, end_gap / nfe)} if end_gap is not None else kwargs
        gaps = tuple(settings.get("gaps", (0.001, 0.001)))
        steps = _steps_for(nfe, order, gaps)
        if steps is None:
            return noise * math.nan, nfe
        model = GaussianMixture(gm.weights, gm.means, gm.stds, uc.get_transport(transport))
        return uc.sample(model, noise, transport, steps=steps, **settings), uc.count_nfe(steps, order, gaps)

    return run


def baseline_method(name: str) -> Method:
    def run(gm: GaussianMixture, noise: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
        result = run_baseline(name, gm, noise, nfe, gm.transport)
        return result.samples, result.nfe

    return run


def methods() -> dict[str, Method]:
    """Every recipe's UCGM-S settings (one per distinct setting), UCGM-S order 2, multistep, the baselines."""
    out: dict[str, Method] = {}
    seen: set[tuple] = set()
    for recipe in list_recipes():
        kwargs = {k: v for k, v in recipe.sampling.as_sample_kwargs().items() if k not in ("steps", "encoder_refresh")}
        # Recipes whose settings differ by < 0.05 in extrapolation (edm2-s/l/xxl) share one curve.
        key = (recipe.transport, round(kwargs["extrapolation"], 1), *sorted((k, str(v)) for k, v in kwargs.items()
                                                                           if k != "extrapolation"))
        if key not in seen:
            seen.add(key)
            out[f"UCGM-S {recipe.name} ({recipe.transport})"] = ucgm_method(recipe.transport, **kwargs)
    out["UCGM-S order 2 (Linear)"] = ucgm_method("Linear", order=2)
    # The multistep solvers want a last step of about 1/N (ucgm_convert/multistep.py).
    out["UCGM-S multistep, end gap 1/N (Linear)"] = ucgm_method("Linear", end_gap=1.0, solver="multistep")
    out["UCGM-S multistep-pc, end gap 1/N (Linear)"] = ucgm_method("Linear", end_gap=1.0, solver="multistep-pc")
    out.update({label: baseline_method(name) for label, name in BASELINES.items()})
    return out


def measure(method: Method, dim: int, nfe: int, seeds: int, n: int) -> dict[str, Any]:
    """FD and SW of one method at one NFE budget, over `seeds` mixtures."""
    fds, sws, used = [], [], nfe
    for seed in range(seeds):
        gm = GaussianMixture.random(dim=dim, components=COMPONENTS, seed=seed, transport="Linear")
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + seed))
        with torch.inference_mode():
            samples, used = method(gm, noise, nfe)
        samples = samples.double()
        if not bool(torch.isfinite(samples).all()):
            fds.append(math.inf)
            sws.append(math.inf)
            continue
        fds.append(gm.frechet_to_truth(samples))
        sws.append(sliced_wasserstein(samples, gm.sample(n, seed=2000 + seed), projections=PROJECTIONS, seed=seed))
    return {"nfe": used, "fd": fds, "sw": sws}


def _stat(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return math.inf, 0.0
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def plot(data: dict[str, Any], dims: tuple[int, ...], path: Path) -> Path:
    """FD (top) and SW (bottom) against NFE, log-log, one column per dimension, error bars = std over seeds."""
    fig, axes = plt.subplots(2, len(dims), figsize=(5.2 * len(dims), 9.5), squeeze=False)
    labels = list(next(iter(data.values())).keys())
    colors = plt.cm.tab20.colors  # type: ignore[attr-defined]
    for col, dim in enumerate(dims):
        for row, metric in enumerate(("fd", "sw")):
            ax = axes[row][col]
            euler = [_stat(p[metric])[0] for p in data[str(dim)]["Euler"]]
            top = 10 * max(v for v in euler if math.isfinite(v))  # points above: "off the chart" (diverging)
            bottom = top
            for i, label in enumerate(labels):
                points = [(p["nfe"], *_stat(p[metric])) for p in data[str(dim)][label]]
                points = [p for p in points if math.isfinite(p[1]) and p[1] <= top]
                if not points:
                    continue
                xs, ys, es = zip(*points)
                low = [min(e, 0.9 * y) for y, e in zip(ys, es)]  # a log axis cannot show mean - std <= 0
                bottom = min(bottom, *(0.8 * (y - lo) for y, lo in zip(ys, low)))
                ax.errorbar(xs, ys, yerr=(low, es), label=label, color=colors[i % 20], marker="o",
                            linestyle="-" if label.startswith("UCGM") else "--", markersize=3, capsize=2,
                            linewidth=1.2)
            ax.set_ylim(bottom, top)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(NFES, [str(v) for v in NFES])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("NFE (model evaluations)")
            ax.set_ylabel("Frechet distance" if metric == "fd" else "sliced Wasserstein")
            ax.set_title(f"{dim}-D Gaussian mixture ({COMPONENTS} components)")
            ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.14)
    fig.suptitle("Distance to the true distribution vs NFE (mean ± std over seeds; points above the top "
                 "edge diverge: see the table)", fontsize=10)
    return save_figure(fig, path, dpi=72)


def _cell(values: list[float]) -> str:
    mean, std = _stat(values)
    return "diverges" if not math.isfinite(mean) else f"{mean:.3g} ± {std:.1g}"


def losses(table: dict[str, list[dict[str, Any]]], nfes: tuple[int, ...]) -> list[str]:
    """Per NFE budget: the best UCGM-S variant against the best other sampler (by mean FD), compared per seed."""
    notes = []
    for j, nfe in enumerate(nfes):
        scores = {label: _stat(points[j]["fd"])[0] for label, points in table.items()}
        ours = min((v, k) for k, v in scores.items() if k.startswith("UCGM"))
        theirs = min((v, k) for k, v in scores.items() if not k.startswith("UCGM"))
        # Paired by seed (the same mixture and noise for both): who is closer on each seed.
        wins = sum(a < b for a, b in zip(table[ours[1]][j]["fd"], table[theirs[1]][j]["fd"]))
        seeds = len(table[ours[1]][j]["fd"])
        verdict = "we win on every seed" if wins == seeds else "WE LOSE on every seed" if wins == 0 else \
            f"mixed: we win on {wins} of {seeds} seeds"
        notes.append(f"NFE {nfe}: best UCGM-S {ours[1]} FD {ours[0]:.3g} vs best other {theirs[1]} "
                     f"FD {theirs[0]:.3g}: {verdict}")
    return notes


def run(opts: Options) -> Result:
    dims, nfes = (QUICK_DIMS, (2, 4, 10)) if opts.quick else (DIMS, NFES)
    data: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for dim, (n, seeds) in dims.items():
        data[str(dim)] = {label: [measure(m, dim, nfe, seeds, n) for nfe in nfes] for label, m in methods().items()}
    main = "16"
    n, seeds = dims[16]
    rows = [[label, *(_cell(p["fd"]) + ("" if p["nfe"] == nfe else f" @{p['nfe']}") for p, nfe in zip(points, nfes))]
            for label, points in data[main].items()]
    notes = [f"table: Frechet distance in {main}-D (mean ± std over {seeds} seeds, {n} samples; '@k': k evaluations "
             f"spent); sampling-noise floor about d^2/(2n) = {int(main) ** 2 / (2 * n):.3f}",
             *losses(data[main], nfes)]
    path = plot(data, tuple(dims), opts.out / "quality_gmm.png")
    return Result("quality", TITLE, ["method", *(f"NFE {v}" for v in nfes)], rows, notes, plots=[path],
                  data={"nfes": list(nfes), "dims": {str(d): {"samples": v[0], "seeds": v[1]} for d, v in dims.items()},
                        "projections": PROJECTIONS, "results": data})
