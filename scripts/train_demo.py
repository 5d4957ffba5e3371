"""Train the embedded demo model (`ucgm sample --from demo`) with the project's own UCGM-T code.

A small class-conditional SiT learns the procedural 16x16 "shapes" dataset
(ucgm_convert.demo_data) by plain flow matching: UCGM-T with the Linear transport and
consistency 0. The EMA of the weights is written in our checkpoint format (model.safetensors,
config.json, recipe.yaml, README.md) to ucgm_convert/assets/demo, which is what ships.

Reproduce the committed model bit for bit (same torch build; about 26 minutes on an idle
2-core machine):

    python scripts/train_demo.py --threads 1

The default `--threads 2` takes about 15 minutes there and gives an equivalent model that
differs by float round-off. On a machine busy with other jobs use one thread: two threads
waiting on each other slow down several-fold.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import ucgm_convert as uc
from ucgm_convert.demo_data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, make_shapes

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "ucgm_convert" / "assets" / "demo"

# Settings of the committed model (trained with `--threads 1`, see the docstring above).
DEFAULTS: dict[str, Any] = {
    "steps": 6000,
    "batch_size": 64,
    "lr": 1e-3,
    "seed": 0,
    "hidden_size": 96,
    "depth": 4,
    "num_heads": 4,
    "dataset_size": 50_000,
    "ema_decay": 0.999,
    "warmup": 200,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "time_dist": (1.0, 1.0, 1.0),
    "label_drop": 0.1,
    "threads": 2,
}

# UCGM-S settings stored in config.json "sampling": what `ucgm sample --from demo` uses.
DEFAULT_SAMPLING: dict[str, Any] = {
    "steps": 16,
    "order": 1,
    "stochasticity": 0.0,
    "extrapolation": 0.0,
    "time_dist": [1.0, 1.0, 1.0],
    "gaps": [0.001, 0.001],
    "cfg_scale": 1.5,
    "cfg_interval": [0.0, 1.0],
}


def build_config(hidden_size: int, depth: int, num_heads: int,
                 sampling: dict[str, Any] | None = None) -> uc.ModelConfig:
    """The demo model's config: a SiT on 3x16x16 pixels (identity VAE), Linear transport, 10 classes."""
    return uc.ModelConfig(
        family="ucgm",
        arch="sit",
        arch_kwargs={
            "input_size": IMAGE_SIZE,
            "patch_size": 2,
            "in_channels": 3,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "num_classes": NUM_CLASSES,
        },
        transport="Linear",
        num_classes=NUM_CLASSES,
        latent_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
        vae={"name": "identity"},
        recipe="demo",
        sampling=dict(DEFAULT_SAMPLING if sampling is None else sampling),
    )


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of `lr` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)


def reproduce_command(settings: dict[str, Any]) -> str:
    """The shell command that retrains the model with `settings` (only non-default flags)."""
    parts = ["python", "scripts/train_demo.py"]
    for key, value in settings.items():
        if key in DEFAULTS and value is not None and value != DEFAULTS[key]:
            flag = "--" + key.replace("_", "-")
            parts += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return shlex.join(parts)


