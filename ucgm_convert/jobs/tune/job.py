"""UCGM-T few-step tuning as a library: `run(TuneConfig) -> TuneResult` (what `ucgm tune` runs).

The student starts from the loaded model (`uc.load`), the teacher is a frozen copy of it
(recipe `teacher: frozen`, the reference's ema_decay_rate 1.0) or the student itself (`online`),
and the loss is `uc.UCGMObjective` with the recipe's tuning settings. OUT is, at the end, a
checkpoint in our format holding the EMA of the student, with the recipe's few_step_sampling
settings as its config.json `sampling` defaults (folder layout: jobs/tune/checkpoints.py).

Exactness: the data order is `data.batch_indices(seed, step)`, every random draw of micro-batch c
of step s (t, z, any dropout layer) comes from the global RNG seeded with `chunk_seed(seed, s, c)`,
and train-mode label dropout (LightningDiT) uses per-sample uniforms `data.label_draws(seed, s)`
(one row for the student and its replayed forwards, one for the teacher, as the reference's
train-mode teacher draws its own mask). The null-class rows are `data.chunk_drops`: rounded per
`label_drop_group` rows of the global batch, so accumulation does not change them. So a run
killed and resumed repeats the uninterrupted run bit for bit on the same machine, and a run on N
processes matches the run on one: global batch B is cut into B / batch_size micro-batches
("chunks"); process r takes chunks r*A .. r*A+A-1 (A = accumulation steps) and the gradient is
the mean over all chunks.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ... import distributed
from ...console import SILENT, Reporter
from ...errors import UCGMError
from ...formats.statedict import load_state_dict_strict
from ...foundation import looks_like_hub_id, output_folder, resolve_device
from ...generation import balanced_labels, generate_batch
from ...hub.card import CardInfo, make_model_card
from ...images import save_grid
from ...model import GenerativeModel
from ...nets import build_network
from ...objective import UCGMObjective
from ...recipe import Recipe
from ...settings import SamplingSettings, TuningSettings
from ..source import resolve
from . import checkpoints as ckpt
from .config import TuneConfig, batch_layout, check_family, effective_recipe, train_dtype
from .data import DEMO, Dataset, check_against_model, epochs_seen, open_dataset
from .parallel import Parallel, all_ok, blocks_of, checkpoint_blocks
from .trainer import Trainer, TuneDiverged

__all__ = ["TuneDiverged", "TuneResult", "run"]


@dataclass
class TuneResult:
    """Where the tuned model is and how the run ended."""

    out: Path
    steps: int
    last_loss: float | None
    skipped_steps: int


@dataclass
class _Run:
    """What the checks resolved, before training (internal)."""

    config: TuneConfig
    ctx: distributed.Context
    recipe: Recipe
    tuning: TuningSettings
    few_step: SamplingSettings
    source: str
    model: GenerativeModel
    data: Dataset
    micro: int
    accum: int
    vae_module: torch.nn.Module | None
    auto_dtype: bool = False


def run(config: TuneConfig, reporter: Reporter = SILENT) -> TuneResult:
    """Run UCGM-T tuning; OUT becomes a checkpoint folder in our format (EMA weights).

    Launched by torchrun, every process runs this and they train one model with DDP (or FSDP2
    with `config.fsdp`); only rank 0 writes files. Bad input raises one UCGMError before
    training; a non-finite loss raises TuneDiverged naming the step, the last good checkpoint kept.
    Bit-exact resume needs the same torch build and CPU thread count (`threads`).
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with distributed.session(str(resolve_device(config.device))) as ctx:
            return _tune(config, ctx, reporter if ctx.is_main else SILENT)
    finally:
        torch.set_num_threads(threads)


