"""Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes them.

Definition (openai/guided-diffusion evaluations/evaluator.py, ManifoldEstimator with its defaults
nhood_sizes=(3,), clamp_to_percentile=None; DistanceBlock; compute_prec_recall):

    d(x, y)  = max(|x|^2 - 2 x.y + |y|^2, 0)            squared Euclidean distance (never square-rooted)
    r_k(x; S) = the (k+1)-th smallest of {d(x, y) : y in S}, x in S itself included (its d = 0),
                i.e. the distance to the k-th nearest neighbour (np.partition, column index k)
    inside(z; S) = any_{y in S} d(z, y) <= r_k(y; S)       (`<=`: a point on a sphere is inside)
    precision = mean_{g in G} inside(g; R)   generated samples inside the reference manifold
    recall    = mean_{x in R} inside(x; G)   reference images inside the generated manifold

with R the reference (real) pool features and G the generated ones, each set's radii computed
within that set only (so they depend on the set sizes: ADM uses 10k reference images from the
reference batch's arr_0 and 50k samples). torch-fidelity 0.4 (metric_prc.py) has the same
definition (kthvalue(k+1) incl. self, `<=`, same directions, prc_neighborhood=3) on Euclidean
rather than squared distances (same comparisons in exact arithmetic), but in float32 via
torch.cdist and, by default (save_cpu_ram=False), with full N x N matrices in memory -- so it is
not used here.

Numerics: ADM computes every distance block in float16 (falling back to float32 when a block has
an inf) and stores radii in float32. Those roundings are not part of the metric and not
reproducible across hardware; here features are float64 and every distance is computed in
float64 in blocks of `block` x `block`, keeping only the k+1 smallest per row (memory
O(block * (block + k)) besides the features: 50k x 50k distances are never held); the G x R
blocks are computed once for both directions, as ADM's evaluate_pr does. Cost: 2 D (N_R^2 + N_G^2
+ N_R N_G) flops, ~1.2e13 for 10k reference / 50k samples at D = 2048 (minutes on a few CPU cores). Results do not
depend on `block` except when a distance ties a radius to within float64 round-off (~1e-13 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UCGMError

NEIGHBOURHOOD = 3  # ADM ManifoldEstimator nhood_sizes=(3,); torch-fidelity prc_neighborhood=3
BLOCK = 2048


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    num_reference: int
    num_samples: int

    def describe(self) -> dict[str, Any]:
        """What results.json records about the numbers."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "k": self.k,
            "num_reference": self.num_reference,
            "num_samples": self.num_samples,
            "features": "Inception pool3, 2048-d (the FID features)",
            "definition": ("Kynkaanniemi et al. 2019 as the ADM evaluator: radius = squared distance to the k-th "
                           "nearest neighbour within the same set (self included as the 0th); a point is inside if "
                           "its squared distance to some point of the other set is <= that point's radius; "
                           "precision = samples inside the reference manifold, recall = reference inside the "
                           "samples' manifold"),
            "distances": "float64, blocked (ADM: float16 blocks, float32 fallback and radii)",
        }


def _rows(features: Any, name: str, device: torch.device) -> torch.Tensor:
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise UCGMError(f"{name}: expected float features [N, D], got {x.dtype} {list(x.shape)}")
    x = x.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise UCGMError(f"{name}: features contain NaN or infinite values")
    return x


def _squared_distances(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """max(|a_i|^2 - 2 a_i.b_j + |b_j|^2, 0) for a block, as ADM's _batch_pairwise_distances."""
    return (a2[:, None] - 2.0 * (a @ b.T) + b2[None, :]).clamp_min_(0.0)


def _knn_radii(x: torch.Tensor, x2: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for i in range(0, len(x), block):
        a, a2 = x[i:i + block], x2[i:i + block]
        best = torch.full((len(a), k + 1), float("inf"), dtype=torch.float64, device=x.device)
        for j in range(0, len(x), block):
            d = _squared_distances(a, a2, x[j:j + block], x2[j:j + block])
            best = torch.topk(torch.cat([best, d], dim=1), k + 1, dim=1, largest=False, sorted=True).values
        radii[i:i + block] = best[:, k]
    return radii


def _cross_inside(g: torch.Tensor, g2: torch.Tensor, radii_g: torch.Tensor, r: torch.Tensor, r2: torch.Tensor,
                  radii_r: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside(g; R) for every g, inside(x; G) for every x in R) from one pass over the G x R distance blocks."""
    g_in = torch.zeros(len(g), dtype=torch.bool, device=g.device)
    r_in = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    for i in range(0, len(g), block):
        for j in range(0, len(r), block):
            d = _squared_distances(g[i:i + block], g2[i:i + block], r[j:j + block], r2[j:j + block])
            g_in[i:i + block] |= (d <= radii_r[None, j:j + block]).any(dim=1)
            r_in[j:j + block] |= (d <= radii_g[i:i + block, None]).any(dim=0)
    return g_in, r_in


def knn_radii(features: Any, k: int = NEIGHBOURHOOD, block: int = BLOCK,
              device: torch.device | str = "cpu") -> np.ndarray:
    """r_k(x; S) for every row x of `features` (S = all rows): [N] float64 squared distances."""
    x = _rows(features, "features", torch.device(device))
    _check_k(k, {"features": len(x)}, block)
    return _knn_radii(x, (x * x).sum(dim=1), k, block).cpu().numpy()


def _check_k(k: int, sizes: dict[str, int], block: int) -> None:
    if k < 1:
        raise UCGMError(f"precision/recall: k must be >= 1, got {k}")
    if block < 1:
        raise UCGMError(f"precision/recall: block must be >= 1, got {block}")
    for name, n in sizes.items():
        if n <= k:
            raise UCGMError(f"precision/recall: {name} has {n} rows; the k={k} nearest-neighbour radius "
                            f"needs at least {k + 1}")


def precision_recall(reference: Any, samples: Any, k: int = NEIGHBOURHOOD, block: int = BLOCK,
                     device: torch.device | str = "cpu") -> PrecisionRecall:
    """Precision (samples inside the reference manifold) and recall (reference inside the samples' manifold)."""
    dev = torch.device(device)
    r, g = _rows(reference, "reference features", dev), _rows(samples, "sample features", dev)
    if r.shape[1] != g.shape[1]:
        raise UCGMError(f"precision/recall: reference features are {r.shape[1]}-d, sample features {g.shape[1]}-d")
    _check_k(k, {"reference features": len(r), "sample features": len(g)}, block)
    r2, g2 = (r * r).sum(dim=1), (g * g).sum(dim=1)
    radii_r, radii_g = _knn_radii(r, r2, k, block), _knn_radii(g, g2, k, block)
    g_in, r_in = _cross_inside(g, g2, radii_g, r, r2, radii_r, block)
    precision, recall = g_in.double().mean().item(), r_in.double().mean().item()
    return PrecisionRecall(precision=precision, recall=recall, k=k, num_reference=len(r), num_samples=len(g))
