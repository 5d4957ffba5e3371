"""One UCGM-T step (demo recipe: consistency 1, enhanced 1.3, frozen teacher), three ways, same t, z, x, y:

- unavoidable: one forward+backward of the student, three no-grad forwards of B rows (the teacher and
  the two finite-difference points), the optimizer step: the work any implementation must do;
- reference: a straightforward transcription of the reference training step (online forward, the teacher
  forward, two separate no-grad forwards for the finite difference, the loss, backward, step);
- ours: `uc.UCGMObjective` (the two finite-difference points in one batched forward), backward, step.

Peak memory: CUDA's max_memory_allocated, or on a CPU the peak resident memory of the first step in a
fresh process beyond what the models and the optimizer hold (VmHWM after /proc/self/clear_refs).
Target: ours <= 1.03x the unavoidable work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import ucgm_convert as uc
from ucgm_convert.recipe import load_recipe
from ucgm_convert.transports import HALF_PI

from .core import Options, Result, cell, in_fresh_process, ratio, rounds, summary, sync_for
from .networks import build, demo, specs

TITLE = "Tuning step: ours vs the reference transcription vs the unavoidable work"
WAYS = ("unavoidable", "reference", "ours")


def _setup(model: uc.GenerativeModel, batch: int, device: str):
    """Student (trainable copy), frozen teacher, optimizer, objective and one fixed batch (x, y, t, z)."""
    recipe = load_recipe("demo")
    kwargs = {**recipe.objective_kwargs(), "transport": model.transport, "num_classes": model.num_classes}
    objective = uc.UCGMObjective(**kwargs)
    student = copy.deepcopy(model).train().requires_grad_(True)
    teacher = model.eval().requires_grad_(False)
    optimizer = torch.optim.RAdam(student.parameters(), **recipe.tuning.optimizer_kwargs())
    gen = torch.Generator().manual_seed(1)
    shape = (batch, *model.latent_shape)
    x = torch.randn(shape, generator=gen).to(device)
    z = torch.randn(shape, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    t = objective.sample_t(batch).to(device)
    return objective, student, teacher, optimizer, (x, y, t, z)


def reference_loss(obj: uc.UCGMObjective, model, teacher, x: Tensor, y: Tensor, t_flat: Tensor, z: Tensor) -> Tensor:
    """The reference training step's loss for consistency 1 with enhancement, one forward per evaluation."""
    tr, t = obj.transport, t_flat.view(-1, *([1] * (x.ndim - 1)))
    ndrop = obj.num_dropped(len(x))
    y = y.clone()
    y[len(y) - ndrop:] = obj.num_classes
    x_t = tr.interpolate(x, z, t)
    f_t = model(x_t, t_flat, y)
    with torch.no_grad():
        lo, hi = obj.enhanced_range
        inside = (t_flat > lo) & (t_flat < hi)
        x_m, z_m = tr.predictions(x_t, teacher(x_t, t_flat, y), t)
        x_tar = obj._enhance(x, inside, ndrop, x_m, x)
        z_tar = obj._enhance(z, inside, ndrop, z_m, z)
        t_plus, t_minus = t + obj.fd_eps, t - obj.fd_eps
        x_plus = tr.interpolate(x_tar, z_tar, t_plus)
        x_minus = tr.interpolate(x_tar, z_tar, t_minus)
        y_plus = tr.predictions(x_plus, model(x_plus, t_plus.flatten(), y), t_plus)[0]
        y_minus = tr.predictions(x_minus, model(x_minus, t_minus.flatten(), y), t_minus)[0]
        rate = 1 / (2 * obj.fd_eps)
        deriv = torch.clamp(y_plus * rate - y_minus * rate, -1.0, 1.0)
        target = f_t.detach() - (tr.alpha_in(t) / tr.dent(t) * 4 / torch.sin(t * HALF_PI)) * deriv
    loss = torch.sqrt(((f_t - target) ** 2).flatten(1).mean(1) + obj.huber_eps**2) - obj.huber_eps
    return (loss * torch.cos(t_flat * HALF_PI)).mean()


def _steps(objective, student, teacher, optimizer, batch) -> dict[str, Callable[[], None]]:
    """The three ways, each one full step."""
    x, y, t, z = batch

    def finish(loss: Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def unavoidable() -> None:
        with torch.no_grad():
            for _ in range(3):
                teacher(x, t, y)
        finish(student(x, t, y).square().mean())

    return {"unavoidable": unavoidable,
            "reference": lambda: finish(reference_loss(objective, student, teacher, x, y, t, z)),
            "ours": lambda: finish(objective(student, x, y, teacher=teacher, t=t, z=z))}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _cpu_peak_worker(way: str, spec_index: int, size: str, quick: bool) -> float:
    """In a fresh process: the peak resident memory (MiB) of one step of `way` beyond the setup's."""
    torch.set_num_threads(1)
    spec, model = _network(spec_index, size, quick, "cpu")
    setup = _setup(model, spec.batch, "cpu")
    step = _steps(*setup)[way]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) / 1024


def _network(index: int, size: str, quick: bool, device: str):
    """Network `index` of this benchmark: 0 the demo model, then the run's families."""
    if index == 0:
        return demo(device)
    spec = specs(size, quick)[index]
    return spec, build(spec, device)


def _peak_mib(way: str, index: int, opts: Options, steps: dict[str, Callable[[], None]]) -> float | None:
    if torch.device(opts.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        steps[way]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    return in_fresh_process(_cpu_peak_worker, way, index, opts.size, opts.quick)


def run(opts: Options) -> Result:
    indices = [0] if opts.quick else [0, 1]
    rows, data, notes = [], {}, []
    for index in indices:
        spec, model = _network(index, opts.size, opts.quick, opts.device)
        setup = _setup(model, spec.batch, opts.device)
        objective, student, teacher, _, (x, y, t, z) = setup
        same = torch.allclose(objective(student, x, y, teacher=teacher, t=t, z=z),
                              reference_loss(objective, student, teacher, x, y, t, z), rtol=1e-5)
        steps = _steps(*setup)
        times = rounds(steps, opts.repeats, sync=sync_for(opts.device))
        for way in WAYS:
            r = ratio(times[way], times["unavoidable"])
            peak = _peak_mib(way, index, opts, steps)
            rows.append([spec.name, way, spec.batch, f"{summary(times[way]).median * 1e3:.1f}", cell(r),
                         "n/a" if peak is None else f"{peak:.0f}"])
            data[f"{spec.name} | {way}"] = {"ms": summary(times[way]).median * 1e3, "ratio": r.median,
                                            "low": r.low, "high": r.high, "peak_mib": peak}
        notes.append(f"{spec.name}: ours = {data[f'{spec.name} | ours']['ratio']:.3f}x the unavoidable work "
                     f"(target <= 1.03), reference {data[f'{spec.name} | reference']['ratio']:.3f}x; "
                     f"same loss as the reference: {same}")
    return Result("tuning", TITLE, ["network", "way", "batch", "ms/step", "x unavoidable (min-max)", "peak MiB"],
                  rows, notes, data=data)