def _preflight(config: TuneConfig, ctx: distributed.Context, reporter: Reporter) -> _Run:
    """Every input check, before any training."""
    if ctx.is_main:
        output_folder(config.out, ckpt.OWNED, "tuning run", overwrite=config.overwrite, resume=config.resume)
    resolved = resolve(config.source, config.arch, ctx.device)
    if resolved.recipe is None:
        raise UCGMError(f"{resolved.source}: names no recipe to tune with; pass --from RECIPE")
    recipe = effective_recipe(resolved.recipe, config.tuning)
    assert recipe.tuning is not None and recipe.few_step_sampling is not None
    micro, accum = batch_layout(recipe.tuning.global_batch, config.batch_size, ctx.world_size)
    model = resolved.model
    data_name = config.data if config.data is not None else (DEMO if recipe.name == DEMO else None)
    if data_name is None:
        raise UCGMError("--data: pass a prepared latent folder (made by `ucgm prepare-data`); only the demo model "
                        "defaults to --data demo")
    check_family(recipe, model, resolved.source)
    data = open_dataset(data_name, config.demo_size)
    check_against_model(data, model.latent_shape, model.num_classes, model.cfg.vae)
    if config.grad_checkpointing and blocks_of(model.net) is None:
        raise UCGMError(f"--grad-checkpointing: the {type(model.net).__name__} network has no .blocks to checkpoint")
    vae_module = None
    if ctx.is_main and config.sample_every > 0:
        try:
            vae_module = model.load_vae(config.source.vae)
        except UCGMError as err:
            reporter.note(f"no sample grids: {err}")
            config = config.replace(sample_every=0)
    auto_dtype = config.dtype == "auto"
    config = config.replace(data=data_name, dtype=train_dtype(config.dtype, ctx.device.type))
    return _Run(config, ctx, recipe, recipe.tuning, recipe.few_step_sampling, resolved.source, model, data, micro,
                accum, vae_module, auto_dtype)


def _trainable_names(model: GenerativeModel) -> set[str]:
    """Names of the parameters the architecture trains (loading freezes every parameter)."""
    with torch.device("meta"):
        fresh = build_network(model.cfg.arch, **model.cfg.arch_kwargs)
    return {name for name, p in fresh.named_parameters() if p.requires_grad}


def _base_model(run: _Run) -> str | None:
    """The Hub id of the model tuned: --checkpoint when it is one, else what its config records, else the
    published weights its recipe names."""
    if looks_like_hub_id(run.source):
        return run.source
    return run.model.cfg.base_model or run.recipe.base_model


def _models(run: _Run) -> tuple[GenerativeModel, GenerativeModel | None, GenerativeModel]:
    """(student, frozen teacher or None, EMA): copies made before the student is patched."""
    model = run.model
    trainable = _trainable_names(model)
    # In train mode, as the reference's teacher: train-mode label dropout with its own mask (nets/blocks.py).
    teacher = copy.deepcopy(model).train().requires_grad_(False) if run.tuning.teacher == "frozen" else None
    if teacher is not None:
        teacher.vae_state = None  # the EMA copy keeps the VAE weights stored with the model
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema.cfg = model.cfg.replace(sampling=run.few_step, recipe=run.recipe.name, base_model=_base_model(run))
    student = model.train()
    for name, p in student.net.named_parameters():
        p.requires_grad_(name in trainable)
    if run.config.grad_checkpointing:
        checkpoint_blocks(student.net)
    return student, teacher, ema


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


def _resume(run: _Run, student: GenerativeModel, ema: GenerativeModel, reporter: Reporter
            ) -> tuple[int, dict[str, Any] | None, float, int]:
    """(start step, optimizer state, elapsed seconds, skipped steps) of the newest intact checkpoint;
    (0, None, 0, 0) if none."""
    out = run.config.out
    found = ckpt.newest_intact(out, reporter) if run.config.resume else None
    if found is None:
        if run.config.resume:
            reporter.note(f"--resume: no checkpoint in {out}; starting from step 0")
        return 0, None, 0.0, 0
    folder, state, ema_state = found
    fingerprint = _fingerprint(run)
    changed = [f"{k}: the run used {state['fingerprint'].get(k)!r}, now {v!r}"
               for k, v in fingerprint.items() if state["fingerprint"].get(k) != v]
    if changed:
        raise UCGMError(f"--resume {out}: settings differ from the interrupted run ({'; '.join(changed)}); "
                        "resume with the same settings, or pass --overwrite to start over")
    start = int(state["step"])
    if start > run.tuning.steps:
        raise UCGMError(f"--resume: the run is already at step {start}, past --steps {run.tuning.steps}")
    student.net.load_state_dict(state["student"])
    load_state_dict_strict(ema.net, ema_state, str(folder))
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available() and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return start, state["optimizer"], float(state.get("elapsed", 0.0)), int(state.get("skipped_steps", 0))


