"""The common model: a network plus what is needed to sample it (transport, classes, latents)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UCGMError
from .nets import build_network
from .transports import Transport, get_transport

FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Everything `config.json` stores to rebuild and sample a model (JSON-serialisable)."""

    family: str
    arch: str
    arch_kwargs: dict[str, Any]
    transport: str
    num_classes: int
    latent_shape: tuple[int, int, int]
    null_class: int | None = None
    guidance_channels: int | None = None
    vae: dict[str, Any] = field(default_factory=lambda: {"name": "identity"})
    recipe: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None  # Hub id of the source model, for model cards
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(v) for v in self.latent_shape)  # type: ignore[assignment]
        if len(self.latent_shape) != 3 or min(self.latent_shape) < 1:
            raise UCGMError(f"latent_shape must be (C, H, W) with positive sizes, got {self.latent_shape!r}")
        get_transport(self.transport)
        if self.num_classes < 1:
            raise UCGMError(f"num_classes must be >= 1, got {self.num_classes!r}")
        if self.null_class is None:
            self.null_class = self.num_classes

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Validate a parsed config.json; errors name the file and the field."""
        if not isinstance(data, dict):
            raise UCGMError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        unknown = sorted(set(data) - names)
        missing = sorted(required - set(data))
        if unknown:
            raise UCGMError(f"{source}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        if missing:
            raise UCGMError(f"{source}: missing field(s) {', '.join(missing)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise UCGMError(f"{source}: format_version {data['format_version']} is newer than this ucgm-convert "
                            f"understands ({FORMAT_VERSION}); upgrade ucgm-convert")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise UCGMError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["latent_shape"] = list(self.latent_shape)
        return out


class GenerativeModel(nn.Module):
    """`m(x_t, t, y)` returns F in `m.transport`'s parameterization, so `uc.sample(m, ...)` works."""

    def __init__(self, net: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.net = net
        self.cfg = config
        self.transport: Transport = get_transport(config.transport)
        # Weights of a VAE stored with the model (REPA-E end-to-end checkpoints), else None.
        self.vae_state: dict[str, Tensor] | None = None

    @classmethod
    def build(cls, config: ModelConfig) -> "GenerativeModel":
        """A model with freshly initialised weights for `config`."""
        return cls(build_network(config.arch, **config.arch_kwargs), config)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x_t, t, y)

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def null_class(self) -> int:
        return int(self.cfg.null_class)  # type: ignore[arg-type]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape

    @property
    def recipe(self) -> str | None:
        return self.cfg.recipe

    @property
    def guidance_channels(self) -> int | None:
        return self.cfg.guidance_channels

    @property
    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
