"""Precision and compilation: float32 vs bfloat16 autocast vs `torch.compile`, for sampling and a tuning step.

Sampling: a whole `uc.sample` run of the demo-sized network (and the run's first family network);
tuning: one step of ours (`uc.UCGMObjective`, backward, optimizer step) as in bench/tuning.py.
Speedup = float32 time / this way's time per interleaved round; "max |diff|" is the largest
difference of the samples (or the loss) from float32's. Compilation time is the first call's extra time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import ucgm_convert as uc

from .core import Options, Result, cell, ratio, rounds, summary, sync_for
from .networks import build, demo, inputs, specs
from .tuning import _setup

TITLE = "Precision and compilation: float32 vs bfloat16 autocast vs torch.compile"
STEPS = 8


def _autocast(device: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return fn()

    return run


def _sampling(model: uc.GenerativeModel, spec, opts: Options) -> dict[str, Callable[[], torch.Tensor]]:
    x, y = inputs(spec, spec.batch, opts.device, model.num_classes)
    steps = 3 if opts.quick else STEPS
    compiled = torch.compile(model)

    def draw(fn) -> Callable[[], torch.Tensor]:
        return lambda: uc.sample(fn, x, model.transport, steps=steps, y=y)

    return {"float32": draw(model), "bf16 autocast": _autocast(opts.device, draw(model)), "compile": draw(compiled)}


def _tuning(model: uc.GenerativeModel, spec, opts: Options) -> dict[str, Callable[[], torch.Tensor]]:
    objective, student, teacher, optimizer, (x, y, t, z) = _setup(model, spec.batch, opts.device)
    compiled = torch.compile(student)

    def step(net) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            loss = objective(net, x, y, teacher=teacher, t=t, z=z)
            loss.backward()
            optimizer.zero_grad(set_to_none=True)  # no update: every way sees the same weights
            return loss.detach()

        return run

    return {"float32": step(student), "bf16 autocast": _autocast(opts.device, step(student)), "compile": step(compiled)}


def _measure(kind: str, ways: dict[str, Callable[[], torch.Tensor]], spec, opts: Options) -> tuple[list, dict]:
    sync = sync_for(opts.device)
    first, outputs = {}, {}
    grad = torch.enable_grad() if kind == "tuning" else torch.inference_mode()
    with grad:
        for name, fn in ways.items():  # first calls: compilation and warm-up, timed separately
            t0 = time.perf_counter()
            outputs[name] = fn().float()
            first[name] = time.perf_counter() - t0
        times = rounds(ways, opts.repeats, warmup=0, sync=sync)
    rows, data = [], {}
    for name, t in times.items():
        speed = ratio(times["float32"], t)
        diff = float((outputs[name] - outputs["float32"]).abs().max())
        extra = first[name] - summary(t).median
        rows.append([spec.name, kind, name, f"{summary(t).median * 1e3:.1f}", cell(speed), f"{diff:.2e}",
                     f"{max(extra, 0.0):.1f}"])
        data[f"{spec.name} | {kind} | {name}"] = {"ms": summary(t).median * 1e3, "speedup": speed.median,
                                                   "low": speed.low, "high": speed.high, "max_diff": diff,
                                                   "first_call_extra_s": extra}
    return rows, data


def run(opts: Options) -> Result:
    nets = [demo(opts.device)]
    if opts.size == "xl":  # compilation takes minutes on a CPU: the extra network only at full size
        spec = specs(opts.size, opts.quick)[1]
        nets.append((spec, build(spec, opts.device)))
    rows, data = [], {}
    for spec, model in nets:
        for kind, make in (("sampling", _sampling), ("tuning", _tuning)):
            r, d = _measure(kind, make(model, spec, opts), spec, opts)
            rows += r
            data.update(d)
    wins = [k for k, v in data.items() if not k.endswith("float32") and v["speedup"] > 1.05]
    notes = [f"pays off (> 1.05x): {', '.join(wins) if wins else 'nowhere on this machine'}"]
    return Result("precision", TITLE, ["network", "work", "way", "ms", "speedup vs fp32 (min-max)", "max |diff|",
                                       "compile/warm-up s"], rows, notes, data=data)