def _grid(run: _Run, ema: GenerativeModel, step: int) -> None:
    """OUT/samples/step-XXXXXX.png: few-step samples of the EMA model from fixed noise."""
    n = run.config.num_samples
    labels = balanced_labels(n, list(range(ema.num_classes)))
    _, images = generate_batch(ema, run.few_step, labels, range(n), run.config.seed, vae_module=run.vae_module)
    save_grid(run.config.out / ckpt.SAMPLES / f"step-{step:06d}.png", images.numpy())


def _summary(run: _Run, parallel: Parallel, trainer: Trainer, start: int) -> dict[str, object]:
    t, c = run.tuning, run.config
    model = run.model
    return {
        "model": f"{run.source}: {model.family} ({model.cfg.arch}, {model.transport.name}, "
                 f"{model.num_parameters() / 1e6:.2f}M parameters)",
        "data": run.data.description,
        "steps": f"{t.steps} (from step {start}); {epochs_seen(run.data.num_samples, t.global_batch, t.steps):.3g} "
                 "epochs",
        "batch": f"global {t.global_batch} = {run.micro} per process x {run.ctx.world_size} process(es) x "
                 f"{run.accum} accumulation step(s) ({parallel.mode})",
        "optimizer": f"{t.optimizer}, lr {t.lr:g}, betas {list(t.betas)}, weight decay {t.weight_decay:g}, "
                     f"grad clip {t.grad_clip:g}",
        "objective": f"consistency {t.consistency:g}, enhanced {t.enhanced:g} ({t.enhanced_style}, frame {t.frame}) on "
                     f"{list(t.enhanced_range)}, huber eps {t.huber_eps:g}, label drop {t.label_drop:g} (rounded per "
                     f"{t.drop_group()} rows), time beta {list(t.time_beta)}, weighting {t.weighting}, teacher "
                     f"{t.teacher}",
        "forwards": f"per sample and step: 1 with gradient + {trainer.objective.no_grad_forwards} without",
        "EMA decay": f"{t.ema_decay:g}",
        "precision": f"{_precision(c.dtype, run.auto_dtype)}"
                     f"{' + activation checkpointing' if c.grad_checkpointing else ''} on {run.ctx.device}",
        "few-step sampler": f"{run.few_step.steps} steps, stochasticity {run.few_step.stochasticity}, gaps "
                            f"{list(run.few_step.gaps)}",
        "output": f"{c.out} (checkpoints every {c.save_every or t.steps} steps, grids every "
                  f"{c.sample_every or 'never'})",
    }


def _precision(dtype: str, auto: bool) -> str:
    """How the summary names the training precision (and, for --dtype auto, why)."""
    name = "bfloat16 autocast (float32 weights and optimizer)" if dtype == "bfloat16" else "float32"
    if not auto:
        return name
    return name + (" (auto: the reference tunes under bf16 autocast)" if dtype == "bfloat16" else
                   " (auto: float32 off CUDA)")


def _card(run: _Run, ema: GenerativeModel) -> str:
    recipe_yaml = run.recipe.to_yaml()
    info = CardInfo(ema.cfg, run.recipe.to_dict(), recipe_yaml, [], ema.num_parameters(), ema.vae_state is not None)
    return str(make_model_card(info))


