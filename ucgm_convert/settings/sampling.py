"""UCGM-S sampling settings: the keyword arguments of `uc.sample` plus classifier-free guidance."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import annotated_types as at
from pydantic import Field, model_validator

from ..sampler import SOLVERS, count_encoder_evals, count_nfe, time_grid
from ..transports import Transport
from .base import UNIT, Float, Hint, Int, Settings, checked, choice, floats

_NO_CFG = Hint(lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0,
               "1.0 means no guidance here; the reference configs write 0.0 for 'no guidance'")


def _lo_le_hi(v: tuple[float, float]) -> bool:
    return v[0] <= v[1]


MAX_STEPS = 10_000  # far beyond any published setting (250); a bound keeps every grid allocation small

Stochasticity = Annotated[(Float, *UNIT)] | choice("auto")
Gaps = checked(floats(2, at.Ge(0.0)), lambda g: g[0] + g[1] < 1.0, "with start + end < 1")
Interval = checked(floats(2, *UNIT), _lo_le_hi, "with lo <= hi")


class SamplingSettings(Settings):
    """UCGM-S settings (arguments of `uc.sample`) plus classifier-free guidance."""

    steps: Int = Field(ge=1, le=MAX_STEPS, description="Sampling steps.")
    order: Int = Field(default=1, ge=1, le=2, description="Solver order, 1 or 2.")
    stochasticity: Stochasticity = Field(default=0.0, description="Stochasticity rho in [0, 1], or 'auto'.")
    extrapolation: Float = Field(default=0.0, ge=0.0, description="Extrapolation ratio lambda (>= 0).")
    time_dist: floats(3, at.Gt(0.0)) = Field(  # type: ignore[valid-type]
        default=(1.0, 1.0, 1.0), description="'a,b,c': Kumaraswamy warp (1-(1-u^a)^b)^c of the time grid.")
    gaps: Gaps = Field(default=(0.001, 0.001), description="'start,end' gaps of the time grid (each >= 0).")
    cfg_scale: Annotated[Float, _NO_CFG] = Field(default=1.0, gt=0.0,
                                                 description="Classifier-free guidance scale; 1.0 = off.")
    cfg_interval: Interval = Field(
        default=(0.0, 1.0), description="'lo,hi': times (model convention, 0..1) where guidance applies.")
    # "model": the channels the model's family guides (LightningDiT's published guidance: the
    # first 3 latent channels); "all": every channel.
    cfg_channels: Literal["model", "all"] = Field(
        default="model", description="'model': the channels the family's published guidance touches "
                                     "(LightningDiT: the first 3); 'all': every channel.")
    solver: choice(*SOLVERS) = Field(  # type: ignore[valid-type]
        default="ucgm", description="'ucgm': the reference's step (order 1 or 2); 'multistep': order 1 plus "
                                    "a DPM-Solver++(2M)-style correction from the previous prediction, "
                                    "second order at one evaluation per step.")
    encoder_refresh: Int = Field(
        default=1, ge=1, le=MAX_STEPS, description="Recompute a shared condition encoder every n-th evaluation "
                                                   "(models whose network shares it); 1 = every evaluation.")

    SAMPLE_KEYS: ClassVar[tuple[str, ...]] = ("steps", "order", "stochasticity", "extrapolation", "time_dist", "gaps",
                                              "solver", "encoder_refresh")

    @model_validator(mode="after")
    def _multistep_is_order_one(self) -> SamplingSettings:
        if self.solver == "multistep" and self.order != 1:
            raise ValueError(f"solver 'multistep' evaluates the model once per step: order must be 1, got {self.order}")
        return self

    def as_sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.sample` (steps, order, stochasticity, extrapolation, time_dist, gaps,
        solver, encoder_refresh)."""
        return {key: getattr(self, key) for key in self.SAMPLE_KEYS}

    def guidance_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `uc.guided` (scale, interval, channels); use only when `uses_guidance`."""
        return {"scale": self.cfg_scale, "interval": self.cfg_interval,
                "channels": "all" if self.cfg_channels == "all" else None}

    @property
    def uses_guidance(self) -> bool:
        """True when classifier-free guidance is on (cfg_scale != 1)."""
        return self.cfg_scale != 1.0

    @property
    def sampler_nfe(self) -> int:
        """Sampler steps that evaluate the network (`uc.count_nfe`), not counting CFG doubling."""
        return count_nfe(self.steps, self.order, self.gaps)

    @property
    def nfe(self) -> int:
        """Model evaluations per sample as the paper counts them: sampler NFE, x2 with CFG."""
        return self.sampler_nfe * (2 if self.uses_guidance else 1)

    @property
    def nfe_label(self) -> str:
        """NFE as the paper writes it: "40x2" with CFG (batched cond+uncond), else "40"; with a shared
        encoder its evaluations follow: "40x2 (encoder 20x2)"."""
        times = "x2" if self.uses_guidance else ""
        shared = f" (encoder {self.encoder_evals}{times})" if self.encoder_refresh != 1 else ""
        return f"{self.sampler_nfe}{times}{shared}"

    @property
    def encoder_evals(self) -> int:
        """Evaluations of a shared condition encoder per sample (`uc.count_encoder_evals`), without CFG doubling."""
        return count_encoder_evals(self.steps, self.order, self.gaps, self.encoder_refresh)

    def evaluations(self, transport: str | Transport) -> int:
        """Exact network evaluations per sample: those at a time inside cfg_interval count twice."""
        grid = time_grid(transport, self.steps, self.order, self.time_dist, self.gaps)
        k = grid.numel() - 1
        times = [grid[:k]]
        if self.order == 2:  # the correction evaluates at t_{i+1}, also at the end when gap 0
            times.append(grid[1 : k + 1] if self.gaps[1] == 0 else grid[1:k])
        evaluated = [t for part in times for t in part]
        if not self.uses_guidance:
            return len(evaluated)
        lo, hi = self.cfg_interval
        return sum(2 if lo <= float(t) <= hi else 1 for t in evaluated)
