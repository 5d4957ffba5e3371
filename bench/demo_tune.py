"""Proof of UCGM-T on the embedded demo model: tune it into a 2-step generator, then measure.

    python bench/demo_tune.py [--out runs/demo-tuned] [--num 5000] [--skip-tune]

1. Runs `ucgm tune --from demo --out OUT` (the demo recipe's tuning settings) and times it.
2. Samples the base model and the tuned model at 2 NFE and at the demo's multi-step setting.
3. Prints a table of FD_pixel: the Frechet distance between Gaussian fits of raw 16x16x3
   pixels (768-d, values in [0, 1]) of `--num` generated images and `--num` held-out demo
   images (make_shapes with another seed). It is a pixel-space statistic, not an Inception
   FID: Inception features are meaningless on 16x16 procedural shapes, and this needs no
   download. Lower is better; the same reference set is used for every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ucgm_convert as uc
from ucgm_convert.demo_data import make_shapes
from ucgm_convert.generation import balanced_labels, batches, generate_batch
from ucgm_convert.metrics.fid import FeatureStats, frechet_distance
from ucgm_convert.recipe import load_recipe
from ucgm_convert.settings import SamplingSettings
from ucgm_convert.vae import decode, to_uint8

REFERENCE_SEED = 12345  # the demo model trains on other seeds' images


def pixel_stats(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of flattened [N, H, W, C] uint8 images scaled to [0, 1]."""
    flat = images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 255.0
    stats = FeatureStats(flat.shape[1])
    stats.update(flat)
    return stats.mu_sigma()


def reference_stats(num: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel statistics of `num` held-out demo images."""
    images, _ = make_shapes(num, seed=REFERENCE_SEED)
    return pixel_stats(to_uint8(decode(images, {"name": "identity"})).numpy())


def fd_pixel(model: uc.GenerativeModel, settings: SamplingSettings, num: int,
             ref: tuple[np.ndarray, np.ndarray], seed: int = 0) -> float:
    """FD_pixel of `num` balanced samples of `model` drawn with `settings`."""
    labels = balanced_labels(num, range(model.num_classes))
    images = [generate_batch(model, settings, [labels[i] for i in r], r, seed)[1].numpy()
              for r in batches(num, 500)]
    mu, sigma = pixel_stats(np.concatenate(images))
    return frechet_distance(mu, sigma, *ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-tuned"), help="tuned model folder")
    parser.add_argument("--num", type=int, default=5000, help="samples per row and reference images")
    parser.add_argument("--skip-tune", action="store_true", help="measure an existing --out")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)

    tune_seconds = None
    if not args.skip_tune:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ucgm_convert", "tune", "--from", "demo", "--out", str(args.out)],
                       check=True)
        tune_seconds = time.perf_counter() - start

    recipe = load_recipe("demo")
    base, tuned = uc.load("embedded:demo"), uc.load(args.out)
    multi = base.cfg.sampling
    rows = [
        ("base", f"UCGM-S, {multi.steps} steps (multi-step setting)", base, multi),
        ("base", "UCGM-S, 2 steps (deterministic)", base, SamplingSettings(steps=2)),
        ("base", "2 steps, few-step setting (rho 1, gaps 0.001/0.5)", base, recipe.few_step_sampling),
        ("tuned", "2 steps, few-step setting (its default)", tuned, recipe.few_step_sampling),
        ("tuned", f"UCGM-S, {multi.steps} steps (multi-step setting)", tuned, multi),
    ]
    ref = reference_stats(args.num)
    results = []
    print(f"\nFD_pixel on {args.num} samples vs {args.num} held-out demo images (lower is better)")
    if tune_seconds is not None:
        print(f"`ucgm tune --from demo` took {tune_seconds:.0f} s wall clock ({torch.get_num_threads()} threads)")
    print("\n| model | sampler | NFE | FD_pixel |\n|---|---|---|---|")
    for name, sampler, model, settings in rows:
        value = fd_pixel(model, settings, args.num, ref)
        results.append({"model": name, "sampler": sampler, "nfe": settings.nfe, "fd_pixel": value})
        print(f"| {name} | {sampler} | {settings.nfe} | {value:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tune_seconds": tune_seconds, "num": args.num, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
