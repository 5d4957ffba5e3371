"""An analytic Gaussian mixture whose exact network output is known for every transport.

Data x ~ sum_k w_k N(m_k, diag(s_k^2)) in d dimensions, noise z ~ N(0, I), and the transport's
x_t = a z + g x (a = alpha_in(t), g = gamma_in(t)). Given component k, x_t ~ N(g m_k, v_k) with
v_k = g^2 s_k^2 + a^2 (per dimension), so the posterior over components is

    r_k(x_t) = softmax_k( log w_k + log N(x_t; g m_k, v_k) )

and the posterior means are (Gaussian conditioning, per dimension)

    E[x | x_t, k] = m_k + g s_k^2 / v_k (x_t - g m_k),     E[z | x_t, k] = a / v_k (x_t - g m_k)
    x_hat = sum_k r_k E[x | x_t, k],                      z_hat = sum_k r_k E[z | x_t, k]

(a z_hat + g x_hat = x_t holds exactly). The exact minimiser of the network's regression loss is
F = alpha_to z_hat + gamma_to x_hat, so a sampler driven by it is measured without model error.
With a class label y = k the data are the k-th component alone (y = K, the null class: the mixture),
so classifier-free guidance can be exercised. Everything is computed elementwise in float64, so a
row's output never depends on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .metrics.fid import frechet_distance
from .transports import Transport, get_transport


@dataclass(frozen=True)
class GaussianMixture:
    """A diagonal Gaussian mixture: weights [K], means [K, d], stds [K, d] (float64), and a transport.

    Calling it as `model_fn(x_t, t, y=None)` returns the exact network output F in x_t's dtype.
    """

    weights: Tensor
    means: Tensor
    stds: Tensor
    transport: Transport

    @classmethod
    def random(
        cls, dim: int = 16, components: int = 8, seed: int = 0, transport: str | Transport = "Linear",
        spread: float = 1.0, std_range: tuple[float, float] = (0.05, 0.4),
    ) -> GaussianMixture:
        """A seeded mixture: means ~ N(0, spread^2), stds ~ U(std_range), weights ~ Dirichlet(1) + 0.5/K."""
        if not 1 <= dim <= 4096 or not 1 <= components <= 1024:
            raise ValueError(f"dim must be in 1..4096 and components in 1..1024, got {dim}, {components}")
        g = torch.Generator().manual_seed(int(seed))
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)
        w = -torch.log(torch.rand(components, generator=g, dtype=torch.float64)) + 0.5 / components
        return cls(w / w.sum(), means, stds, get_transport(transport))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_classes(self) -> int:
        """One class per component; label `num_classes` is the null class (the whole mixture)."""
        return int(self.means.shape[0])

    @property
    def null_class(self) -> int:
        return self.num_classes

    def posterior(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x_hat, z_hat) = (E[x | x_t], E[z | x_t]) in float64; t is [B] or a scalar, y [B] labels."""
        x = x_t.to(torch.float64).reshape(x_t.shape[0], 1, -1)  # [B, 1, d]
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        a, g = self.transport.alpha_in(t), self.transport.gamma_in(t)
        m, s2 = self.means.to(x.device)[None], self.stds.to(x.device)[None] ** 2  # [1, K, d]
        v = g * g * s2 + a * a
        resid = x - g * m  # [B, K, d]
        log_r = torch.log(self.weights.to(x.device))[None] - 0.5 * (resid * resid / v + torch.log(v)).sum(-1)
        if y is not None:
            y = torch.as_tensor(y, device=x.device).reshape(-1)
            if bool(((y < 0) | (y > self.num_classes)).any()):
                raise ValueError(f"labels must be in 0..{self.num_classes} (the last is the null class)")
            own = torch.arange(self.num_classes, device=x.device)[None] == y[:, None]
            only = (y < self.num_classes)[:, None]
            log_r = torch.where(only & ~own, torch.full_like(log_r, -torch.inf), log_r)
        r = torch.softmax(log_r, dim=1)[..., None]  # [B, K, 1]
        x_hat = (r * (m + g * s2 / v * resid)).sum(1)
        z_hat = (r * (a / v * resid)).sum(1)
        return x_hat.reshape(x_t.shape), z_hat.reshape(x_t.shape)

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The exact network output F = alpha_to(t) z_hat + gamma_to(t) x_hat, in x_t's dtype."""
        x_hat, z_hat = self.posterior(x_t, t, y)
        tt = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape((-1,) + (1,) * (x_t.ndim - 1))
        f = self.transport.alpha_to(tt) * z_hat + self.transport.gamma_to(tt) * x_hat
        return f.to(x_t.dtype)

    def sample(self, n: int, seed: int = 0, y: Tensor | None = None) -> Tensor:
        """n exact draws (float64) from the mixture, or from component y[i] for row i (y = K: the mixture)."""
        g = torch.Generator().manual_seed(int(seed))
        picked = torch.multinomial(self.weights, n, replacement=True, generator=g)
        if y is not None:
            y = torch.as_tensor(y).reshape(-1)
            picked = torch.where(y < self.num_classes, y, picked)
        eps = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.means[picked] + self.stds[picked] * eps

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The exact mean [d] and covariance [d, d] of the mixture (float64 numpy)."""
        w, m, s2 = self.weights.numpy(), self.means.numpy(), self.stds.numpy() ** 2
        mu = w @ m
        second = np.einsum("k,ki,kj->ij", w, m, m) + np.diag(w @ s2)
        return mu, second - np.outer(mu, mu)

    def frechet_to_truth(self, samples: Tensor) -> float:
        """Frechet distance between the samples' Gaussian fit and the mixture's exact moments."""
        mu, sigma = sample_moments(samples)
        return frechet_distance(mu, sigma, *self.moments())


def sample_moments(samples: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n-1)-normalised covariance of samples [n, d], in float64 numpy."""
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64).cpu().numpy()
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples for a covariance")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet(a: Tensor, b: Tensor) -> float:
    """Frechet distance between the Gaussian fits of two sample sets [n, d] (float64)."""
    return frechet_distance(*sample_moments(a), *sample_moments(b))


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 in 1-D.

    Each 1-D W2^2 compares the two empirical quantile functions on a common grid of
    max(n_a, n_b) levels (sorted projections, linearly interpolated), in float64.
    """
    a = a.detach().reshape(a.shape[0], -1).to(torch.float64).cpu()
    b = b.detach().reshape(b.shape[0], -1).to(torch.float64).cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    g = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    levels = (torch.arange(max(a.shape[0], b.shape[0]), dtype=torch.float64) + 0.5) / max(a.shape[0], b.shape[0])
    qa, qb = _quantiles((a @ dirs).sort(0).values, levels), _quantiles((b @ dirs).sort(0).values, levels)
    return float(((qa - qb) ** 2).mean().sqrt())


def _quantiles(sorted_x: Tensor, levels: Tensor) -> Tensor:
    """Linear interpolation of sorted columns [n, P] at quantile levels in (0, 1) -> [L, P]."""
    n = sorted_x.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo)[:, None]
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac
