"""Classifier-free guidance, three ways, in samples/s of a whole `uc.sample` run:

- ours: `uc.guided`, one batched forward of the B conditional and B unconditional rows, B samples kept;
- reference: the sampler state holds 2B rows (noise repeated, labels + null labels), the model mixes
  within the batch and returns the mix twice, and the unconditional half of the samples is thrown away;
- separate: two forwards of B rows (conditional, then unconditional) per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

import ucgm_convert as uc

from .core import Options, Result, cell, ratio, rounds, summary, sync_for
from .networks import build, demo, inputs, specs

TITLE = "Guidance: samples/s, ours (batched) vs the reference (2x state) vs two forwards"
CFG = 1.5
STEPS = 8


def _reference_cfg(model: uc.GenerativeModel, scale: float):
    """The reference's forward_with_cfg: the first half of x twice through the net, the mix returned twice."""

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        mixed = uncond + scale * (cond - uncond)
        return torch.cat([mixed, mixed])

    return fn


def _separate_cfg(model: uc.GenerativeModel, scale: float):
    """Two forwards per step: conditional, then with the null class."""

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
        return uncond + scale * (cond - uncond)

    return fn


def _ways(model: uc.GenerativeModel, x: Tensor, y: Tensor, steps: int) -> dict:
    """The three ways, each a function drawing B samples."""
    ours, ref, sep = uc.guided(model, CFG), _reference_cfg(model, CFG), _separate_cfg(model, CFG)
    x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.null_class)])
    tr = model.transport
    return {"reference (2x state)": lambda: uc.sample(ref, x2, tr, steps=steps, y=y2).chunk(2)[0],
            "ours (batched)": lambda: uc.sample(ours, x, tr, steps=steps, y=y),
            "two forwards": lambda: uc.sample(sep, x, tr, steps=steps, y=y)}


def run(opts: Options) -> Result:
    nets = [demo(opts.device), *((s, build(s, opts.device)) for s in specs(opts.size, opts.quick)[1:2])]
    steps = 3 if opts.quick else STEPS
    rows, data, same_everywhere = [], {}, True
    for spec, model in nets:
        x, y = inputs(spec, spec.batch, opts.device, model.num_classes)
        ways = _ways(model, x, y, steps)
        with torch.inference_mode():
            same = torch.allclose(ways["reference (2x state)"](), ways["ours (batched)"](), atol=1e-4)
            times = rounds(ways, opts.repeats, sync=sync_for(opts.device))
        same_everywhere &= same
        base = times["reference (2x state)"]
        for way, t in times.items():
            rate = spec.batch / summary(t).median
            speed = ratio(base, t)
            rows.append([spec.name, way, spec.batch, f"{rate:.1f}", cell(speed)])
            data[f"{spec.name} | {way}"] = {"samples_per_s": rate, "speedup": speed.median, "low": speed.low,
                                            "high": speed.high, "same_samples_as_reference": same}
    notes = ["speedup = reference time / this way's time, per interleaved round (median, min-max)",
             "ours and the reference draw the same samples (to 1e-4)" if same_everywhere else
             "ours and the reference DIFFER by more than 1e-4: the comparison is not like for like"]
    return Result("guidance", TITLE, ["network", "way", "batch", "samples/s", "speedup vs reference"], rows, notes,
                  data=data)
