"""A direct Frechet distance for tests: numpy statistics and an SVD, independent of ucgm_convert.fid."""

from __future__ import annotations

import numpy as np


def direct_fd_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """ADM's statistics (np.mean, np.cov) and the Frechet distance, with tr((S1 S2)^(1/2)) taken directly.

    With centered rows X, Y: S1 S2 = X^T X Y^T Y / c has the non-zero eigenvalues of (X Y^T)(X Y^T)^T / c,
    so tr((S1 S2)^(1/2)) = sum of singular values of X Y^T / sqrt(c), c = (n1 - 1)(n2 - 1). Exact for any
    n1, n2 (also when both are below the dimension, where a d x d sqrtm is slow and noise-dominated).
    """
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_covmean = np.linalg.svd((x - mu1) @ (y - mu2).T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
