"""The networks the speed benchmarks time: random weights of each architecture at a CPU size and at full size.

`--size small` times a tiny SiT (where sampler overhead dominates), the embedded demo model and a
small network of every architecture (so each family's code path runs on a CPU); `--size xl` times
the released XL sizes of each architecture (REPA-E's SiT-XL/1 and LightningDiT-XL/1 on 32x16x16
latents, DDT-XL/2 on 4x32x32, EDM2-XL on 4x64x64) plus the demo model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import ucgm_convert as uc
from ucgm_convert.settings.model import ModelConfig

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Spec:
    """A network to time: architecture, constructor arguments, latent shape, transport, batch for timing."""

    name: str
    arch: str
    kwargs: dict[str, Any]
    latent: tuple[int, int, int]
    transport: str = "Linear"
    batch: int = 64


def _sit(h: int, d: int, heads: int, grid: int, ch: int, p: int) -> dict[str, Any]:
    return dict(input_size=grid, patch_size=p, in_channels=ch, hidden_size=h, depth=d, num_heads=heads,
                num_classes=NUM_CLASSES)


def _lightningdit(h: int, d: int, heads: int, mlp: int, grid: int, ch: int, p: int) -> dict[str, Any]:
    return dict(input_size=grid, patch_size=p, in_channels=ch, hidden_size=h, depth=d, num_heads=heads,
                mlp_hidden=mlp, num_classes=NUM_CLASSES)


def _ddt(h: int, d: int, enc: int, heads: int, mlp: int, ch: int, p: int) -> dict[str, Any]:
    return dict(in_channels=ch, patch_size=p, hidden_size=h, depth=d, encoder_depth=enc, num_heads=heads,
                mlp_hidden=mlp, num_classes=NUM_CLASSES)


def _edm2(res: int, ch: int, width: int, mult: tuple[int, ...], blocks: int, attn: tuple[int, ...]) -> dict[str, Any]:
    return dict(img_resolution=res, img_channels=ch, label_dim=NUM_CLASSES, model_channels=width,
                channel_mult=list(mult), num_blocks=blocks, attn_resolutions=list(attn))


TINY = Spec("tiny SiT (h32, 1 block)", "sit", _sit(32, 1, 2, 8, 4, 2), (4, 8, 8), batch=8)
FAMILIES_SMALL = [
    Spec("SiT-S/2 (small)", "sit", _sit(128, 2, 2, 16, 4, 2), (4, 16, 16), batch=16),
    Spec("LightningDiT (small)", "lightningdit", _lightningdit(128, 2, 2, 256, 16, 4, 2), (4, 16, 16), batch=16),
    Spec("DDT (small)", "ddt", _ddt(128, 2, 1, 2, 256, 4, 2), (4, 16, 16), batch=16),
    Spec("EDM2 U-Net (small)", "edm2-unet", _edm2(16, 4, 32, (1, 2), 1, (8,)), (4, 16, 16), "EDM", batch=16),
]
FAMILIES_XL = [
    Spec("SiT-XL/1 (REPA-E)", "sit", _sit(1152, 28, 16, 16, 32, 1), (32, 16, 16), batch=32),
    Spec("LightningDiT-XL/1", "lightningdit", _lightningdit(1152, 28, 16, 3072, 16, 32, 1), (32, 16, 16), batch=32),
    Spec("DDT-XL/2 (22+6)", "ddt", _ddt(1152, 28, 22, 16, 3072, 4, 2), (4, 32, 32), batch=32),
    Spec("EDM2-XL (img512)", "edm2-unet", _edm2(64, 4, 384, (1, 2, 3, 4), 3, (16, 8)), (4, 64, 64), "EDM", batch=32),
]


def specs(size: str, quick: bool) -> list[Spec]:
    """The networks of a run: tiny + families at `size` (quick: the first family only at small size)."""
    families = FAMILIES_XL if size == "xl" else FAMILIES_SMALL
    return [TINY, *(families[:1] if quick and size == "small" else families)]


def build(spec: Spec, device: str, seed: int = 0) -> uc.GenerativeModel:
    """A GenerativeModel of `spec` with random (seeded) weights on `device`, in eval mode."""
    config = ModelConfig(family="ucgm", arch=spec.arch, arch_kwargs=spec.kwargs, transport=spec.transport,
                         num_classes=NUM_CLASSES, latent_shape=spec.latent)
    torch.manual_seed(seed)
    with torch.device(device):
        model = uc.GenerativeModel.build(config, source=spec.name)
    return model.eval().requires_grad_(False)


def demo(device: str) -> tuple[Spec, uc.GenerativeModel]:
    """The embedded demo model (SiT, hidden 96, 4 blocks, 3x16x16 pixels, 10 classes)."""
    model = uc.load("embedded:demo", device=device).eval().requires_grad_(False)
    spec = Spec("demo SiT (h96, 4 blocks)", "sit", dict(model.cfg.arch_kwargs), tuple(model.latent_shape), batch=64)
    return spec, model


def inputs(spec: Spec, batch: int, device: str, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded noise [batch, *latent] and labels for timing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *spec.latent), generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return x, y