def model_card(
    settings: dict[str, Any], params: int, final_loss: float, seconds: float, sampling: dict[str, Any] | None = None
) -> str:
    """The README.md model card: what the model is, how to reproduce it, data and settings."""
    s = settings
    samp = DEFAULT_SAMPLING if sampling is None else sampling
    classes = "\n".join(f"| {i} | {name} |" for i, name in enumerate(CLASS_NAMES))
    return f"""---
license: apache-2.0
library_name: ucgm-convert
tags:
- ucgm
- flow-matching
- class-conditional
- sit
- demo
pipeline_tag: unconditional-image-generation
---

# ucgm-convert demo model

A tiny class-conditional SiT ({params:,} parameters, float32) that generates the 16x16 RGB
procedural "shapes" of `ucgm_convert.demo_data` in pixel space (identity VAE). It ships
inside the package as the embedded default, so `ucgm sample --from demo` and
`uc.load("embedded:demo")` work offline on a fresh install. It is a multi-step base model:
few-step (1-2 step) versions can be distilled from it with UCGM-T consistency training.

## Reproduce

```
{reproduce_command(s)}
```

Trained with the project's own UCGM-T objective (`uc.UCGMObjective`, Linear transport,
consistency 0 = plain flow matching), {s['steps']} steps of batch {s['batch_size']} on a 2-core
CPU machine with {s['threads']} torch thread(s) in {seconds / 60:.1f} minutes (wall clock, on a
machine shared with other jobs); final training loss (mean of the last 100 steps)
{final_loss:.4f}. Weights are bit-identical only with the same torch build and thread count;
on an idle 2-core machine the default `--threads 2` is about 1.8x faster than one thread and
gives an equivalent model that differs by float round-off.

## Data

`make_shapes({s['dataset_size']}, seed={s['seed']})` from `ucgm_convert.demo_data`: anti-aliased
shapes on a dark background with random position, size and colour jitter, pixels in [-1, 1],
10 balanced classes:

| label | class |
|---|---|
{classes}

## Training settings

| setting | value |
|---|---|
| network | SiT, patch 2, hidden {s['hidden_size']}, depth {s['depth']}, {s['num_heads']} heads, DiT init |
| objective | UCGM-T, transport Linear, consistency 0, enhanced 0, label drop {s['label_drop']} |
| time distribution | Beta({s['time_dist'][0]}, {s['time_dist'][1]}) x {s['time_dist'][2]} |
| optimiser | AdamW, lr {s['lr']}, weight decay {s['weight_decay']}, {s['warmup']} warmup steps, cosine to 10% |
| gradient clipping | {s['grad_clip']} |
| EMA | decay {s['ema_decay']} (the saved weights) |
| seed | {s['seed']} |

## Sampling defaults (config.json "sampling")

UCGM-S with {samp['steps']} steps, order {samp['order']}, stochasticity {samp['stochasticity']},
extrapolation {samp['extrapolation']}, time warp {samp['time_dist']}, gaps {samp['gaps']},
guidance scale {samp['cfg_scale']} on t in {samp['cfg_interval']}.

## Results

Visual inspection of 10 samples per class:

| sampler | steps | guidance | quality |
|---|---|---|---|
| UCGM-S (defaults) | {samp['steps']} | {samp['cfg_scale']} | every class recognisable; plus and X strokes sometimes ragged |
| UCGM-S | 32 | none | recognisable, but X, plus and checker often ragged or blobby |
| UCGM-S | 2 | none | blurry, nearly identical class averages (this is not a few-step model) |
"""


def write_checkpoint(
    model: uc.GenerativeModel, out: str | Path, settings: dict[str, Any], final_loss: float, seconds: float
) -> Path:
    """Save `model` in our format with its recipe.yaml (settings, command) and README.md card."""
    params = sum(p.numel() for p in model.parameters() if p is not model.net.pos_embed)
    recipe = yaml.safe_dump({"recipe": "demo", "script": "scripts/train_demo.py",
                             "command": reproduce_command(settings),
                             "train": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                             "sampling": model.cfg.sampling.to_dict()}, sort_keys=False)
    card = model_card(settings, params, final_loss, seconds, model.cfg.sampling.to_dict())
    return uc.save_checkpoint(model, out, recipe_yaml=recipe, card=card)


