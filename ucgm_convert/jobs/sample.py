"""`ucgm sample` as a library: `run(SampleConfig) -> SampleResult` writes OUT/samples.npz and OUT/grid.png.

Sample i depends only on (seed, i): its starting noise and its stochastic-step noise come from its
own generator, so the batch size changes no image. Every check (output folder, device, dtype,
classes, model, VAE) runs before the first sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BeforeValidator, Field

from ..console import SILENT, Reporter
from ..errors import UCGMError
from ..foundation import SAMPLE_DTYPES, output_folder, precision_label, resolve_device, sampling_dtype
from ..generation import balanced_labels, batches, generate_batch
from ..images import save_grid, save_npz
from ..settings import SamplingSettings
from ..settings.base import Bool, Int, Settings, choice
from .source import ArchOverrides, ModelSource, SamplingOverrides, resolve

OUTPUTS = ("samples.npz", "grid.png")
MAX_SEED = 2**63 - 1


def _class_list(value: object) -> object:
    """'3,7,9' -> [3, 7, 9]; 'all' -> None (every class)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return None
        try:
            return [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            return value
    return value


Classes = Annotated[list[Int] | None, BeforeValidator(_class_list)]


class SampleConfig(Settings):
    """Everything `ucgm sample` needs; see `ucgm sample --help` for each field."""

    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    sampling: SamplingOverrides = SamplingOverrides()  # type: ignore[valid-type]
    classes: Classes = Field(default=None, description="Comma-separated class ids, cycled over the samples. "
                             "Default: all classes.")
    num: Int = Field(default=16, ge=1, le=10_000_000, description="Number of samples.")
    batch_size: Int = Field(default=16, ge=1, le=65_536, description="Samples per batch (does not change any image).")
    seed: Int = Field(default=0, ge=0, le=MAX_SEED, description="Seed; sample i depends only on (seed, i).")
    out: Path = Field(default=Path("samples"), description="Output folder for samples.npz and grid.png.")
    overwrite: Bool = Field(default=False, description="Replace the samples.npz and grid.png of a previous run in "
                            "--out.")
    device: str | None = Field(default=None, description="Torch device (cpu, cuda, cuda:N). Default: cuda if "
                               "available, else cpu.")
    dtype: choice(*SAMPLE_DTYPES) = Field(default="auto", description="Network precision: float32, tf32 (float32 "  # type: ignore[valid-type]
                                          "weights, TF32 matmuls on CUDA), or bfloat16 / float16 autocast. auto: tf32 "
                                          "on CUDA (the reference samples with TF32), float32 elsewhere.")
    compile: Bool = Field(default=False, description="Compile the network with torch.compile: faster sampling after a "
                          "one-off compilation of tens of seconds (measured by `ucgm bench --only precision`).")


@dataclass
class SampleResult:
    """What `run` wrote and used."""

    npz: Path
    grid: Path
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    settings: SamplingSettings


def check_classes(classes: list[int] | None, num_classes: int) -> list[int]:
    """The class ids to cycle over, each within the model's classes."""
    if classes is None:
        return list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise UCGMError(f"--classes: class ids must be in [0, {num_classes - 1}], got {classes}")
    return classes


def run(config: SampleConfig, reporter: Reporter = SILENT) -> SampleResult:
    """Sample `config.num` images with UCGM-S and write them (npz + grid) to `config.out` atomically."""
    out = output_folder(config.out, OUTPUTS, "sample run", overwrite=config.overwrite)
    device = resolve_device(config.device)
    dtype = sampling_dtype(config.dtype, device.type)
    resolved = resolve(config.source, config.arch, device)
    model = resolved.model
    if config.compile:
        model.net.compile()  # in place: the state-dict keys stay as they are
    settings = resolved.sampling_with(config.sampling)
    labels = balanced_labels(config.num, check_classes(config.classes, model.num_classes))
    vae_module = model.load_vae(config.source.vae)
    reporter.table(f"Effective settings (base: {resolved.origin}; flags override)", {
        **settings.to_dict(),
        "model": f"{model.family} ({model.cfg.arch}, {model.transport.name})",
        "num / batch size / seed": f"{config.num} / {config.batch_size} / {config.seed}",
        "device / dtype": f"{device} / {precision_label(dtype, config.dtype)}",
        "NFE per sample": settings.nfe_label,
    })
    parts: list[np.ndarray] = []
    with reporter.progress("samples", "step") as bar:
        task = bar.add_task("sampling", total=config.num, step="")
        for index_range in batches(config.num, config.batch_size):
            def on_step(i: int, _: torch.Tensor) -> None:
                bar.update(task, step=f"step {i + 1}")

            _, images = generate_batch(model, settings, [labels[i] for i in index_range], index_range, config.seed,
                                       dtype, on_step, vae_module)
            parts.append(images.numpy())
            bar.advance(task, len(index_range))
    images = np.concatenate(parts)
    label_array = np.asarray(labels, dtype=np.int64)
    save_npz(out / OUTPUTS[0], images, label_array)
    save_grid(out / OUTPUTS[1], images)
    reporter.info(f"wrote {out / OUTPUTS[0]} and {out / OUTPUTS[1]}")
    return SampleResult(out / OUTPUTS[0], out / OUTPUTS[1], images, label_array, settings)
