"""What a tuning run needs (`TuneConfig`), and the checks that relate it to the recipe, model and machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from ...errors import UCGMError
from ...model import GenerativeModel
from ...recipe import Recipe
from ...settings import SettingsError
from ...settings.base import Bool, Hint, Int, Settings, choice
from ..source import ArchOverrides, ModelSource, TuningOverrides
from .data import DEMO_SIZE

TRAIN_DTYPES = ("auto", "float32", "bfloat16")
_FLOAT16 = Hint(lambda v: v == "float16", "float16 would need loss scaling; use bfloat16")


class TuneConfig(Settings):
    """Everything `ucgm tune` needs; see `ucgm tune --help`. `tuning` overrides the recipe's tuning section."""

    out: Path = Field(description="Output folder: the tuned model (EMA weights, our format), checkpoints/, "
                      "metrics.jsonl, samples/.")
    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    tuning: TuningOverrides = TuningOverrides()  # type: ignore[valid-type]
    data: str | None = Field(default=None, description="Prepared latent folder (from `ucgm prepare-data`) or 'demo' "
                             "(the demo shapes). Default: demo for the demo model, else required.")
    batch_size: Int | None = Field(default=None, ge=1, le=65_536, description="Samples per forward pass per process; "
                                   "smaller than global-batch / processes means gradient accumulation. Default: "
                                   "global-batch / processes.")
    dtype: Annotated[choice(*TRAIN_DTYPES), _FLOAT16] = Field(  # type: ignore[valid-type]
        default="auto", description="Training precision: float32, or bfloat16 autocast (weights and optimizer "
                                    "stay float32). auto: bfloat16 on CUDA (the reference tunes under bf16 autocast), "
                                    "float32 on CPU.")
    grad_checkpointing: Bool = Field(default=False, description="Recompute each transformer block in backward (less "
                                     "memory).")
    max_skipped: Int = Field(default=10, ge=1, le=1_000_000, description="Steps with a non-finite gradient are "
                             "skipped (no update) and counted; this many in a row stop the run.")
    save_every: Int = Field(default=100, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: Int = Field(default=2, ge=0, description="Checkpoints kept (newest; 0 = all).")
    sample_every: Int = Field(default=100, ge=0, description="PNG grid of few-step samples from fixed noise every N "
                              "steps (0 = never).")
    num_samples: Int = Field(default=16, ge=1, le=1024, description="Images in each sample grid.")
    seed: Int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the data order and of every random draw.")
    resume: Bool = Field(default=False, description="Continue the run in --out from its newest intact checkpoint "
                         "(exactly: same batches and random draws).")
    overwrite: Bool = Field(default=False, description="Replace a previous run in --out (its checkpoints, metrics "
                            "and model) instead of continuing it.")
    device: str | None = Field(default=None, description="Torch device. Default: cuda (this process's GPU) if "
                               "available, else cpu.")
    demo_size: Int = Field(default=DEMO_SIZE, ge=1, le=10_000_000, description="Images in --data demo "
                           "(make_shapes, seed 0).")
    threads: Int | None = Field(default=None, ge=1, le=1024, description="CPU threads of torch per process "
                                "(default: torch's choice; 1 is fastest on a busy CPU).")
    fsdp: Bool = Field(default=False, description="With several processes: shard the student (weights, gradients, "
                       "optimizer state) and the frozen teacher with FSDP2 instead of DDP; the EMA and checkpoints "
                       "stay full weights. With one process: a no-op (a note says so).")

    def model_post_init(self, context: object) -> None:
        if str(self.out).strip() in ("", "."):
            raise SettingsError(("out",), "expected an output folder of its own (not '' or '.')")


def train_dtype(dtype: str, device_type: str) -> str:
    """The training precision `dtype` ("auto" resolved: bfloat16 on CUDA as the reference, else float32)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def effective_recipe(recipe: Recipe, overrides: Settings) -> Recipe:
    """The recipe with the tuning flags applied; UCGMError naming the flag."""
    if recipe.tuning is None:
        raise UCGMError(f"recipe {recipe.name!r} has no tuning section; UCGM-T needs one (see `ucgm recipes show`)")
    if recipe.few_step_sampling is None:
        raise UCGMError(f"recipe {recipe.name!r} has no few_step_sampling section (the tuned model's sampler)")
    return recipe.replace(tuning=recipe.tuning.replace(**overrides.given()))  # type: ignore[attr-defined]


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
