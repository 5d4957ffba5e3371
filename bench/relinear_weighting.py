"""ReLinear and the UCGM-T consistency weighting: per-time losses, gradients, and tuning the demo.

    python -m bench.relinear_weighting [--out runs/relinear] [--num 5000] [--skip-tune] [--json FILE]

The objective's time distribution Beta(0.8, 1), its consistency weight 4 / sin(1.57 t), the
cos(1.57 t) loss weighting and the enhanced range [0, 0.75] are written for noise at t = 1. ReLinear
(LightningDiT, DDT) has noise at t = 0. To compare the transports on the same function, this builds
the ReLinear twin of the embedded demo model (a Linear SiT): F_re(x_t, t) = -F_lin(x_t, 1 - t),
made exact by folding t -> 1 - t into the first time-MLP layer (the sinusoidal features of 1 - t are
a fixed linear map of those of t) and negating the output layer. Then:

1. Per time bucket (10 buckets of the objective's t, 256 samples each, the demo recipe's objective
   with the model as its own frozen teacher): mean loss and gradient norm for Linear, ReLinear with
   the reference objective, and ReLinear with `frame: noise-at-1` (the objective in time s = 1 - t).
2. Tunes the demo three ways (recipe demo's settings: Linear; ReLinear; ReLinear + frame noise-at-1) and
   prints FD_pixel at 2 NFE (bench/demo_tune.py's statistic) of each, and of the untuned models.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import ucgm_convert as uc
from ucgm_convert.demo_data import make_shapes
from ucgm_convert.jobs.tune import TuneConfig
from ucgm_convert.jobs.tune import run as tune
from ucgm_convert.recipe import load_recipe

from .demo_tune import fd_pixel, reference_stats

FRAMES = {False: "transport", True: "noise-at-1"}  # the objective's time frame without / with mirroring

REPO = Path(__file__).resolve().parents[1]
BUCKETS = 10


def relinear_twin(model: uc.GenerativeModel) -> uc.GenerativeModel:
    """The same network in ReLinear's convention: F_re(x, t, y) = -F_lin(x, 1 - t, y), exactly."""
    twin = uc.GenerativeModel(type(model.net)(**model.cfg.arch_kwargs), model.cfg.replace(transport="ReLinear",
                                                                                          recipe=None))
    twin.net.load_state_dict(model.net.state_dict())
    emb = twin.net.t_embedder
    half = emb.frequency_size // 2
    w = torch.exp(-math.log(emb.max_period) * torch.arange(half, dtype=torch.float64) / half)
    c, s = torch.diag(torch.cos(w)), torch.diag(torch.sin(w))
    # [cos((1-t)w), sin((1-t)w)] = [[C, S], [S, -C]] @ [cos(tw), sin(tw)]
    rotation = torch.cat([torch.cat([c, s], 1), torch.cat([s, -c], 1)], 0)
    with torch.no_grad():
        first = emb.mlp[0].weight
        first.copy_((first.double() @ rotation).to(first.dtype))
        twin.net.final_layer.linear.weight.neg_()
        twin.net.final_layer.linear.bias.neg_()
    return twin.eval()


def bucket_table(models: dict[str, tuple[uc.GenerativeModel, bool]], batch: int = 256) -> list[dict]:
    """Per bucket of the objective's t: loss and gradient norm of each (model, mirrored frame)."""
    recipe = load_recipe("demo")
    x, y = make_shapes(batch, seed=7)
    rows = []
    for b in range(BUCKETS):
        lo, hi = b / BUCKETS, (b + 1) / BUCKETS
        g = torch.Generator().manual_seed(b)
        t = lo + (hi - lo) * torch.rand(batch, generator=g)
        z = torch.randn(x.shape, generator=g)
        row = {"bucket": f"[{lo:.1f}, {hi:.1f})", "beta_mass": hi**0.8 - lo**0.8}
        for name, (model, mirror) in models.items():
            kwargs = {**recipe.objective_kwargs(), "transport": model.transport.name, "frame": FRAMES[mirror]}
            obj = uc.UCGMObjective(**kwargs)
            student = model.train().requires_grad_(True)
            student.zero_grad()
            loss = obj(student, x, y, teacher=model, t=t, z=z)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf"))
            row[name] = (float(loss.detach()), float(norm))
            model.eval().requires_grad_(False)
        rows.append(row)
    return rows


