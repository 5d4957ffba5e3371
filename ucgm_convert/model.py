"""The common model: a network plus what is needed to sample it (transport, classes, latents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nets import build_network
from .settings.model import ModelConfig
from .transports import Transport, get_transport
from .vae import load_vae

__all__ = ["GenerativeModel", "ModelConfig"]


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
    def build(cls, config: ModelConfig) -> GenerativeModel:
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
        return self.cfg.null_class

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

    def load_vae(self, path: str | Path | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
        """The VAE that decodes this model's latents: `path` (--vae), else the weights stored with it, else its
        spec's source; pixel-space models get nn.Identity."""
        return load_vae(self.cfg.vae, path=path, state=self.vae_state, device=self.device if device is None else device,
                        dtype=dtype)

    def num_parameters(self) -> int:
        """Parameters of the network (not the VAE)."""
        return sum(p.numel() for p in self.net.parameters())
