"""Quality per NFE of the embedded demo model against its own 250-step reference, before and after `ucgm tune`.

Solver error: the root-mean-square pixel difference between a sample drawn in N evaluations and the
250-step UCGM-S sample from the same noise and label (both with the demo's guidance, CFG 1.5, so one
evaluation is one batched cond/uncond forward). Deterministic samplers only, so the error is the
sampler's, with no sampling-noise floor. After tuning (`jobs.tune.run` with the demo recipe, into a
temporary folder), the tuned model is measured the same way without guidance (the tuning bakes the
guidance in): deterministic (rho 0) and with its recipe's few-step setting (rho 1, gaps 0.001/0.5).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import NullFormatter

import ucgm_convert as uc
from ucgm_convert.baselines import run_baseline
from ucgm_convert.jobs import tune
from ucgm_convert.jobs.source import ModelSource
from ucgm_convert.recipe import load_recipe

from .core import Options, Result, save_figure

TITLE = "Demo model: RMS pixel error vs its 250-step reference, per NFE, before and after ucgm tune"
REFERENCE_STEPS = 250
NFES = (1, 2, 4, 8, 16)
CFG = 1.5
Sampler = Callable[[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, int], torch.Tensor | None]


def _ucgm(end_gap: float | None = None, **kwargs: Any) -> Sampler:
    """UCGM-S in `nfe` steps; `end_gap` c sets gaps = (0.001, c / nfe) (what the multistep solvers want)."""

    def run(fn, noise: torch.Tensor, y: torch.Tensor, nfe: int) -> torch.Tensor:
        gen = [torch.Generator().manual_seed(i) for i in range(len(noise))]
        gaps = {"gaps": (0.001, end_gap / nfe)} if end_gap is not None and nfe > 1 else {}
        return uc.sample(fn, noise, "Linear", steps=nfe, generator=gen, y=y, **gaps, **kwargs)

    return run


def _baseline(name: str) -> Sampler:
    def run(fn, noise: torch.Tensor, y: torch.Tensor, nfe: int) -> torch.Tensor | None:
        if name in ("heun", "dpm++2m", "unipc") and nfe < 2:
            return None
        result = run_baseline(name, fn, noise, nfe, "Linear", y=y)
        return result.samples if result.nfe == nfe else None

    return run


BASE = {"UCGM-S (demo settings)": _ucgm(), "UCGM-S multistep, end gap 1/N": _ucgm(1.0, solver="multistep"),
        "UCGM-S multistep-pc, end gap 1/N": _ucgm(1.0, solver="multistep-pc"),
        "Euler": _baseline("euler"), "Heun": _baseline("heun"), "diffusers DPM-Solver++ 2M": _baseline("dpm++2m"),
        "diffusers UniPC": _baseline("unipc")}
TUNED = {"tuned, UCGM-S rho 0": _ucgm(), "tuned, few-step setting (rho 1, gaps 0.001/0.5)":
         _ucgm(stochasticity=1.0, gaps=(0.001, 0.5))}


def _tuned_model(opts: Options, folder: Path) -> tuple[uc.GenerativeModel, float]:
    """Tune the demo model with its recipe (fewer steps with --quick) into `folder`; (model, seconds)."""
    overrides = {"steps": 10} if opts.quick else {}
    config = tune.TuneConfig(out=folder, source=ModelSource(recipe="demo"), tuning=overrides, sample_every=0,
                             save_every=0, device="cpu" if torch.device(opts.device).type == "cpu" else opts.device)
    t0 = time.perf_counter()
    tune.run(config)
    return uc.load(folder, device=opts.device).eval().requires_grad_(False), time.perf_counter() - t0


def _curves(samplers: dict[str, Sampler], fn, noise, y, reference, nfes) -> dict[str, list[list[float]]]:
    out = {}
    with torch.inference_mode():
        for label, sampler in samplers.items():
            points = []
            for nfe in nfes:
                x = sampler(fn, noise, y, nfe)
                if x is not None:
                    points.append([nfe, float((x - reference).square().mean().sqrt())])
            out[label] = points
    return out


def plot(curves: dict[str, list[list[float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", linestyle="-" if "UCGM" in label or "tuned" in label else "--", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(NFES, [str(v) for v in NFES])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel(f"RMS pixel error vs the {REFERENCE_STEPS}-step sample")
    ax.set_title("Embedded demo model (16x16 RGB, pixel space)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run(opts: Options) -> Result:
    n, nfes = (16, (1, 2, 4)) if opts.quick else (64, NFES)
    base = uc.load("embedded:demo", device=opts.device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((n, *base.latent_shape), generator=gen).to(opts.device)
    y = (torch.arange(n) % base.num_classes).to(opts.device)
    guided = uc.guided(base, CFG)
    steps = 20 if opts.quick else REFERENCE_STEPS
    with torch.inference_mode():
        reference = uc.sample(guided, noise, "Linear", steps=steps, y=y)
    curves = _curves(BASE, guided, noise, y, reference, nfes)
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-tune-") as tmp:
        tuned, seconds = _tuned_model(opts, Path(tmp) / "tuned")
        curves.update(_curves(TUNED, tuned, noise, y, reference, nfes))
    rows = [[label, *(next((f"{e:.4f}" for k, e in points if k == nfe), "-") for nfe in nfes)]
            for label, points in curves.items()]
    recipe = load_recipe("demo")
    notes = [f"{n} samples; reference: UCGM-S {steps} steps, CFG {CFG}; tuned with the demo recipe "
             f"({10 if opts.quick else recipe.tuning.steps} steps) in {seconds:.0f} s",
             "a per-sample error: it measures how closely a deterministic sampler follows the reference path; the "
             "tuned model's rho 1 setting draws fresh noise at each step, so its error here is large by construction "
             "(its distribution is measured by bench/demo_tune.py's pixel FD)"]
    path = plot(curves, opts.out / "quality_demo.png")
    return Result("demo", TITLE, ["sampler", *(f"NFE {v}" for v in nfes)], rows, notes, plots=[path],
                  data={"nfes": list(nfes), "samples": n, "reference_steps": steps, "tune_seconds": seconds,
                        "curves": curves})