def print_buckets(rows: list[dict], names: list[str]) -> None:
    print("\nPer-bucket loss / gradient norm (t: the objective's time; Beta(0.8,1) mass = share of training)")
    print("| t bucket | Beta mass | " + " | ".join(f"{n} loss | {n} grad" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r[n][0]:.3g} | {r[n][1]:.3g}" for n in names)
        print(f"| {r['bucket']} | {r['beta_mass']:.3f} | {cells} |")
    means = " | ".join(f"{sum(r['beta_mass'] * r[n][0] for r in rows):.3g} | "
                       f"{sum(r['beta_mass'] * r[n][1] for r in rows):.3g}" for n in names)
    print(f"| Beta-weighted mean | 1 | {means} |")


def tune_runs(out: Path, base: Path, twin: Path, steps: int | None) -> dict[str, Path]:
    """The demo tuned three ways; returns the output folders."""
    relinear_recipe = out / "demo-relinear.yaml"
    relinear_recipe.write_text((REPO / "recipes" / "demo.yaml").read_text()
                               .replace("transport: Linear", "transport: ReLinear")
                               .replace("name: demo", "name: demo-relinear")
                               .replace("checkpoint: embedded:demo", "checkpoint: null"))
    runs = {"Linear": (str(REPO / "recipes" / "demo.yaml"), base, False),
            "ReLinear": (str(relinear_recipe), twin, False),
            "ReLinear+mirror": (str(relinear_recipe), twin, True)}
    folders = {}
    for name, (recipe, checkpoint, mirror) in runs.items():
        folder = out / name.replace("+", "-")
        extra = {"steps": steps} if steps else {}
        tune(TuneConfig.flat(out=folder, recipe=recipe, checkpoint=str(checkpoint), data="demo", sample_every=0,
                             save_every=0, overwrite=True, frame=FRAMES[mirror], device="cpu", **extra))
        folders[name] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/relinear"), help="working folder")
    parser.add_argument("--num", type=int, default=5000, help="samples per FD_pixel row")
    parser.add_argument("--steps", type=int, default=None, help="tuning steps (default: the demo recipe's)")
    parser.add_argument("--skip-tune", action="store_true", help="only the per-bucket table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    base = uc.load("embedded:demo")
    twin = relinear_twin(base)
    x, t, y = torch.randn(8, 3, 16, 16), torch.rand(8), torch.arange(8)
    with torch.no_grad():
        gap = float((twin(x, t, y) + base(x, 1 - t, y)).abs().max())
    print(f"ReLinear twin: max |F_re(x, t) + F_lin(x, 1 - t)| = {gap:.2e}")
    rows = bucket_table({"Linear": (base, False), "ReLinear": (twin, False), "ReLinear+mirror": (twin, True)})
    print_buckets(rows, ["Linear", "ReLinear", "ReLinear+mirror"])
    results: dict = {"twin_gap": gap, "buckets": rows}
    if not args.skip_tune:
        base_path = uc.save_checkpoint(base, args.out / "base-linear")
        twin_path = uc.save_checkpoint(twin, args.out / "base-relinear")
        folders = tune_runs(args.out, base_path, twin_path, args.steps)
        few = load_recipe("demo").few_step_sampling
        ref = reference_stats(args.num)
        fds = {"untuned Linear": fd_pixel(base, few, args.num, ref),
               "untuned ReLinear": fd_pixel(twin, few, args.num, ref)}
        fds.update({f"tuned {name}": fd_pixel(uc.load(folder), few, args.num, ref) for name, folder in folders.items()})
        print(f"\nFD_pixel at 2 NFE (few-step setting), {args.num} samples (lower is better)")
        print("| model | FD_pixel |\n|---|---|")
        for name, value in fds.items():
            print(f"| {name} | {value:.2f} |")
        results["fd_pixel"] = fds
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
