"""The feature passes the requested metrics need, run once per batch of images: Inception and/or DINOv2.

One Inception forward (sfid.InceptionWithSpatial) gives pool (fid, prec, rec), logits (is) and the
sFID slice; one DINOv2 forward gives fd_dinov2's features. A network no requested metric needs is
never loaded, so DINOv2 weights are only required when fd_dinov2 is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import DINOV2, INCEPTION, passes
from .dinov2 import DINOv2Features, load_dinov2
from .inception import load_inception
from .sfid import SPATIAL_LAYER, InceptionWithSpatial

INCEPTION_KEYS = ("pool", "logits", "spatial")
DINOV2_KEY = "dinov2"


@dataclass
class Extractors:
    """uint8 [N, H, W, 3] -> {pool, logits, spatial, dinov2} (those of the loaded networks), float32."""

    inception: InceptionWithSpatial | None
    dinov2: DINOv2Features | None

    @property
    def keys(self) -> list[str]:
        return [*(INCEPTION_KEYS if self.inception else ()), *((DINOV2_KEY,) if self.dinov2 else ())]

    @property
    def networks(self) -> list[str]:
        return [name for name, net in (("Inception", self.inception), ("DINOv2", self.dinov2)) if net is not None]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.inception is not None:
            out["pool"], out["logits"], out["spatial"] = self.inception(images)
        if self.dinov2 is not None:
            out[DINOV2_KEY] = self.dinov2(images)
        return out

    def weights(self) -> dict[str, str]:
        """sha256 of each network's weights (part of an evaluation's fingerprint)."""
        return {**({"inception": self.inception.inception.weights_sha256} if self.inception else {}),
                **({"dinov2": self.dinov2.weights_sha256} if self.dinov2 else {})}

    def describe(self, metrics: list[str]) -> dict[str, Any]:
        """results.json's evaluator record: each network and the feature layer each of `metrics` reads."""
        layers = {"fid": "Inception pool3 (2048)", "is": "Inception logits_unbiased (1008)",
                  "sfid": f"Inception TF mixed_6/conv:0 = {SPATIAL_LAYER}, channels 0..6 NHWC (2023)",
                  "prec": "Inception pool3 (2048)", "rec": "Inception pool3 (2048)",
                  "fd_dinov2": "DINOv2 ViT-L/14 CLS after the final norm (1024) at 224 px"}
        return {**({"inception": self.inception.describe()} if self.inception else {}),
                **({"dinov2": self.dinov2.describe()} if self.dinov2 else {}),
                "feature_layers": {name: layers[name] for name in metrics}}


def load_extractors(metrics: list[str], inception_weights: str | Path | None, dinov2_weights: str | Path | None,
                    device: torch.device | str) -> Extractors:
    """The networks `metrics` need (registry: metrics.METRICS), loaded onto `device`."""
    needed = passes(metrics)
    inception = InceptionWithSpatial(load_inception(inception_weights, device)) if INCEPTION in needed else None
    dinov2 = load_dinov2(dinov2_weights, device) if DINOV2 in needed else None
    return Extractors(inception, dinov2)
