"""Frechet distance, Inception Score and reference statistics (mu, sigma), all in float64.

Reference statistics files:
- ADM / guided-diffusion reference batches (VIRTUAL_imagenet256_labeled.npz, ...): an .npz with
  `mu` [2048] and `sigma` [2048, 2048] (pool3 features); other keys (arr_0, mu_s, sigma_s) are
  ignored. pytorch-fid and clean-fid statistics use the same two keys.
- torch-fidelity's cached statistics (`$TORCH_HOME/fidelity_cache/*-stat-fid-2048.pt`): a
  torch.save'd dict {"mu": ndarray, "sigma": ndarray}, read with weights_only=True.
- EDM2's dataset refs (`dataset-refs/img512.pkl`, calculate_metrics.py): a pickle of
  {"num_images", "fid": {"mu", "sigma"}, "fd_dinov2": ...}, read with the restricted unpickler.
  Note: EDM2's published FIDs are against this reference, not ADM's VIRTUAL_imagenet512.npz.
- What `ucgm eval ref` writes: an .npz with mu, sigma and metadata (num_images, resolution,
  evaluator, evaluator_version, inception_weights_sha256, feature_dim).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UCGMError
from ..formats.safe_pickle import read_pickle
from ..formats.torch_files import safe_load
from ..foundation import one_blas_thread, one_line, sha256_file, write_file_atomic

FEATURE_DIM = 2048
IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed for the Inception Score split shuffle


@one_blas_thread()
def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None,
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    The trace of the matrix square root is computed without a general (non-symmetric) sqrtm.
    Write sigma1 = B B^T with B = U diag(sqrt(lambda)) from the eigendecomposition of sigma1
    (eigenvalues at round-off level, lambda <= d * eps * max(lambda), are dropped: they are 0 in
    exact arithmetic). sigma1 sigma2 = B (B^T sigma2) has the same non-zero eigenvalues as the
    small symmetric PSD matrix M = B^T sigma2 B, so tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(M)).
    This equals the scipy.linalg.sqrtm formula of the ADM evaluator / pytorch-fid (and
    torch-fidelity's eigvals form) to float64 round-off, stays real, needs no epsilon offset for
    singular covariances, and is exact (not noise-dominated) for low-rank sample covariances.

    factor1: optionally B itself, [d, k] with sigma1 = B B^T (FeatureStats.factor(): the centered
    features / sqrt(n - 1) when n <= d); then no d x d eigendecomposition is needed at all.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise UCGMError(f"Frechet distance: mu shapes differ or are not vectors: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UCGMError(f"Frechet distance: sigma shapes {sigma1.shape}, {sigma2.shape} do not match mu ({d})")
    # Symmetrize: a covariance accumulated in float64 is symmetric up to round-off.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    if factor1 is None:
        lam, u = np.linalg.eigh(sigma1)
        keep = lam > max(float(lam.max()), 0.0) * d * np.finfo(np.float64).eps
        factor1 = u[:, keep] * np.sqrt(lam[keep])
    else:
        factor1 = np.asarray(factor1, np.float64)
        if factor1.ndim != 2 or factor1.shape[0] != d:
            raise UCGMError(f"Frechet distance: factor1 must be [{d}, k], got {list(factor1.shape)}")
    m = factor1.T @ sigma2 @ factor1
    lam_m = np.linalg.eigvalsh((m + m.T) / 2) if m.size else np.zeros(0)
    tr_covmean = float(np.sqrt(np.clip(lam_m, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStats:
    """Running float64 mean and covariance of feature rows: feed batches in a fixed order.

    Keeps n, sum(y) and sum(y y^T) in float64 of the shifted rows y = x - x_0 (x_0: the very
    first row, so the shift does not depend on batching; it removes the cancellation of the
    one-pass formula when features have a large mean). sigma is the unbiased covariance
    (n - 1), as numpy.cov / the ADM evaluator / torch-fidelity compute it. The result depends
    only on the rows and the order of the batches, not on which process computed them.
    While n <= dim the rows are kept too, for the exact low-rank factor (see `factor`).
    """

    def __init__(self, dim: int = FEATURE_DIM) -> None:
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self.rows: list[np.ndarray] | None = []

    @one_blas_thread()
    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise UCGMError(f"features: expected [N, {self.dim}], got {list(f.shape)}")
        if not len(f):
            return
        if self.shift is None:
            self.shift = f[0].copy()
        y = f - self.shift
        self.n += y.shape[0]
        self.total += y.sum(axis=0)
        self.outer += y.T @ y
        if self.rows is not None:
            self.rows = [*self.rows, f] if self.n <= self.dim else None

    @one_blas_thread()
    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2 or self.shift is None:
            raise UCGMError(f"statistics need at least 2 samples, got {self.n}")
        m = self.total / self.n
        sigma = (self.outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (sigma + sigma.T) / 2

    @one_blas_thread()
    def factor(self) -> np.ndarray | None:
        """B [dim, n] with sigma = B B^T (centered rows / sqrt(n - 1)) while n <= dim, else None."""
        if not self.rows or self.n < 2:
            return None
        x = np.concatenate(self.rows)
        return ((x - x.mean(axis=0)) / np.sqrt(self.n - 1)).T


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS,
                    shuffle_seed: int = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) of unbiased logits, exactly as torch-fidelity computes it.

    torch-fidelity: rows shuffled with np.random.RandomState(2020), softmax in float64, split i is
    rows [i N / splits, (i+1) N / splits), score exp(mean KL(p(y|x) || p(y))) per split. The ADM
    evaluator also uses 10 splits (of its first 50k samples, not shuffled).
    """
    from torch_fidelity.metric_isc import isc_features_to_metric  # imported on use: torch-fidelity loads in ~1 s

    if len(logits) < splits:
        raise UCGMError(f"Inception Score: need at least {splits} samples for {splits} splits, got {len(logits)}")
    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits, np.float32)), splits=splits,
                                 shuffle=True, rng_seed=shuffle_seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


