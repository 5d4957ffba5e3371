"""`ucgm tune`: UCGM-T few-step tuning of a loaded model (single process, torchrun or --nproc N)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..distributed import launched_by_torchrun, relaunch_with_torchrun
from ..errors import UCGMError
from ..latent_data import DEMO_SIZE
from .common import fail

RECIPE_VALUE = "Default: the recipe's tuning value."


def tune_command(
    recipe: str = typer.Option("demo", "--from", help="Recipe name (see `ucgm recipes list`) or path to a .yaml; "
                               "its tuning and few_step_sampling sections are used."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Model to tune: checkpoint file, folder or "
                                             "Hub repo id. Default: the recipe's (demo: the embedded model)."),
    data: Optional[str] = typer.Option(None, "--data", help="Prepared latent folder (meta.json + shard-*.safetensors, "
                                       "from `ucgm prepare-data`) or 'demo' (the demo shapes). Default: demo for "
                                       "--from demo, else required."),
    out: Path = typer.Option(..., "--out", help="Output folder: the tuned model (EMA weights, our format), "
                             "checkpoints/, metrics.jsonl, samples/."),
    family: Optional[str] = typer.Option(None, "--family", help="Source family of --checkpoint; detected when omitted."),
    steps: Optional[int] = typer.Option(None, help=f"Optimizer steps. {RECIPE_VALUE}"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help=f"Samples per optimizer step over all "
                                               f"processes. {RECIPE_VALUE}"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per forward pass per process; "
                                             "smaller than global-batch / processes means gradient accumulation. "
                                             "Default: global-batch / processes."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Learning rate. {RECIPE_VALUE}"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"RAdam, Adam or AdamW. {RECIPE_VALUE}"),
    betas: Optional[str] = typer.Option(None, "--betas", help=f"'b1,b2' of the optimizer. {RECIPE_VALUE}"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=f"Weight decay. {RECIPE_VALUE}"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help=f"Max gradient norm (clipping). {RECIPE_VALUE}"),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help=f"EMA decay per step of the saved weights, "
                                              f"in [0, 1]. {RECIPE_VALUE}"),
    consistency: Optional[float] = typer.Option(None, "--consistency", help=f"Consistency ratio in [0, 1] (1 = "
                                                f"central differences). {RECIPE_VALUE}"),
    enhanced: Optional[float] = typer.Option(None, "--enhanced", help=f"Enhanced-target ratio (>= 0). {RECIPE_VALUE}"),
    enhanced_range: Optional[str] = typer.Option(None, "--enhanced-range", help=f"'lo,hi' times where targets are "
                                                 f"enhanced. {RECIPE_VALUE}"),
    huber_eps: Optional[float] = typer.Option(None, "--huber-eps", help=f"Pseudo-Huber c (>= 0; 0 = L2). {RECIPE_VALUE}"),
    label_drop: Optional[float] = typer.Option(None, "--label-drop", help=f"Fraction of each micro-batch's labels "
                                               f"dropped to the null class. {RECIPE_VALUE}"),
    time_dist: Optional[str] = typer.Option(None, "--time-dist", help=f"'a,b,scale': t ~ Beta(a, b) x scale. "
                                            f"{RECIPE_VALUE}"),
    weighting: Optional[str] = typer.Option(None, "--weighting", help=f"Loss weighting: Cosine or none. {RECIPE_VALUE}"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=f"frozen (copy of the initial model) or online "
                                          f"(the student). {RECIPE_VALUE}"),
    dtype: str = typer.Option("float32", help="Training precision: float32, or bfloat16 (autocast; weights and "
                              "optimizer stay float32)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute each transformer block in backward (less memory)."),
    save_every: int = typer.Option(100, "--save-every", min=0, help="Checkpoint every N steps (steps; 0 = only at "
                                   "the end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=0, help="Checkpoints kept (newest; 0 = all)."),
    sample_every: int = typer.Option(100, "--sample-every", min=0, help="PNG grid of few-step samples from fixed "
                                     "noise every N steps (steps; 0 = never)."),
    num_samples: int = typer.Option(16, "--num-samples", min=1, help="Images in each sample grid."),
    seed: int = typer.Option(0, min=0, help="Seed of the data order and of every random draw."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint "
                                "(exactly: same batches and random draws)."),
    device: Optional[str] = typer.Option(None, help="Torch device. Default: cuda (this process's GPU) if available, "
                                         "else cpu."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE weights (file, folder, Hub id) to decode sample grids; "
                                      "default: the model's own."),
    demo_size: int = typer.Option(DEMO_SIZE, "--demo-size", min=1, help="Images in --data demo (make_shapes, seed 0)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads of torch per process "
                                          "(default: torch's choice; 1 is fastest on a busy CPU)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) on this machine: relaunches under torchrun "
                              "(DDP, or FSDP with --fsdp). Ignored when already started by torchrun."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With several processes (--nproc N or torchrun): shard the "
                              "student (weights, gradients, optimizer state) and the frozen teacher with FSDP2 "
                              "instead of DDP, for models whose training state does not fit on one device. The "
                              "EMA and the checkpoints stay full weights (gathered on rank 0; resumable with or "
                              "without --fsdp). With one process: a no-op (a note says so)."),
) -> None:
    """Tune a model into a few-step generator with UCGM-T; OUT becomes a checkpoint folder that
    `ucgm sample --checkpoint OUT` samples with the recipe's few-step settings."""
    if nproc > 1 and not launched_by_torchrun():
        raise typer.Exit(relaunch_with_torchrun(nproc))
    from ..tuner import TuneConfig, tune

    try:
        config = TuneConfig(
            out=out, recipe=recipe, checkpoint=checkpoint, family=family, data=data, steps=steps,
            global_batch=global_batch, lr=lr, optimizer=optimizer, betas=betas, weight_decay=weight_decay,
            grad_clip=grad_clip, ema_decay=ema_decay, consistency=consistency, enhanced=enhanced,
            enhanced_range=enhanced_range, huber_eps=huber_eps, label_drop=label_drop, time_dist=time_dist,
            weighting=weighting, teacher=teacher, batch_size=batch_size, dtype=dtype,
            grad_checkpointing=grad_checkpointing, save_every=save_every, keep_checkpoints=keep_checkpoints,
            sample_every=sample_every, num_samples=num_samples, seed=seed, resume=resume, device=device, vae=vae,
            demo_size=demo_size, threads=threads, fsdp=fsdp,
        )
        tune(config)
    except UCGMError as err:
        if os.environ.get("RANK", "0") != "0":  # rank 0 prints the message
            raise typer.Exit(2) from None
        fail(str(err))
