"""UCGM-T tuning settings: optimizer, objective (`uc.UCGMObjective`) and schedule of `ucgm tune`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import annotated_types as at
from pydantic import BeforeValidator, Field

from ..objective import ENHANCED_STYLES, FRAMES
from .base import UNIT, Bool, Float, Int, Settings, checked, choice, floats

OPTIMIZERS = ("RAdam", "Adam", "AdamW")


class TuningSettings(Settings):
    """UCGM-T few-step tuning settings; field names are the `ucgm tune` flags (--lr, --huber-eps, ...)."""

    optimizer: choice(*OPTIMIZERS) = Field(default="RAdam", description="Optimizer: RAdam, Adam or AdamW.")  # type: ignore[valid-type]
    lr: Float = Field(default=1e-4, gt=0.0, description="Learning rate.")
    betas: floats(2, at.Ge(0.0), at.Lt(1.0)) = Field(  # type: ignore[valid-type]
        default=(0.9, 0.999), description="'b1,b2' of the optimizer.")
    weight_decay: Float = Field(default=0.0, ge=0.0, description="Weight decay.")
    grad_clip: Float = Field(default=0.1, gt=0.0, description="Max gradient norm (clipping).")
    consistency: Float = Field(default=1.0, ge=0.0, le=1.0,
                               description="Consistency ratio in [0, 1] (1 = central differences).")
    enhanced: Float = Field(ge=0.0, description="Enhanced-target ratio (>= 0).")
    enhanced_style: choice(*ENHANCED_STYLES) = Field(  # type: ignore[valid-type]
        default="fc-vs-xz", description="What the enhanced target contrasts (cccvs/UCGM enhanced_style): fc-vs-xz "
        "teacher(y) vs the data target, fc-vs-fe teacher(y) vs teacher(null) (one more no-grad forward), ft-vs-fe "
        "the student's own prediction vs teacher(null).")
    frame: choice(*FRAMES) = Field(  # type: ignore[valid-type]
        default="transport", description="Time frame of the loss: transport (its own t, LINs-lab/UCGM) or "
        "noise-at-1 (a transport with noise at t=0, ReLinear, trained at s=1-t as cccvs/UCGM).")
    enhanced_range: checked(floats(2, *UNIT), lambda v: v[0] <= v[1], "with lo <= hi") = Field(  # type: ignore[valid-type]
        default=(0.0, 0.75), description="'lo,hi' times where targets are enhanced.")
    huber_eps: Float = Field(ge=0.0, description="Pseudo-Huber c (>= 0; 0 = L2).")
    label_drop: Float = Field(default=0.1, ge=0.0, le=1.0,
                              description="Fraction of labels dropped to the null class.")
    label_drop_group: Int | None = Field(
        default=None, ge=1, description="Rows over which label-drop is rounded: the last round(label-drop x G) "
        "rows of every G consecutive rows of the global batch (of a last, shorter group: round(label-drop x its "
        "size)) get the null class, whatever the micro-batches and processes. Default: the global batch (one "
        "group). The reference rounds per GPU batch (1024 over 8 GPUs: 13 of every 128); its models' recipes set "
        "that.")
    time_beta: floats(3, at.Gt(0.0)) = Field(  # type: ignore[valid-type]
        default=(0.8, 1.0, 1.0), description="'a,b,scale': training times t ~ Beta(a, b) x scale, clamped to [0, 1].")
    weighting: Annotated[choice("Cosine", "none"), BeforeValidator(lambda v: "none" if v is None else v)] = Field(  # type: ignore[valid-type]
        default="Cosine", description="Loss weighting over time: Cosine (cos(1.57 t)) or none.")
    cosine_loss: Bool = Field(default=False, description="Add the cosine-similarity loss term.")
    teacher: choice("frozen", "online") = Field(  # type: ignore[valid-type]
        default="frozen", description="frozen (copy of the initial model) or online (the student).")
    ema_decay: Float = Field(default=0.99, ge=0.0, le=1.0, description="EMA decay per step of the saved weights.")
    steps: Int = Field(default=500, ge=1, description="Optimizer steps.")
    global_batch: Int = Field(default=1024, ge=1, description="Samples per optimizer step over all processes.")

    OBJECTIVE_KEYS: ClassVar[tuple[str, ...]] = (
        "consistency", "enhanced", "enhanced_style", "frame", "enhanced_range", "label_drop", "huber_eps",
        "cosine_loss", "weighting",
    )

    def drop_group(self) -> int:
        """G of `label_drop_group`, its default (the global batch) resolved."""
        return self.label_drop_group if self.label_drop_group is not None else self.global_batch

    def objective_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.UCGMObjective` except transport and num_classes."""
        kwargs = {key: getattr(self, key) for key in self.OBJECTIVE_KEYS}
        weighting = None if self.weighting == "none" else self.weighting
        return {**kwargs, "weighting": weighting, "time_dist": self.time_beta}

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `torch.optim.<optimizer>(params, ...)` (lr, betas, weight_decay)."""
        return {"lr": self.lr, "betas": self.betas, "weight_decay": self.weight_decay}