@dataclass
class ReferenceStats:
    """Reference (mu, sigma) and whatever the file records about how it was made."""

    mu: np.ndarray
    sigma: np.ndarray
    path: str
    sha256: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def resolution(self) -> tuple[int, int] | None:
        res = self.meta.get("resolution")
        return (int(res[0]), int(res[1])) if res is not None else None

    def describe(self) -> dict[str, Any]:
        """What results.json records about the reference."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, **self.meta}


def _check_mu_sigma(mu: Any, sigma: Any, source: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise UCGMError(f"{source}: mu/sigma must be numeric arrays, got {mu.dtype} and {sigma.dtype}")
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UCGMError(f"{source}: expected mu [{dim}] and sigma [{dim}, {dim}] (Inception pool3 statistics), "
                        f"got mu {list(mu.shape)} and sigma {list(sigma.shape)}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UCGMError(f"{source}: mu/sigma contain NaN or infinite values")
    scale = max(float(np.abs(sigma).max()), 1e-30)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise UCGMError(f"{source}: sigma is not symmetric, so it is not a covariance matrix")
    return mu, sigma


_META_KEYS = ("num_images", "resolution", "evaluator", "evaluator_version", "inception_weights_sha256")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UCGMError(f"{path}: not a readable .npz file ({err})") from None
    with data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            hint = " (this looks like a sample batch: build statistics with `ucgm eval ref`)" if "arr_0" in keys else ""
            raise UCGMError(f"{path}: no reference statistics: expected keys 'mu' and 'sigma' "
                            f"(ADM / pytorch-fid format), found {', '.join(sorted(keys)) or 'none'}{hint}")
        try:
            mu, sigma = data["mu"], data["sigma"]
            meta: dict[str, Any] = {}
            for key in _META_KEYS:
                if key in keys:
                    value = data[key]
                    meta[key] = value.tolist() if value.ndim else value.item()
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise UCGMError(f"{path}: corrupted .npz ({err})") from None
    fmt = "ucgm-eval-ref" if "evaluator" in meta else "adm-npz"
    return mu, sigma, meta, fmt


def _numpy_safe_globals() -> list[Any]:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]

    out: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType") if hasattr(dtypes, n)]
    return out


def _read_torch_fidelity(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    obj = safe_load(path, "torch-fidelity statistics file", _numpy_safe_globals())
    if not isinstance(obj, Mapping) or not {"mu", "sigma"} <= set(obj):
        found = ", ".join(sorted(map(str, obj))) if isinstance(obj, Mapping) else type(obj).__name__
        raise UCGMError(f"{path}: no reference statistics: expected a dict with 'mu' and 'sigma' "
                        f"(torch-fidelity's *-stat-fid-2048.pt), found {found}")
    mu, sigma = obj["mu"], obj["sigma"]
    if isinstance(mu, torch.Tensor):
        mu = mu.double().numpy()
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.double().numpy()
    return np.asarray(mu), np.asarray(sigma), {}, "torch-fidelity"


def _read_edm2_pickle(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], str]:
    """EDM2's dataset refs (calculate_metrics.py save_stats): pickle of {num_images, fid: {mu, sigma}, ...}."""
    obj = read_pickle(path)  # restricted: numpy arrays and plain containers only, never code
    fid = obj.get("fid") if isinstance(obj, Mapping) else None
    if not isinstance(fid, Mapping) or not {"mu", "sigma"} <= set(fid):
        found = ", ".join(sorted(map(str, obj))) if isinstance(obj, Mapping) else type(obj).__name__
        raise UCGMError(f"{path}: no reference statistics: expected EDM2's {{'fid': {{'mu', 'sigma'}}}} "
                        f"(dataset-refs/img512.pkl), found {found}")
    meta = {"num_images": int(obj["num_images"])} if isinstance(obj.get("num_images"), (int, np.integer)) else {}
    return np.asarray(fid["mu"]), np.asarray(fid["sigma"]), meta, "edm2-pkl"