def train(
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    out: str | Path | None = DEFAULT_OUT,
    hidden_size: int = DEFAULTS["hidden_size"],
    depth: int = DEFAULTS["depth"],
    num_heads: int = DEFAULTS["num_heads"],
    dataset_size: int = DEFAULTS["dataset_size"],
    ema_decay: float = DEFAULTS["ema_decay"],
    warmup: int = DEFAULTS["warmup"],
    weight_decay: float = DEFAULTS["weight_decay"],
    grad_clip: float = DEFAULTS["grad_clip"],
    time_dist: tuple[float, float, float] = DEFAULTS["time_dist"],
    label_drop: float = DEFAULTS["label_drop"],
    log_every: int = 100,
    save_every: int = 0,
    num_threads: int | None = DEFAULTS["threads"],
) -> uc.GenerativeModel:
    """Train the demo model by flow matching, save its EMA to `out` (unless None) and return the EMA."""
    settings = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "hidden_size": hidden_size,
        "depth": depth, "num_heads": num_heads, "dataset_size": dataset_size, "ema_decay": ema_decay,
        "warmup": warmup, "weight_decay": weight_decay, "grad_clip": grad_clip, "time_dist": tuple(time_dist),
        "label_drop": label_drop, "threads": num_threads,
    }
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    images, labels = make_shapes(dataset_size, seed=seed)
    batches = torch.Generator().manual_seed(seed + 1)

    model = uc.GenerativeModel.build(build_config(hidden_size, depth, num_heads))
    model.net.initialize_weights()
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # pos_embed is fixed
    objective = uc.UCGMObjective(
        transport="Linear", consistency=0.0, enhanced=0.0, label_drop=label_drop,
        time_dist=tuple(time_dist), num_classes=NUM_CLASSES,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    print(f"demo model: {params:,} parameters; {dataset_size} images; {steps} steps of batch {batch_size}",
          flush=True)

    def save(tag: str) -> None:
        if out is None:
            return
        recent = losses[-100:]
        write_checkpoint(ema, out, settings, sum(recent) / max(1, len(recent)), time.time() - start)
        print(f"saved {tag} EMA checkpoint to {out}", flush=True)

    losses: list[float] = []
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, dataset_size, (batch_size,), generator=batches)
        loss = objective(model, images[idx], labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        # EMA warmup: short memory early so the EMA is useful after few steps.
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            elapsed = time.time() - start
            print(f"step {step + 1:6d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {(step + 1) / elapsed:.2f} it/s  "
                  f"{elapsed / 60:.1f} min", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(f"step-{step + 1}")
    save("final")
    print(f"done in {(time.time() - start) / 60:.1f} min; final loss {sum(losses[-100:]) / len(losses[-100:]):.4f}",
          flush=True)
    return ema


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; every default is the committed model's setting."""
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of data, init and noise (default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder (default: the embedded demo)")
    p.add_argument("--hidden-size", type=int, default=d["hidden_size"], help="SiT width (default %(default)s)")
    p.add_argument("--depth", type=int, default=d["depth"], help="SiT blocks (default %(default)s)")
    p.add_argument("--num-heads", type=int, default=d["num_heads"], help="attention heads (default %(default)s)")
    p.add_argument("--dataset-size", type=int, default=d["dataset_size"], help="training images (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"], help="EMA decay per step (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="lr warmup steps (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="AdamW weight decay (default %(default)s)")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="max grad norm, 0 = off (default %(default)s)")
    p.add_argument("--time-dist", type=float, nargs=3, default=d["time_dist"], metavar=("A", "B", "SCALE"),
                   help="training times t ~ Beta(A, B) * SCALE (default %(default)s)")
    p.add_argument("--label-drop", type=float, default=d["label_drop"],
                   help="null-label ratio for CFG (default %(default)s)")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps (default %(default)s)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps, 0 = only at the end")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="torch CPU threads; 1 is faster on a busy machine (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse flags and train."""
    a = parse_args(argv)
    train(
        steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, out=a.out, hidden_size=a.hidden_size,
        depth=a.depth, num_heads=a.num_heads, dataset_size=a.dataset_size, ema_decay=a.ema_decay,
        warmup=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip, time_dist=tuple(a.time_dist),
        label_drop=a.label_drop, log_every=a.log_every, save_every=a.save_every, num_threads=a.threads,
    )


if __name__ == "__main__":
    sys.exit(main())
