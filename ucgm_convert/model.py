"""The common model: a network plus what is needed to sample it (transport, classes, latents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UCGMError
from .foundation import available_memory, gib, one_line
from .nets import build_network, size_in_bytes
from .settings import SettingsError
from .settings.model import ModelConfig
from .transports import Transport, get_transport
from .vae import load_vae

__all__ = ["GenerativeModel", "ModelConfig"]


def checked_network(config: ModelConfig, source: str) -> nn.Module:
    """The network `config` describes, built on the meta device after every check that needs no memory.

    config.json is untrusted input: the architecture and each hyperparameter are validated
    (bounded) first, the weights' size is compared with the memory available, and one forward on
    the meta device proves the latent shape fits the network. Errors name `source` and the field.
    """
    try:
        net = build_network(config.arch, device="meta", **config.arch_kwargs)
    except SettingsError as err:
        raise UCGMError(f"{source}: {err.under('arch_kwargs')}") from None
    except ValueError as err:
        raise UCGMError(f"{source}: arch {config.arch!r}: {one_line(err)}") from None
    need, free = size_in_bytes(net), available_memory()
    if need > free:
        raise UCGMError(f"{source}: the {config.arch} network needs {gib(need)} for its weights, but only {gib(free)} "
                        "of memory is available")
    x = torch.zeros(1, *config.latent_shape, device="meta")
    try:
        out = net(x, torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    except (RuntimeError, ValueError, IndexError, AssertionError) as err:  # timm asserts input sizes
        out = err
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise UCGMError(f"{source}: latent_shape {list(config.latent_shape)} does not fit the {config.arch} network "
                        f"of arch_kwargs ({one_line(out) if isinstance(out, Exception) else list(out.shape)})")
    return net


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
    def build(cls, config: ModelConfig, source: str = "config") -> GenerativeModel:
        """A model with freshly initialised weights for `config` (checked first, see `checked_network`)."""
        checked_network(config, source)
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
    def shares_encoder(self) -> bool:
        """True when the network may reuse its condition encoder across steps (`uc.sample(encoder_refresh=)`)."""
        return bool(getattr(self.net, "shares_encoder", False))

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