def _tune(config: TuneConfig, ctx: distributed.Context, reporter: Reporter) -> TuneResult:
    error: BaseException | None = None
    run_: _Run | None = None
    try:
        run_ = _preflight(config, ctx, reporter)
    except UCGMError as err:
        error = err
    all_ok(ctx, error)
    assert run_ is not None
    out = run_.config.out
    if ctx.is_main and config.overwrite and not config.resume:
        ckpt.clear_run(out)
    student, teacher, ema = _models(run_)
    start, optimizer_state, elapsed, skipped = _resume(run_, student, ema, reporter)
    if config.fsdp and not ctx.distributed:
        reporter.note("--fsdp: only one process, nothing to shard; training unsharded (launch with --nproc N or "
                      "torchrun to shard)")
    tuning = run_.tuning
    parallel = Parallel(ctx, student, teacher,
                        lambda params: getattr(torch.optim, tuning.optimizer)(params, **tuning.optimizer_kwargs()),
                        optimizer_state, config.fsdp, run_.config.dtype)
    metrics = out / ckpt.METRICS_NAME
    if ctx.is_main:
        ckpt.clean_partials(out)
        if start > 0:
            ckpt.truncate_metrics(metrics, start)
        else:
            metrics.unlink(missing_ok=True)
    trainer = Trainer(run_.data, tuning, UCGMObjective(**run_.recipe.objective_kwargs()), parallel, ema,
                      run_.micro, run_.accum, config.seed, config.max_skipped)
    trainer.skipped = skipped
    if ctx.is_main:
        reporter.table(f"UCGM-T tuning (recipe {run_.recipe.name}; flags override)",
                       _summary(run_, parallel, trainer, start))
        if start == 0 and run_.config.sample_every > 0:
            _grid(run_, ema, 0)
    last = _train(run_, trainer, ema, start, elapsed, reporter)
    if ctx.is_main:
        final = ckpt.latest_checkpoint(out)
        if final is None or ckpt.step_of(final) != tuning.steps:
            final = _save(run_, trainer, ema, tuning.steps, elapsed)
        ckpt.copy_final(out, final)
        reporter.info(f"tuned model ({run_.few_step.steps}-step sampler by default): {out}; {trainer.skipped} "
                      "step(s) skipped for a non-finite gradient")
    distributed.barrier(ctx)
    return TuneResult(out, tuning.steps, last, trainer.skipped)


def _save(run: _Run, trainer: Trainer, ema: GenerativeModel, step: int, elapsed: float,
          gathered: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` on rank 0; under FSDP `gathered` is the full (student, optimizer) state."""
    student, optimizer = gathered if gathered is not None else trainer.local_state()
    state = {
        "student": student,
        "optimizer": optimizer,
        "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                else []},
        "sampler": {"seed": run.config.seed, "step": step, "samples_seen": step * run.tuning.global_batch},
        "elapsed": elapsed,
        "skipped_steps": trainer.skipped,
        "fingerprint": _fingerprint(run),
        "recipe": run.recipe.to_dict(),
        "tune_config": run.config.to_dict(),
        "world_size": run.ctx.world_size,
    }
    return ckpt.save(run.config.out, step, ema, state, run.recipe.to_yaml(), _card(run, ema),
                     run.config.keep_checkpoints)


def _train(run: _Run, trainer: Trainer, ema: GenerativeModel, start: int, elapsed: float,
           reporter: Reporter) -> float | None:
    """The training loop from step `start`: metrics, progress, checkpoints and grids; the last loss."""
    config, tuning, ctx = run.config, run.tuning, run.ctx
    t0 = time.perf_counter()
    last_good = ckpt.latest_checkpoint(config.out)
    loss = None
    metrics_file = open(config.out / ckpt.METRICS_NAME, "a", buffering=1) if ctx.is_main else None  # noqa: SIM115
    try:
        with reporter.progress("steps", "loss") as bar:
            task = bar.add_task("tune", total=tuning.steps, completed=start, loss="")
            for step in range(start, tuning.steps):
                try:
                    loss, grad_norm = trainer.step(step)
                except TuneDiverged as err:
                    kept = (f"the last good checkpoint is {last_good} (step {ckpt.step_of(last_good)})"
                            if last_good is not None else "no checkpoint had been saved yet")
                    raise TuneDiverged(f"{err}; {kept}. Check the data for NaN/inf or lower --lr, then rerun "
                                       "(with --resume to continue)") from None
                done = step + 1
                now = elapsed + time.perf_counter() - t0
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": done, "loss": loss, "lr": trainer.lr,
                                                   "grad_norm": grad_norm, "skipped": trainer.skipped,
                                                   "time": round(now, 3)}) + "\n")
                bar.update(task, completed=done, loss=f"loss {loss:.4f}")
                save_now = done == tuning.steps or (config.save_every and done % config.save_every == 0)
                gathered = trainer.gather() if save_now and trainer.parallel.fsdp else None  # collective
                if save_now and ctx.is_main:
                    last_good = _save(run, trainer, ema, done, now, gathered)
                elif save_now:
                    last_good = config.out / ckpt.CHECKPOINTS / f"step-{done:06d}"
                if ctx.is_main and config.sample_every and (done % config.sample_every == 0 or done == tuning.steps):
                    _grid(run, ema, done)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return loss
