"""Sampler overhead: wall time of `uc.sample` / (NFE x the model's forward time), with and without guidance.

The overhead is also timed on its own: `uc.sample` driven by a stand-in network that returns a stored
output costs only the sampler's work, so ratio = 1 + that time / (NFE x forward), which a loaded
machine cannot blur the way it blurs the difference of two large timings.

With guidance the forward is the one batched cond/uncond forward of 2B rows, so the guidance mix
counts as overhead. Ratios are per interleaved round (forward, then sample), median and range.
Target: <= 1.02 with the demo-sized network on a CPU and with an XL network on a GPU.
"""

from __future__ import annotations

import torch

import ucgm_convert as uc

from .core import Options, Result, cell, ratio, rounds, summary, sync_for
from .networks import Spec, build, demo, inputs, specs

TITLE = "Sampler overhead: uc.sample / (NFE x forward)"
STEPS = 10
CFG = 1.5


class _Replay:
    """A stand-in network that returns a stored output at no cost: timing `uc.sample` with it leaves only the
    sampler's own work (state updates, predictions, the guidance mix)."""

    def __init__(self, model: uc.GenerativeModel, output: torch.Tensor) -> None:
        self.output, self.num_classes, self.null_class = output, model.num_classes, model.null_class
        self.guidance_channels = model.guidance_channels

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.output[: len(x_t)]


def _overhead(model: uc.GenerativeModel, spec: Spec, opts: Options, guidance: bool) -> dict:
    """Sampler overhead of one network, guided or not: measured directly, and as 1 + loop / (NFE x forward)."""
    x, y = inputs(spec, spec.batch, opts.device, model.num_classes)
    steps = 4 if opts.quick else STEPS
    xf, yf = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.null_class)])) if guidance else (x, y)
    tf = torch.full((xf.shape[0],), 0.5, device=opts.device)
    with torch.inference_mode():
        replay = _Replay(model, model(xf, tf, yf))
        fn, free = (uc.guided(model, CFG), uc.guided(replay, CFG)) if guidance else (model, replay)
        times = rounds({"forward": lambda: model(xf, tf, yf),
                        "sample": lambda: uc.sample(fn, x, model.transport, steps=steps, y=y),
                        "loop": lambda: uc.sample(free, x, model.transport, steps=steps, y=y)},
                       opts.repeats, sync=sync_for(opts.device))
    nfe = uc.count_nfe(steps)
    forward, loop = summary(times["forward"]).median, summary(times["loop"]).median
    return {"nfe": nfe, "forward_ms": forward * 1e3, "loop_ms": loop * 1e3,
            "direct": ratio(times["sample"], times["forward"], scale=nfe), "decomposed": 1 + loop / (nfe * forward)}


def run(opts: Options) -> Result:
    nets = [(s, build(s, opts.device)) for s in specs(opts.size, opts.quick)]
    nets.insert(1, demo(opts.device))
    rows, data = [], {}
    for spec, model in nets:
        for guidance in (False, True):
            r = _overhead(model, spec, opts, guidance)
            rows.append([spec.name, "cfg 1.5" if guidance else "none", spec.batch, r["nfe"],
                         f"{r['forward_ms']:.2f}", f"{r['loop_ms']:.2f}", f"{r['decomposed']:.4f}", cell(r["direct"])])
            data[f"{spec.name} | {'cfg' if guidance else 'none'}"] = {
                "batch": spec.batch, "nfe": r["nfe"], "forward_ms": r["forward_ms"], "loop_ms": r["loop_ms"],
                "ratio": r["decomposed"], "direct": r["direct"].median, "direct_low": r["direct"].low,
                "direct_high": r["direct"].high}
        del model
    demo_worst = max(v["ratio"] for k, v in data.items() if k.startswith("demo"))
    notes = [f"demo-sized network: worst ratio {demo_worst:.4f} (target <= 1.02 on a CPU)",
             "ratio = 1 + loop / (NFE x forward), 'loop' being uc.sample with a network that costs nothing (returns "
             "a stored output); 'measured' = sample / (NFE x forward) timed directly, per round (median, min-max): "
             "the same quantity, but on a loaded machine its spread is the load's, not the sampler's"]
    return Result("sampler", TITLE, ["network", "guidance", "batch", "NFE", "forward ms", "loop ms", "ratio",
                                     "measured (min-max)"], rows, notes, data=data)
