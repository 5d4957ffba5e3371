"""What our checkpoint format's config.json stores: the model (ModelConfig) and its VAE (VaeSpec).

Model-space latents are m = (z - latent_mean) / latent_std; decoding computes z = m * std + mean,
runs the VAE and maps its output range ("-1,1" or "0,1") to [0, 1]. `identity` is pixel space.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from ..errors import UCGMError
from ..transports import TRANSPORTS, get_transport
from .base import Describe, Float, Int, Settings, checked, choice
from .sampling import SamplingSettings

FORMAT_VERSION = 1
MAX_LATENT_ELEMENTS = 1 << 26  # per sample (256 MB in float32); released latents have at most 32 x 64 x 64
VAES = ("identity", "sd-vae", "ldm-f16d32", "dc-ae")
PIXEL_RANGES = ("-1,1", "0,1")
# GroupNorm groups of every released KL VAE; the weights cannot tell it (tiny test VAEs differ).
DEFAULT_NORM_GROUPS = 32

Stat = Float | checked(list[Float], bool, "not empty")
NonZeroStat = checked(Stat, lambda v: all(s != 0 for s in (v if isinstance(v, list) else [v])), "non-zero")


class VaeSpec(Settings):
    """How latents decode to images: which VAE, its weights, the latent statistics and the pixel range."""

    name: choice(*VAES)  # type: ignore[valid-type]
    source: str | None = None
    latent_mean: Stat | None = None
    latent_std: NonZeroStat | None = None
    pixel_range: choice(*PIXEL_RANGES) | None = None  # type: ignore[valid-type]
    norm_groups: Int = Field(default=DEFAULT_NORM_GROUPS, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _identity_defaults(cls, data: Any) -> Any:
        """Pixel space needs no statistics: mean 0, std 1, range -1..1 unless given."""
        if isinstance(data, dict) and data.get("name") == "identity":
            return {"latent_mean": 0.0, "latent_std": 1.0, "pixel_range": "-1,1", **data}
        return data

    @model_validator(mode="after")
    def _statistics_stated(self) -> VaeSpec:
        """A real VAE must state its statistics and range: a silent default would decode wrongly scaled latents."""
        missing = [f for f in ("latent_mean", "latent_std", "pixel_range") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"VAE {self.name!r} needs {', '.join(missing)}")
        return self

    def channel_values(self, field: str, channels: int) -> list[float]:
        """latent_mean / latent_std as one value per channel; UCGMError when a list has another length."""
        value = getattr(self, field)
        if not isinstance(value, list):
            return [float(value)] * channels
        if len(value) != channels:
            raise UCGMError(f"vae spec: {field} has {len(value)} values but the latents have {channels} channels")
        return [float(v) for v in value]


def _canonical_transport(name: str) -> str:
    return get_transport(name).name  # ValueError (-> the field's error) for an unknown name


def _no_sampling(value: Any) -> Any:
    return None if value == {} else value  # files of format 1 wrote {} for "no sampling defaults"


class ModelConfig(Settings):
    """Everything config.json stores to rebuild and sample a model."""

    family: str
    arch: str
    arch_kwargs: dict[str, Any]
    transport: Annotated[str, AfterValidator(_canonical_transport),
                         Describe(f"a transport name, one of {', '.join(map(repr, TRANSPORTS))}")]
    num_classes: Int = Field(ge=1, le=1 << 20)
    latent_shape: Annotated[tuple[Int, Int, Int], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]
    null_class: Int = Field(ge=0)
    guidance_channels: Int | None = Field(default=None, ge=1)
    vae: VaeSpec = VaeSpec(name="identity")
    recipe: str | None = None
    sampling: Annotated[SamplingSettings | None, BeforeValidator(_no_sampling)] = None
    base_model: str | None = None  # Hub id of the source model, for model cards
    format_version: Int = FORMAT_VERSION

    @model_validator(mode="before")
    @classmethod
    def _default_null_class(cls, data: Any) -> Any:
        """The null class defaults to num_classes: the extra row of the label table."""
        if isinstance(data, dict) and data.get("null_class") is None and "num_classes" in data:
            return {**data, "null_class": data["num_classes"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if min(self.latent_shape) < 1 or math.prod(self.latent_shape) > MAX_LATENT_ELEMENTS:
            raise ValueError(f"latent_shape must be (C, H, W) with positive sizes and at most {MAX_LATENT_ELEMENTS} "
                             f"elements, got {list(self.latent_shape)}")
        if not 0 <= self.null_class <= self.num_classes:
            raise ValueError(f"null_class must be in [0, num_classes = {self.num_classes}] (the label table has "
                             f"num_classes + 1 rows), got {self.null_class}")
        if self.guidance_channels is not None and self.guidance_channels > self.latent_shape[0]:
            raise ValueError(f"guidance_channels {self.guidance_channels} exceeds the latent channels "
                             f"{self.latent_shape[0]}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is newer than this ucgm-convert understands "
                             f"({FORMAT_VERSION}); upgrade ucgm-convert")
        return self
