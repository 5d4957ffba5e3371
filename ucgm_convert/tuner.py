"""UCGM-T few-step tuning as a library: `tune(TuneConfig(...)) -> Path` (what `ucgm tune` runs).

The student starts from the loaded model (`uc.load`), the teacher is a frozen copy of it
(recipe `teacher: frozen`, the reference's ema_decay_rate 1.0) or the student itself
(`online`), and the loss is `uc.UCGMObjective` with the recipe's tuning settings. The output
folder OUT is, at the end, a checkpoint in our format holding the EMA of the student, with the
recipe's few_step_sampling settings as config.json `sampling` defaults.

Layout of OUT:

    OUT/model.safetensors, config.json, recipe.yaml, README.md   the final EMA model (at the end)
    OUT/checkpoints/step-000100/    EMA model (our format) + train_state.pt (student, optimizer,
                                    step, RNG states, sampler position, recipe, tune config)
    OUT/last -> checkpoints/step-000100                          newest complete checkpoint
    OUT/metrics.jsonl               one line per step: step, loss, lr, grad_norm, time
    OUT/samples/step-000100.png     few-step samples of the EMA model from fixed noise

Exactness: the data order is `latent_data.batch_indices(seed, step)` and every random draw of
micro-batch c of step s (t, z, anything else the model draws) comes from the global RNG
seeded with (seed, s, c). So a run killed and resumed from a checkpoint repeats the
uninterrupted run bit for bit on the same machine, and a run on N processes matches the run
on one process: global batch B is cut into B / batch_size micro-batches ("chunks"); process r
takes chunks r*A .. r*A+A-1 (A = accumulation steps), each chunk's loss is the objective on
that chunk alone (so label drop applies to the last round(p * batch_size) rows of every
chunk, whatever the number of processes), and the gradient is the mean over all chunks.

Several processes train with DDP (every process holds the whole student and optimizer), or,
with `fsdp=True` (`--fsdp`), with FSDP2 (`torch.distributed.fsdp.fully_shard` on each block of
`net.blocks`, then on the net): the student's parameters, gradients and optimizer state are
sharded over the processes, the frozen teacher is sharded the same way (forward only), and the
EMA stays a full copy updated on rank 0 from the gathered student after each step. Checkpoints
hold full (gathered) weights and optimizer state in the same format as DDP / one-process runs,
so a run can be resumed with or without --fsdp and with any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import shutil
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn

from . import distributed
from .checkpoint import (
    CARD_NAME, CONFIG_NAME, RECIPE_NAME, VAE_WEIGHTS_NAME, WEIGHTS_NAME, read_safetensors, save_checkpoint,
    write_file_atomic,
)
from .errors import UCGMError
from .generate import balanced_labels, generate_batch, model_fn
from .images import save_grid
from .latent_data import DEMO, DEMO_SIZE, batch_indices, check_against_model, epochs_seen, open_dataset
from .loading import load
from .model import GenerativeModel
from .objective import UCGMObjective
from .recipe import Recipe, RecipeFieldError, SamplingSettings, TuningSettings, load_recipe
from .sampler import sample
from .seeding import initial_noise, sample_generators
from .statedict import load_state_dict_strict
from .vae import check_spec, decode, load_model_vae, to_uint8

__all__ = ["TuneConfig", "TuneDiverged", "TUNING_FLAGS", "chunk_seed", "latest_checkpoint", "tune"]

console = Console(stderr=True)

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LAST = "last"
STATE_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

# TuneConfig fields that override the recipe's TuningSettings (None = the recipe's value).
TUNING_FLAGS = (
    "steps", "global_batch", "lr", "optimizer", "betas", "weight_decay", "grad_clip", "ema_decay",
    "consistency", "enhanced", "enhanced_range", "huber_eps", "label_drop", "time_dist", "weighting", "teacher",
)
# Settings that must not change when a run is resumed (they change the math of the steps).
_RESUME_FIXED = ("recipe_tuning", "seed", "data", "demo_size", "source", "chunk")


class TuneDiverged(UCGMError):
    """The loss or the gradient norm stopped being finite; the weights were not updated."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TuneConfig:
    """Everything a tuning run needs; None fields take the recipe's value.

    Tuning overrides (TUNING_FLAGS) replace fields of the recipe's `tuning` section and are
    validated like the recipe (errors name the flag). `weighting="none"` turns the Cosine
    weighting off. `batch_size` is per process; it must divide global_batch / world_size,
    the quotient being the gradient accumulation steps (default: no accumulation).
    """

    out: str | Path
    recipe: str = "demo"
    checkpoint: str | None = None
    family: str | None = None
    data: str | None = None
    # overrides of the recipe's tuning settings
    steps: int | None = None
    global_batch: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    betas: tuple[float, float] | str | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    consistency: float | None = None
    enhanced: float | None = None
    enhanced_range: tuple[float, float] | str | None = None
    huber_eps: float | None = None
    label_drop: float | None = None
    time_dist: tuple[float, float, float] | str | None = None
    weighting: str | None = None
    teacher: str | None = None
    # the run
    batch_size: int | None = None
    dtype: str = "float32"
    grad_checkpointing: bool = False
    save_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 100
    num_samples: int = 16
    seed: int = 0
    resume: bool = False
    device: str | None = None
    vae: str | None = None
    demo_size: int = DEMO_SIZE
    threads: int | None = None
    progress: bool = True
    fsdp: bool = False  # shard with FSDP2 when launched with > 1 process (no-op, with a note, for 1)

    def __post_init__(self) -> None:
        if str(self.out).strip() == "":
            raise UCGMError("--out: expected an output folder")
        self.out = Path(self.out).expanduser()
        if self.dtype not in DTYPES:
            hint = " (float16 would need loss scaling; use bfloat16)" if self.dtype == "float16" else ""
            raise UCGMError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}{hint}")
        for name, low in (("save_every", 0), ("sample_every", 0), ("keep_checkpoints", 0), ("num_samples", 1),
                          ("seed", 0), ("demo_size", 1)):
            _int_at_least(getattr(self, name), low, _flag(name))
        if self.batch_size is not None:
            _int_at_least(self.batch_size, 1, "--batch-size")
        if self.threads is not None:
            _int_at_least(self.threads, 1, "--threads")
        if self.weighting is not None and str(self.weighting).lower() not in ("none", "cosine"):
            raise UCGMError(f"--weighting: expected 'Cosine' or 'none', got {self.weighting!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def tuning_overrides(self) -> dict[str, Any]:
        """The non-None tuning overrides, keyed by TuningSettings field."""
        changes = {name: getattr(self, name) for name in TUNING_FLAGS if getattr(self, name) is not None}
        if "weighting" in changes:
            changes["weighting"] = None if str(changes["weighting"]).lower() == "none" else "Cosine"
        return changes


def _int_at_least(value: Any, low: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UCGMError(f"{flag}: expected an integer >= {low}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Resolving the recipe, the model and the data (every check before training starts)
# --------------------------------------------------------------------------------------------


def effective_recipe(config: TuneConfig) -> Recipe:
    """The recipe with the config's tuning overrides applied; UCGMError naming the flag."""
    recipe = load_recipe(config.recipe)
    if recipe.tuning is None:
        raise UCGMError(f"recipe {recipe.name!r} has no tuning section; UCGM-T needs one (see `ucgm recipes show`)")
    if recipe.few_step_sampling is None:
        raise UCGMError(f"recipe {recipe.name!r} has no few_step_sampling section (the tuned model's sampler)")
    try:
        tuning = dataclasses.replace(recipe.tuning, **config.tuning_overrides())
    except RecipeFieldError as err:
        raise UCGMError(f"{_flag(err.path[0])}: {err.detail}") from None
    return dataclasses.replace(recipe, tuning=tuning)


def check_family(recipe: Recipe, model: GenerativeModel, source: str) -> None:
    """The recipe must be for this model: same family, transport and classes.

    A checkpoint in our format keeps the family it was converted from (config.json "family"),
    so a converted or already tuned REPA-E model is "repa-e" and matches the repa-e recipe;
    models native to this project (the demo) are "ucgm" and match recipes of family "ucgm".
    """
    if recipe.family != model.family:
        raise UCGMError(f"--from {recipe.name}: the recipe is for {recipe.family!r} models but {source} is a "
                        f"{model.family!r} model; pick the recipe of its family (`ucgm recipes list`)")
    if recipe.transport != model.transport.name:
        raise UCGMError(f"--from {recipe.name}: the recipe uses the {recipe.transport} transport but {source} "
                        f"predicts in {model.transport.name}")
    if recipe.num_classes != model.num_classes:
        raise UCGMError(f"--from {recipe.name}: the recipe is for {recipe.num_classes} classes but {source} has "
                        f"{model.num_classes}")


def _check_out(out: Path, resume: bool, rank: int) -> None:
    if out.exists() and not out.is_dir():
        raise UCGMError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{rank}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UCGMError(f"--out {out}: cannot write here ({err.strerror or err})") from None
    if not resume and ((out / CHECKPOINTS).exists() or (out / METRICS_NAME).exists()):
        raise UCGMError(f"--out {out}: already holds a tuning run; pass --resume to continue it, or choose "
                        "another --out")


def batch_layout(global_batch: int, batch_size: int | None, world: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps); UCGMError unless they divide exactly."""
    if batch_size is None:
        if global_batch % world:
            raise UCGMError(f"--global-batch {global_batch} is not divisible by {world} processes; "
                            f"pick a multiple of {world}")
        batch_size = global_batch // world
    if global_batch % (batch_size * world):
        raise UCGMError(f"--global-batch {global_batch} is not divisible by --batch-size {batch_size} x {world} "
                        f"process(es) = {batch_size * world}; the per-process batch must divide "
                        f"{global_batch / world:g} (global batch / processes) exactly")
    return batch_size, global_batch // (batch_size * world)


def _trainable_names(model: GenerativeModel) -> set[str] | None:
    """Names of the parameters the architecture trains (loading freezes every parameter)."""
    from .nets import build_network

    try:
        with torch.device("meta"):
            fresh = build_network(model.cfg.arch, **model.cfg.arch_kwargs)
    except Exception:  # noqa: BLE001 - an exotic network that cannot be built on meta: train all
        return None
    return {name for name, p in fresh.named_parameters() if p.requires_grad}


def _checkpoint_blocks(net: nn.Module) -> int:
    """Run every block of net.blocks under activation checkpointing (state-dict keys unchanged)."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UCGMError(f"--grad-checkpointing: the {type(net).__name__} network has no .blocks to checkpoint")
    for block in blocks:
        plain = block.forward

        def forward(self: nn.Module, *args: Any, _plain: Callable[..., Any] = plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = types.MethodType(forward, block)
    return len(blocks)


def _fsdp_shard(net: nn.Module, ctx: distributed.Context) -> None:
    """FSDP2: shard each block of net.blocks (when present), then the rest of the net."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _fsdp_gather_model(net: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict of a sharded net on CPU on rank 0 ({} elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_full_options())


def _fsdp_gather_optimizer(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0 ({} elsewhere), in optimizer.state_dict()'s format
    (parameters numbered in param-group order, like a DDP or one-process run); collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(net, optimizer, options=_full_options())
    if not by_name:
        return {}
    ids: dict[str, int] = {}
    groups = [{**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]}
              for g in by_name["param_groups"]]
    return {"state": {ids[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def _fsdp_shard_optimizer_state(full: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """A full optimizer.state_dict() cut to this process's shards of the (DTensor) params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard(value: Any, p: nn.Parameter) -> Any:
        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
            # every process holds the full value: each keeps its own shard, no communication
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return value

    state = {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The RNG seed of micro-batch `chunk` of step `step` (0-based): t, z and any dropout."""
    state = np.random.SeedSequence([int(seed), int(step), int(chunk), 0x0CC7]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _step_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (folder renamed into place, train_state.pt inside), oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_NAME).is_file() and (entry / WEIGHTS_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder of the run in `out`, or None."""
    dirs = _step_dirs(Path(out))
    return dirs[-1][1] if dirs else None


def _write_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_file_atomic(path, buffer.getvalue())


def _point_last(out: Path, target: Path) -> None:
    link = out / LAST
    tmp = out / f".{LAST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, out), tmp)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some filesystems): a text file naming the folder
        tmp.unlink(missing_ok=True)
        write_file_atomic(link, (os.path.relpath(target, out) + "\n").encode())


def _copy_final(out: Path, ckpt: Path) -> None:
    """Copy the EMA model of `ckpt` into OUT (file by file, config.json last)."""
    for name in (WEIGHTS_NAME, VAE_WEIGHTS_NAME, RECIPE_NAME, CARD_NAME, CONFIG_NAME):
        src = ckpt / name
        if not src.is_file():
            continue
        tmp = out / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / name)


def _model_card(recipe: Recipe, config: TuneConfig, model: GenerativeModel, source: str, step: int) -> str:
    tuning = recipe.tuning
    assert tuning is not None and recipe.few_step_sampling is not None
    few = recipe.few_step_sampling
    rows = "\n".join(f"| {k} | {v} |" for k, v in tuning.to_dict().items())
    return f"""---
library_name: ucgm-convert
tags:
- ucgm
- ucgm-t
- few-step
- {model.family}
pipeline_tag: unconditional-image-generation
---

# {recipe.model} tuned with UCGM-T ({few.steps}-step)

Few-step generator made by `ucgm tune --from {recipe.name}` from `{source}`: {step} steps of
UCGM-T at global batch {tuning.global_batch}; these are the EMA weights (decay {tuning.ema_decay}).
Sample it with `ucgm sample --checkpoint <this folder>` (the defaults in config.json are the
recipe's few-step settings: {few.steps} steps, stochasticity {few.stochasticity}, gaps {list(few.gaps)}).

## Tuning settings

| setting | value |
|---|---|
{rows}
| data | {config.data} |
| seed | {config.seed} |
"""


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Live objects of a run (internal)."""

    config: TuneConfig
    ctx: distributed.Context
    recipe: Recipe
    tuning: TuningSettings
    few_step: SamplingSettings
    source: str
    model_desc: str
    data: Any
    micro: int
    accum: int
    out: Path
    vae_module: nn.Module | None = None
    grids: bool = True
    elapsed_before: float = 0.0


def _preflight(config: TuneConfig, ctx: distributed.Context) -> tuple[_Run, GenerativeModel]:
    """Every input check, before any training."""
    recipe = effective_recipe(config)
    tuning, few_step = recipe.tuning, recipe.few_step_sampling
    assert tuning is not None and few_step is not None
    micro, accum = batch_layout(tuning.global_batch, config.batch_size, ctx.world_size)
    source = config.checkpoint or recipe.checkpoint
    if source is None:
        raise UCGMError(f"recipe {recipe.name!r} has no default checkpoint: pass --checkpoint FILE")
    data_name = config.data if config.data is not None else (DEMO if recipe.name == DEMO else None)
    if data_name is None:
        raise UCGMError("--data: pass a prepared latent folder (made by `ucgm prepare-data`); only --from demo "
                        "defaults to --data demo")
    out = Path(config.out)
    _check_out(out, config.resume, ctx.rank)
    data = open_dataset(data_name, config.demo_size)
    model = load(source, family=config.family, device=ctx.device, dtype=torch.float32, **recipe.load_overrides())
    check_family(recipe, model, source)
    check_against_model(data, model.latent_shape, model.num_classes, check_spec(model.cfg.vae))
    if config.grad_checkpointing and not isinstance(getattr(model.net, "blocks", None), (nn.ModuleList, nn.Sequential)):
        raise UCGMError(f"--grad-checkpointing: the {type(model.net).__name__} network has no .blocks to checkpoint")
    config = dataclasses.replace(config, data=data_name, checkpoint=source)
    run = _Run(config=config, ctx=ctx, recipe=recipe, tuning=tuning, few_step=few_step, source=source,
               model_desc=f"{model.family} ({model.cfg.arch}, {model.transport.name}, "
                          f"{sum(p.numel() for p in model.net.parameters()) / 1e6:.2f}M parameters)",
               data=data, micro=micro, accum=accum, out=out)
    if ctx.is_main and config.sample_every > 0 and check_spec(model.cfg.vae)["name"] != "identity":
        try:
            run.vae_module = load_model_vae(model, path=config.vae)
        except UCGMError as err:
            run.grids = False
            console.print(f"[yellow]warning:[/] no sample grids: {err}", highlight=False)
    return run, model


def _fingerprint(run: _Run) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    tuning = run.tuning.to_dict()
    tuning.pop("steps")
    return {"recipe_tuning": tuning, "seed": run.config.seed, "data": _canonical(run.config.data),
            "demo_size": run.config.demo_size if run.config.data == DEMO else None,
            "source": _canonical(run.source), "chunk": run.micro}


def _canonical(source: str | None) -> str | None:
    """An existing local path as an absolute path (so ./x and /abs/x compare equal), else as given."""
    if source is None or source == DEMO or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def _all_ok(ctx: distributed.Context, error: BaseException | None) -> None:
    """Across processes: if any process failed its checks, every process stops."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=ctx.device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise UCGMError("another process failed its input checks (its message is above)")


def _forward_fn(module: Callable[..., Tensor], device: torch.device, dtype: str) -> Callable[..., Tensor]:
    if DTYPES[dtype] == torch.float32:
        return module

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=DTYPES[dtype]):
            return module(x, t, y).float()

    return fn


@torch.no_grad()
def _ema_update(ema: nn.Module, student: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), student.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)


@torch.no_grad()
def _ema_update_full(ema: GenerativeModel, full: dict[str, Tensor], decay: float) -> None:
    """_ema_update from the gathered full state dict of the student's net (FSDP)."""
    for name, p_ema in ema.net.named_parameters():
        p_ema.lerp_(full[name].to(p_ema.device), 1.0 - decay)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines after `step` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_file_atomic(path, "".join(k + "\n" for k in kept).encode())


def _grid(run: _Run, ema: GenerativeModel, step: int) -> None:
    """OUT/samples/step-XXXXXX.png: few-step samples of the EMA model from fixed noise."""
    if not run.grids:
        return
    n = run.config.num_samples
    labels = balanced_labels(n, list(range(ema.num_classes)))
    indices = range(n)
    if run.vae_module is None:
        _, images = generate_batch(ema, run.few_step, labels, indices, run.config.seed)
    else:
        generators = sample_generators(run.config.seed, indices)
        noise = initial_noise(generators, ema.latent_shape).to(ema.device)
        y = torch.as_tensor(labels, device=ema.device)
        with torch.no_grad():
            latents = sample(model_fn(ema, run.few_step), noise, transport=ema.transport, generator=generators, y=y,
                             **run.few_step.as_sample_kwargs())
            images = to_uint8(decode(latents, ema.cfg.vae, run.vae_module).cpu())
    save_grid(run.out / SAMPLES / f"step-{step:06d}.png", images.numpy())


def _summary(run: _Run, start_step: int) -> Table:
    t = run.tuning
    table = Table(title=f"UCGM-T tuning (recipe {run.recipe.name}; flags override)", show_header=False)
    rows = {
        "model": f"{run.source}: {run.model_desc}",
        "data": f"{run.data.description}",
        "steps": f"{t.steps} (from step {start_step}); {epochs_seen(run.data.num_samples, t.global_batch, t.steps):.3g} epochs",
        "batch": f"global {t.global_batch} = {run.micro} per process x {run.ctx.world_size} process(es) x "
                 f"{run.accum} accumulation step(s)"
                 f"{(' (FSDP)' if run.config.fsdp else ' (DDP)') if run.ctx.distributed else ''}",
        "optimizer": f"{t.optimizer}, lr {t.lr:g}, betas {list(t.betas)}, weight decay {t.weight_decay:g}, "
                     f"grad clip {t.grad_clip:g}",
        "objective": f"consistency {t.consistency:g}, enhanced {t.enhanced:g} on {list(t.enhanced_range)}, "
                     f"huber eps {t.huber_eps:g}, label drop {t.label_drop:g}, time dist {list(t.time_dist)}, "
                     f"weighting {t.weighting}, teacher {t.teacher}",
        "EMA decay": f"{t.ema_decay:g}",
        "precision": f"{run.config.dtype}{' + activation checkpointing' if run.config.grad_checkpointing else ''} "
                     f"on {run.ctx.device}",
        "few-step sampler": f"{run.few_step.steps} steps, stochasticity {run.few_step.stochasticity}, gaps "
                            f"{list(run.few_step.gaps)}",
        "output": f"{run.out} (checkpoints every {run.config.save_every or t.steps} steps, grids every "
                  f"{run.config.sample_every or 'never'})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


@contextlib.contextmanager
def _progress(run: _Run, start: int, total: int) -> Iterator[Callable[..., None]]:
    if not (run.ctx.is_main and run.config.progress):
        yield lambda **_: None
        return
    columns = (TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("tune", total=total, completed=start, loss="-", rate="")
        t0, s0 = time.perf_counter(), start

        def update(step: int, loss: float) -> None:
            rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.2f} it/s")

        yield update


def tune(config: TuneConfig) -> Path:
    """Run UCGM-T tuning; returns OUT, a checkpoint folder in our format (EMA weights).

    Launched by torchrun, every process runs this and they train one model with DDP (or FSDP2
    with `config.fsdp`; with one process `fsdp` is a no-op and a note says so); only rank 0
    writes files. Bad input raises one UCGMError before training; a non-finite loss
    raises TuneDiverged naming the step, with the last good checkpoint kept. Bit-exact resume
    needs the same torch build and CPU thread count (`threads`) as the interrupted run.
    """
    was_initialized = dist.is_available() and dist.is_initialized()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ctx = distributed.setup(config.device)
    try:
        return _tune(config, ctx)
    finally:
        torch.set_num_threads(threads)
        if not was_initialized:
            distributed.teardown(ctx)


def _tune(config: TuneConfig, ctx: distributed.Context) -> Path:
    error: BaseException | None = None
    run = model = None
    try:
        run, model = _preflight(config, ctx)
    except UCGMError as err:
        error = err
    _all_ok(ctx, error)
    assert run is not None and model is not None
    config, tuning, out = run.config, run.tuning, run.out
    device = ctx.device

    # Teacher and EMA: copies of the pretrained model, made before the student is patched.
    trainable = _trainable_names(model)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if tuning.teacher == "frozen" else None
    if teacher is not None:
        teacher.vae_state = None  # the EMA copy keeps the VAE weights stored with the model
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema.cfg = dataclasses.replace(model.cfg, sampling=run.few_step.to_dict(), recipe=run.recipe.name)
    student = model.train()
    for name, p in student.net.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    params = [p for p in student.parameters() if p.requires_grad]
    if config.grad_checkpointing:
        _checkpoint_blocks(student.net)
    optimizer = getattr(torch.optim, tuning.optimizer)(params, **tuning.optimizer_kwargs())
    objective = UCGMObjective(**run.recipe.objective_kwargs())

    # Resume.
    start = 0
    fingerprint = _fingerprint(run)
    ckpt_root = out / CHECKPOINTS
    metrics_path = out / METRICS_NAME
    latest = latest_checkpoint(out) if config.resume else None
    if config.resume and latest is None and ctx.is_main:
        console.print(f"--resume: no checkpoint in {out}; starting from step 0", highlight=False)
    if latest is not None:
        state = torch.load(latest / STATE_NAME, map_location="cpu", weights_only=True)
        changed = [f"{k}: the run used {state['fingerprint'].get(k)!r}, now {v!r}"
                   for k, v in fingerprint.items() if state["fingerprint"].get(k) != v]
        if changed:
            raise UCGMError(f"--resume {out}: settings differ from the interrupted run ({'; '.join(changed)}); "
                            "resume with the same settings or choose another --out")
        start = int(state["step"])
        if start > tuning.steps:
            raise UCGMError(f"--resume: the run is already at step {start}, past --steps {tuning.steps}")
        student.net.load_state_dict(state["student"])
        load_state_dict_strict(ema.net, read_safetensors(latest / WEIGHTS_NAME), str(latest / WEIGHTS_NAME))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            with contextlib.suppress(RuntimeError, IndexError):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        run.elapsed_before = float(state.get("elapsed", 0.0))
    last_good: Path | None = latest

    fsdp = config.fsdp and ctx.distributed
    if config.fsdp and not ctx.distributed:
        console.print("[yellow]note:[/] --fsdp: only one process, nothing to shard; training unsharded "
                      "(launch with --nproc N or torchrun to shard)", highlight=False)
    ddp: nn.Module = student
    if fsdp:
        # Shard the student (and the frozen teacher), then rebuild the optimizer over the sharded
        # parameters; a resumed optimizer state (full, loaded above) is cut to this process's shards.
        full_optimizer = optimizer.state_dict()
        _fsdp_shard(student.net, ctx)
        if teacher is not None:
            _fsdp_shard(teacher.net, ctx)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = getattr(torch.optim, tuning.optimizer)(params, **tuning.optimizer_kwargs())
        if full_optimizer["state"]:
            optimizer.load_state_dict(_fsdp_shard_optimizer_state(full_optimizer, params))
        del full_optimizer
    elif ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(student, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    grad_forward = _forward_fn(ddp, device, config.dtype)
    plain_forward = _forward_fn(student, device, config.dtype)

    def online(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        # The objective's extra (no-grad) forwards bypass DDP: no gradient, nothing to sync.
        return grad_forward(x, t, y) if torch.is_grad_enabled() else plain_forward(x, t, y)

    teacher_fn = _forward_fn(teacher, device, config.dtype) if teacher is not None else None

    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for entry in ckpt_root.iterdir():  # leftovers of a checkpoint cut by a kill
            if entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
        if start > 0:
            _truncate_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
        console.print(_summary(run, start))
        if start == 0 and config.sample_every > 0:
            _grid(run, ema, 0)
    recipe_yaml = run.recipe.to_yaml()
    card = _model_card(run.recipe, config, ema, run.source, tuning.steps)

    def save(step: int, elapsed: float, gathered: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> Path:
        """Write a checkpoint (rank 0); under FSDP `gathered` is the full (student, optimizer) state."""
        assert gathered is not None or not fsdp, "FSDP checkpoints need the gathered full state"
        name = f"step-{step:06d}"
        staging = ckpt_root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(ema, staging, recipe_yaml=recipe_yaml, card=card)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        _write_torch(staging / STATE_NAME, {
            "format": STATE_FORMAT,
            "step": step,
            "student": gathered[0] if gathered is not None else
            {k: v.detach().cpu() for k, v in student.net.state_dict().items()},
            "optimizer": gathered[1] if gathered is not None else optimizer.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng},
            "sampler": {"seed": config.seed, "step": step, "samples_seen": step * tuning.global_batch},
            "elapsed": elapsed,
            "fingerprint": fingerprint,
            "recipe": run.recipe.to_dict(),
            "tune_config": config.to_dict(),
            "world_size": ctx.world_size,
        })
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _point_last(out, final)
        if config.keep_checkpoints:
            for _, old in _step_dirs(out)[:-config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    # Training.
    chunks_total = ctx.world_size * run.accum
    my_chunks = range(ctx.rank * run.accum, (ctx.rank + 1) * run.accum)
    data_shape = tuple(model.latent_shape)
    t_start = time.perf_counter()
    metrics_file = open(metrics_path, "a", buffering=1) if ctx.is_main else None  # noqa: SIM115
    try:
        with _progress(run, start, tuning.steps) as report:
            for step in range(start, tuning.steps):
                indices = batch_indices(run.data.num_samples, tuning.global_batch, config.seed, step)
                chunks = indices.view(chunks_total, run.micro)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                for m, c in enumerate(my_chunks):
                    x, y = run.data.get(chunks[c])
                    torch.manual_seed(chunk_seed(config.seed, step, c))
                    t = objective.sample_t(run.micro)
                    z = torch.randn((run.micro, *data_shape))
                    x, y, t, z = x.to(device), y.to(device), t.to(device), z.to(device)
                    if fsdp:  # reduce-scatter the gradients after the last micro-batch only
                        student.net.set_requires_gradient_sync(m == run.accum - 1)
                        sync = contextlib.nullcontext()
                    else:
                        last = m == run.accum - 1
                        sync = contextlib.nullcontext() if (last or not ctx.distributed) else ddp.no_sync()
                    with sync:
                        loss = objective(online, x, y, teacher=teacher_fn, t=t, z=z)
                        (loss / run.accum).backward()
                    loss_sum += loss.detach().double()
                if ctx.distributed:
                    dist.all_reduce(loss_sum)
                loss_value = float(loss_sum) / chunks_total
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tuning.grad_clip)
                if fsdp and hasattr(grad_norm, "full_tensor"):  # a DTensor: the norm over all shards
                    grad_norm = grad_norm.full_tensor()
                if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                    what = f"loss is {loss_value}" if not math.isfinite(loss_value) else \
                        f"gradient norm is {float(grad_norm)} (loss {loss_value:.4g})"
                    kept = (f"the last good checkpoint is {last_good} (step {int(last_good.name[5:])})"
                            if last_good is not None else "no checkpoint had been saved yet")
                    raise TuneDiverged(
                        f"step {step + 1}: the {what}, not finite; stopped without updating the weights; {kept}. "
                        "Check the data for NaN/inf or lower --lr, then rerun (with --resume to continue)")
                optimizer.step()
                full_student = None
                if fsdp:  # gather the full student (collective); rank 0 updates the full EMA
                    full_student = _fsdp_gather_model(student.net)
                    if ctx.is_main:
                        _ema_update_full(ema, full_student, tuning.ema_decay)
                else:
                    _ema_update(ema, student, tuning.ema_decay)
                done = step + 1
                elapsed = run.elapsed_before + time.perf_counter() - t_start
                if metrics_file is not None:
                    lr = optimizer.param_groups[0]["lr"]
                    metrics_file.write(json.dumps({"step": done, "loss": loss_value, "lr": lr,
                                                   "grad_norm": float(grad_norm), "time": round(elapsed, 3)}) + "\n")
                report(step=done, loss=loss_value)
                is_last = done == tuning.steps
                gathered = None
                if full_student is not None and (is_last or (config.save_every and done % config.save_every == 0)):
                    gathered = (full_student, _fsdp_gather_optimizer(student.net, optimizer))  # collective
                if ctx.is_main:
                    if is_last or (config.save_every and done % config.save_every == 0):
                        last_good = save(done, elapsed, gathered)
                    if config.sample_every and (done % config.sample_every == 0 or is_last):
                        _grid(run, ema, done)
                elif is_last or (config.save_every and done % config.save_every == 0):
                    last_good = ckpt_root / f"step-{done:06d}"
    finally:
        if metrics_file is not None:
            metrics_file.close()
    if ctx.is_main:
        final = latest_checkpoint(out)
        if final is None or int(final.name[5:]) != tuning.steps:
            final = save(tuning.steps, run.elapsed_before + time.perf_counter() - t_start)
        _copy_final(out, final)
        console.print(f"tuned model ({run.few_step.steps}-step sampler by default): {out}", highlight=False)
    distributed.barrier(ctx)
    return out
