"""The metrics of the table papers report, which features each needs, and which share one network pass.

| name | network (pass) | features | against the reference |
|---|---|---|---|
| fid | inception (torch-fidelity TF port) | pool3, 2048 | mu, sigma |
| is | inception | logits_unbiased, 1008 | nothing (samples only) |
| sfid | inception | mixed_6/conv[..., :7] NHWC, 2023 (sfid.py) | mu_s, sigma_s |
| prec, rec | inception | pool3, 2048, every row (precision_recall.py) | the reference's rows |
| fd_dinov2 | dinov2 (ViT-L/14 at 224, dinov2.py) | CLS after the final norm, 1024 | mu, sigma of those |

One Inception forward (sfid.InceptionWithSpatial) gives everything but fd_dinov2; one DINOv2
forward gives fd_dinov2. Frechet distances use ucgm_convert.metrics.fid (float64 statistics).
Published references: ADM's VIRTUAL_*.npz hold arr_0 (uint8 images, NHWC; ImageNet refs: 10k of them,
which ADM runs through Inception for prec/rec), mu/sigma (pool3) and mu_s/sigma_s (sfid,
sfid.read_adm_spatial_stats); EDM2's img512.pkl holds fid and fd_dinov2 mu/sigma
(dinov2.read_edm2_dinov2_stats).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import UCGMError
from ..settings.evaluation import split_metrics
from .fid import FeatureStats, frechet_distance

INCEPTION, DINOV2 = "inception", "dinov2"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    network: str  # the pass that produces its features
    features: str  # the feature key of that pass
    dim: int
    reference: str  # what the reference must provide
    paper: str


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("fid", INCEPTION, "pool", 2048, "mu, sigma", "Heusel et al. 2017"),
    MetricSpec("is", INCEPTION, "logits", 1008, "none", "Salimans et al. 2016"),
    MetricSpec("sfid", INCEPTION, "spatial", 2023, "mu_s, sigma_s", "Nash et al. 2021"),
    MetricSpec("prec", INCEPTION, "pool", 2048, "pool features of every reference image", "Kynkaanniemi et al. 2019"),
    MetricSpec("rec", INCEPTION, "pool", 2048, "pool features of every reference image", "Kynkaanniemi et al. 2019"),
    MetricSpec("fd_dinov2", DINOV2, "dinov2", 1024, "mu, sigma of DINOv2 features", "Stein et al. 2023"),
)}


def parse_metrics(names: str | Iterable[str]) -> list[str]:
    """'fid,is,sfid' (or a list) -> known metric names in the given order, without duplicates."""
    try:
        return split_metrics(names)
    except ValueError as err:
        raise UCGMError(f"--metrics: {err}; expected a comma-separated subset of {', '.join(METRICS)}") from None


def passes(names: Iterable[str]) -> dict[str, list[str]]:
    """network -> the metrics its single pass serves, e.g. {'inception': ['fid', 'sfid'], 'dinov2': ['fd_dinov2']}."""
    out: dict[str, list[str]] = {}
    for name in parse_metrics(names):
        out.setdefault(METRICS[name].network, []).append(name)
    return out


def frechet_from_stats(stats: FeatureStats, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Frechet distance of accumulated sample statistics to a reference (FID, sFID, FD_DINOv2 alike)."""
    mu, sigma = stats.mu_sigma()
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, factor1=stats.factor())
