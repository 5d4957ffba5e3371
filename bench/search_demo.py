"""Proof of `uc.search` on the embedded demo model: searched settings against recipes/demo.yaml at equal NFE.

    python -m bench.search_demo [--nfe 2,4,8] [--trials 30] [--search-samples 512] [--num 2000] [--json FILE]

The search (labels balanced over the 10 classes, search noise seed 0) targets 64 Euler steps of
the demo model with the recipe's guidance (CFG 1.5), in pixel space (the demo has no VAE). Every
row is then scored on fresh samples (seed 1, never seen by the search) by FD_pixel to held-out
demo images, exactly as bench/demo_tune.py measures it. The recipe rows are the recipe's
`sampling` (16 uniform Euler steps, CFG 1.5) moved to the NFE, and its `few_step_sampling` (the
setting for the UCGM-T tuned model) at the same NFE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import ucgm_convert as uc
from ucgm_convert.generation import balanced_labels, model_fn
from ucgm_convert.recipe import load_recipe
from ucgm_convert.searcher import at_nfe, search_outcome

from .core import Options, Result
from .demo_tune import fd_pixel, reference_stats

TITLE = "uc.search vs recipes/demo.yaml on the demo model (FD_pixel to held-out images, fresh samples)"
COLUMNS = ["NFE", "searched", "recipe sampling", "recipe few-step", "searched wins", "searched settings"]
EVAL_SEED = 1


def run(opts: Options, nfes: tuple[int, ...] = (2, 4, 8), trials: int = 30, search_samples: int = 512,
        num: int = 2000) -> Result:
    """The demo proof table; quick: NFE 2 only, 6 trials of 64 samples, 256 evaluation samples."""
    if opts.quick:
        nfes, trials, search_samples, num = (2,), 6, 64, 256
    model, recipe = uc.load("embedded:demo"), load_recipe("demo")
    base, few = recipe.sampling, recipe.few_step_sampling
    labels = torch.as_tensor(balanced_labels(search_samples, range(model.num_classes)))
    ref = reference_stats(num)
    rows: list[list[Any]] = []
    shared: list = []
    for nfe in nfes:
        outcome = search_outcome(model_fn(model, base), model.latent_shape, model.transport, nfe, search_samples, 0,
                                 trials=trials, reference={"steps": 64}, start=[at_nfe(base.as_sample_kwargs(), nfe),
                                                                                at_nfe(few.as_sample_kwargs(), nfe)],
                                 reference_stats=shared, batch_size=512, show_progress=not opts.quick, y=labels)
        shared = outcome.reference_stats
        found = base.replace(**outcome.settings)
        scores = [fd_pixel(model, s, num, ref, seed=EVAL_SEED)
                  for s in (found, base.replace(**at_nfe(base.as_sample_kwargs(), nfe)),
                            few.replace(**at_nfe(few.as_sample_kwargs(), nfe)))]
        rows.append([nfe, *scores, scores[0] < min(scores[1:]), json.dumps(outcome.settings)])
        print(rows[-1], file=sys.stderr, flush=True)
    notes = [f"searched beats both recipe rows at {sum(r[4] for r in rows)}/{len(rows)} budgets; "
             f"{trials} trials of {search_samples} samples, {num} evaluation samples; CFG 1.5 doubles each NFE"]
    return Result("search_demo", TITLE, COLUMNS, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", default="2,4,8", help="comma-separated budgets")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--search-samples", type=int, default=512)
    parser.add_argument("--num", type=int, default=2000, help="evaluation samples and held-out images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(Options(), tuple(int(n) for n in args.nfe.split(",")), args.trials, args.search_samples, args.num)
    print(f"## {result.title}\n\n| " + " | ".join(result.columns) + " |\n|" + "---|" * len(result.columns))
    for row in result.rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    print("\n" + "\n".join(f"- {n}" for n in result.notes))
    if args.json:
        args.json.write_text(json.dumps({"columns": result.columns, "rows": result.rows}, indent=2))


if __name__ == "__main__":
    main()
