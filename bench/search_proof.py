"""Proof of `uc.search` on analytic Gaussian mixtures: searched settings against UniPC, DPM-Solver++ 2M
and the published recipes' settings, at equal NFE, on FRESH noise.

    python -m bench.search_proof [--quick] [--trials 120] [--json FILE]

For each mixture (transport, dimension, components; exact network output, ucgm_convert.analytic)
and each NFE in 2, 4, 6, 8, 10: `uc.search` (search noise seed 0, reference 1024 Euler steps
from the same noise) finds a setting; then every method samples the same fresh noise (seed
1000, never seen by the search) and is scored by the Frechet distance of its samples' Gaussian
fit to the mixture's EXACT mean and covariance (`GaussianMixture.frechet_to_truth`). "recipes" is
the best of every shipped recipe for that transport (its `sampling` and `few_step_sampling`,
moved to the NFE with `searcher.at_nfe`). The floor of FD from n fresh samples is about d^2 / (2n).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture
from ucgm_convert.baselines import run_baseline
from ucgm_convert.recipe import list_recipes
from ucgm_convert.searcher import at_nfe, search_outcome
from ucgm_convert.seeding import sample_generators

from .core import Options, Result

TITLE = "uc.search vs UniPC / DPM-Solver++ 2M / recipes on analytic Gaussian mixtures (FD to truth, fresh noise)"
COLUMNS = ["transport", "dim", "components", "NFE", "searched", "UniPC", "DPM++2M", "recipes", "beats solvers",
           "<= recipes"]
BASELINES = {"UniPC": "unipc", "DPM++2M": "dpm++2m"}
FRESH_SEED = 1000


@dataclass(frozen=True)
class Case:
    """One analytic mixture."""

    transport: str
    dim: int
    components: int
    seed: int = 0

    def model(self) -> GaussianMixture:
        return GaussianMixture.random(self.dim, self.components, seed=self.seed, transport=self.transport)


FULL = (Case("Linear", 8, 4), Case("ReLinear", 16, 8, 2), Case("EDM", 16, 8, 3), Case("Linear", 32, 16, 1))
QUICK = (Case("Linear", 4, 3),)


def recipe_starts(transport: str) -> list[tuple[str, dict[str, Any]]]:
    """Every shipped recipe's settings for `transport`: (label, uc.sample keywords)."""
    starts = []
    for recipe in list_recipes():
        if recipe.transport != transport:
            continue
        starts.append((recipe.name, recipe.sampling.as_sample_kwargs()))
        if recipe.few_step_sampling is not None:
            starts.append((f"{recipe.name} few-step", recipe.few_step_sampling.as_sample_kwargs()))
    return starts


def fresh_fd(gm: GaussianMixture, noise: torch.Tensor, settings: dict[str, Any]) -> float:
    """FD to the exact moments of `uc.sample` on the fresh noise (per-row stochastic noise)."""
    x = uc.sample(gm, noise, transport=gm.transport, generator=sample_generators(FRESH_SEED, range(len(noise))),
                  **settings)
    return gm.frechet_to_truth(x) if bool(torch.isfinite(x).all()) else float("inf")


def case_rows(case: Case, nfes: tuple[int, ...], trials: int, n_search: int, n_fresh: int,
              progress: bool = False) -> list[list[Any]]:
    """One row per NFE for one mixture (each also printed to stderr with its settings when `progress`)."""
    gm = case.model()
    noise = torch.randn(n_fresh, case.dim, generator=torch.Generator().manual_seed(FRESH_SEED))
    starts = recipe_starts(case.transport)
    rows = []
    for nfe in nfes:
        outcome = search_outcome(gm, (case.dim,), case.transport, nfe, n_search, 0, trials=trials,
                                 reference={"steps": 1024}, start=[at_nfe(s, nfe) for _, s in starts],
                                 show_progress=False)
        searched = fresh_fd(gm, noise, outcome.settings)
        solvers = {name: gm.frechet_to_truth(run_baseline(key, gm, noise, nfe=nfe, transport=case.transport).samples)
                   for name, key in BASELINES.items()}
        recipes = min((fresh_fd(gm, noise, at_nfe(s, nfe)) for _, s in starts), default=float("inf"))
        rows.append([case.transport, case.dim, case.components, nfe, searched, solvers["UniPC"],
                     solvers["DPM++2M"], recipes, searched < min(solvers.values()), searched <= recipes])
        if progress:
            print(rows[-1], json.dumps(outcome.settings), file=sys.stderr, flush=True)
    return rows


def plot(rows: list[list[Any]], path: Path) -> Path:
    """FD to the truth against NFE, one panel per mixture: searched, UniPC, DPM-Solver++ 2M, the best recipe."""
    cases = list(dict.fromkeys((r[0], r[1], r[2]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if (r[0], r[1], r[2]) == case]
        nfe = [r[3] for r in mine]
        for column, label, style in ((4, "uc.search (UCGM-S)", "o-"), (5, "diffusers UniPC", "s--"),
                                     (6, "diffusers DPM-Solver++ 2M", "^--"), (7, "best shipped recipe", "x:")):
            ax.plot(nfe, [r[column] for r in mine], style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="NFE (model evaluations)", ylabel="Frechet distance to truth",
               title=f"{case[0]}, {case[1]}-D, {case[2]} components")
        ax.set_xticks(nfe, [str(n) for n in nfe])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(opts: Options, trials: int = 150, only: tuple[int, ...] | None = None) -> Result:
    """The proof table (`trials` per search); quick: one small mixture at NFE 2 and 4, 130 trials."""
    torch.manual_seed(0)
    cases, nfes = (QUICK, (2, 4)) if opts.quick else (FULL, (2, 4, 6, 8, 10))
    cases = cases if only is None else tuple(cases[i] for i in only)
    trials, n_search, n_fresh = (130, 2048, 8192) if opts.quick else (trials, 2048, 20_000)
    rows = [row for case in cases for row in case_rows(case, nfes, trials, n_search, n_fresh, not opts.quick)]
    notes = [f"{sum(r[8] for r in rows)}/{len(rows)} rows beat both UniPC and DPM++2M; "
             f"{sum(r[9] for r in rows)}/{len(rows)} are <= the best recipe setting"]
    notes += [f"{r[0]} d={r[1]} K={r[2]} NFE {r[3]}: searched {r[4]:.4g} vs best solver {min(r[5], r[6]):.4g} "
              f"({r[4] / min(r[5], r[6]):.2f}x)" for r in rows if not r[8]]
    plots = [plot(rows, Path(opts.out) / "search_proof.png")]
    return Result("search_proof", TITLE, COLUMNS, rows, notes, plots, data={"trials": trials, "n_search": n_search,
                                                                             "n_fresh": n_fresh})


def markdown(result: Result) -> str:
    """The result as a markdown table with its notes."""
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else {True: "yes", False: "no"}.get(v, str(v)) \
            if isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(result.columns) + " |", "|" + "---|" * len(result.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in result.rows]
    return "\n".join([f"## {result.title}", "", *lines, "", *[f"- {n}" for n in result.notes]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small mixture, NFE 2 and 4")
    parser.add_argument("--trials", type=int, default=150, help="trials per search")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--only", default=None, help="comma-separated indices of the mixtures to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    only = tuple(int(i) for i in args.only.split(",")) if args.only else None
    result = run(Options(quick=args.quick), trials=args.trials, only=only)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps({"columns": result.columns, "rows": result.rows, "notes": result.notes,
                                         **result.data}, indent=2))


if __name__ == "__main__":
    main()
