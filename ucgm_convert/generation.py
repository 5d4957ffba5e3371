"""Batched generation: labels and per-sample seeds -> latents -> images, batch-size invariant."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .errors import UCGMError
from .foundation import parse_dtype, tf32_matmuls
from .guidance import guided
from .model import GenerativeModel
from .sampler import sample
from .seeding import initial_noise, sample_generators
from .settings import SamplingSettings
from .vae import UINT8_DEFAULT, decode, to_uint8

ROW_MULTIPLE = 8


def row_padded(fn: Callable[..., Tensor], multiple: int = ROW_MULTIPLE) -> Callable[..., Tensor]:
    """Pad every forward to a multiple of `multiple` rows (repeating the last row), then drop the pad.

    CPU BLAS picks different code paths for small or odd row counts, which changes the last
    float bits of a row with the batch it shares; padded row counts keep each sample's
    arithmetic identical whatever --batch-size is.
    """

    def padded(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        extra = (-n) % multiple
        if extra == 0:
            return fn(x, t, y)
        idx = torch.cat([torch.arange(n, device=x.device), torch.full((extra,), n - 1, device=x.device)])
        return fn(x[idx], t[idx], y[idx])[:n]

    return padded


def balanced_labels(num: int, classes: Sequence[int]) -> list[int]:
    """Sample i gets classes[i % len(classes)]: balanced, and independent of batching."""
    return [int(classes[i % len(classes)]) for i in range(num)]


def model_fn(model: GenerativeModel, settings: SamplingSettings, dtype: str = "float32") -> Callable[..., Tensor]:
    """The network with guidance (when cfg_scale != 1), autocast (bfloat16 / float16) or TF32 matmuls
    (tf32: float32 weights, as the reference samples) and row padding."""
    fn: Callable[..., Tensor] = model
    if settings.cfg_scale != 1.0:
        fn = guided(model, **settings.guidance_kwargs())
    if dtype == "tf32":
        plain_fn = fn

        def tf32_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            with tf32_matmuls():
                return plain_fn(x, t, y)

        return row_padded(tf32_fn)
    autocast = parse_dtype(dtype)
    if autocast == torch.float32:
        return row_padded(fn)
    device_type = model.device.type
    guided_fn = fn

    def autocast_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=autocast):
            return guided_fn(x, t, y).float()

    return row_padded(autocast_fn)


def generate_batch(
    model: GenerativeModel,
    settings: SamplingSettings,
    labels: Sequence[int],
    indices: Sequence[int],
    seed: int,
    dtype: str = "float32",
    step_callback: Callable[[int, Tensor], None] | None = None,
    vae_module: nn.Module | None = None,
    uint8: str = UINT8_DEFAULT,
) -> tuple[Tensor, Tensor]:
    """Sample the given indices: returns (latents [B, C, H, W] float32, images [B, H, W, 3] uint8).

    `vae_module` decodes latents (`vae.load_model_vae(model)`); pixel-space models need none. `uint8`: the
    pixel rule (vae.UINT8_RULES).
    """
    device = model.device
    generators = sample_generators(seed, indices)
    noise = initial_noise(generators, model.latent_shape).to(device)
    y = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    with torch.no_grad():
        latents = sample(
            model_fn(model, settings, dtype),
            noise,
            transport=model.transport,
            generator=generators,
            callback=step_callback,
            y=y,
            **settings.as_sample_kwargs(),
        )
        images = to_uint8(decode(latents, model.cfg.vae, vae_module).cpu(), uint8)
    return latents.cpu(), images


def batches(num: int, batch_size: int) -> list[range]:
    """Index ranges of at most batch_size covering 0 .. num-1."""
    if batch_size < 1:
        raise UCGMError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    return [range(i, min(i + batch_size, num)) for i in range(0, num, batch_size)]