def load_reference(path: str | Path, dim: int = FEATURE_DIM) -> ReferenceStats:
    """Read and validate reference statistics (.npz with mu/sigma, torch-fidelity's .pt, EDM2's .pkl)."""
    path = Path(path)
    if not path.is_file():
        raise UCGMError(f"--ref {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        mu, sigma, meta, fmt = _read_edm2_pickle(path)
        mu, sigma = _check_mu_sigma(mu, sigma, str(path), dim)
        return ReferenceStats(mu=mu, sigma=sigma, path=str(path), sha256=sha256_file(path), format=fmt, meta=meta)
    if not head.startswith(b"PK"):
        raise UCGMError(f"{path}: not an .npz (zip) file, a torch-fidelity .pt or an EDM2 .pkl statistics file")
    try:
        with zipfile.ZipFile(path) as zf:
            is_npz = any(name.endswith(".npy") for name in zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise UCGMError(f"--ref {path}: not a readable .npz / .pt file (truncated or corrupted?): "
                        f"{one_line(err)}") from None
    reader = _read_npz if is_npz else _read_torch_fidelity
    mu, sigma, meta, fmt = reader(path)
    mu, sigma = _check_mu_sigma(mu, sigma, str(path), dim)
    return ReferenceStats(mu=mu, sigma=sigma, path=str(path), sha256=sha256_file(path), format=fmt, meta=meta)


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> None:
    """Write mu/sigma (float64) plus metadata as an .npz readable by the ADM evaluator and pytorch-fid."""
    arrays: dict[str, Any] = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    for key, value in meta.items():
        arrays[key] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_file_atomic(Path(path), buffer.getvalue())
