"""Sampler overhead: wall time of `uc.sample` / (NFE x the model's forward time), with and without guidance.

With guidance the forward is the one batched cond/uncond forward of 2B rows, so the guidance mix
counts as overhead. Ratios are per interleaved round (forward, then sample), median and range.
Target: <= 1.02 with the demo-sized network on a CPU and with an XL network on a GPU.
"""

from __future__ import annotations

import torch

import ucgm_convert as uc

from .core import Options, Result, cell, ratio, rounds, sync_for
from .networks import Spec, build, demo, inputs, specs

TITLE = "Sampler overhead: uc.sample / (NFE x forward)"
STEPS = 10
CFG = 1.5


def _overhead(model: uc.GenerativeModel, spec: Spec, opts: Options, guidance: bool) -> dict:
    """Per-round sample/(NFE x forward) of one network, guided or not."""
    x, y = inputs(spec, spec.batch, opts.device, model.num_classes)
    steps = 4 if opts.quick else STEPS
    fn = uc.guided(model, CFG) if guidance else model
    xf, yf = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.null_class)])) if guidance else (x, y)
    tf = torch.full((xf.shape[0],), 0.5, device=opts.device)
    with torch.inference_mode():
        times = rounds({"forward": lambda: model(xf, tf, yf),
                        "sample": lambda: uc.sample(fn, x, model.transport, steps=steps, y=y)},
                       opts.repeats, sync=sync_for(opts.device))
    nfe = uc.count_nfe(steps)
    overhead = ratio(times["sample"], times["forward"], scale=nfe)
    forward_ms = sorted(times["forward"])[len(times["forward"]) // 2] * 1e3
    return {"nfe": nfe, "forward_ms": forward_ms, "ratio": overhead}


def run(opts: Options) -> Result:
    nets = [(s, build(s, opts.device)) for s in specs(opts.size, opts.quick)]
    nets.insert(1, demo(opts.device))
    rows, data = [], {}
    for spec, model in nets:
        for guidance in (False, True):
            r = _overhead(model, spec, opts, guidance)
            rows.append([spec.name, "cfg 1.5" if guidance else "none", spec.batch, r["nfe"],
                         f"{r['forward_ms']:.2f}", cell(r["ratio"])])
            data[f"{spec.name} | {'cfg' if guidance else 'none'}"] = {
                "batch": spec.batch, "nfe": r["nfe"], "forward_ms": r["forward_ms"],
                "ratio": r["ratio"].median, "low": r["ratio"].low, "high": r["ratio"].high}
        del model
    demo_worst = max(v["ratio"] for k, v in data.items() if k.startswith("demo"))
    notes = [f"demo-sized network: worst median ratio {demo_worst:.3f} (target <= 1.02 on a CPU)"]
    return Result("sampler", TITLE, ["network", "guidance", "batch", "NFE", "forward ms", "ratio (min-max)"],
                  rows, notes, data=data)
