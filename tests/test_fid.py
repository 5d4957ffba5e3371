"""Frechet distance, float64 statistics, Inception Score and reference files (no Inception network here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_features_to_metric

from ucgm_convert.errors import UCGMError
from ucgm_convert.metrics.fid import (
    FeatureStats,
    frechet_distance,
    inception_score,
    load_reference,
    save_reference,
)


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The ADM evaluator's / pytorch-fid's formula: scipy.linalg.sqrtm of sigma1 @ sigma2."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.abs(rng.normal(size=(n, d)) @ mixing + shift)  # non-negative, correlated, like pool3 features


@pytest.mark.parametrize("n,d", [(600, 64), (300, 256)])
def test_matches_scipy_sqrtm_on_full_rank_covariances(n: int, d: int) -> None:
    a, b = stats(features(n, d, 0)), stats(features(n, d, 1, shift=0.3))
    got, want = frechet_distance(*a, *b), scipy_fid(*a, *b)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert frechet_distance(*b, *a) == pytest.approx(got, rel=1e-10)


def test_matches_scipy_and_torch_fidelity_on_rank_deficient_covariances() -> None:
    """Fewer samples than dimensions (as with a small --num): singular covariances."""
    a, b = stats(features(40, 128, 2)), stats(features(50, 128, 3, shift=0.1))
    got = frechet_distance(*a, *b)
    assert got == pytest.approx(scipy_fid(*a, *b), rel=1e-6)
    tf = fid_statistics_to_metric({"mu": a[0], "sigma": a[1]}, {"mu": b[0], "sigma": b[1]}, verbose=False)
    assert got == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)


def test_identical_statistics_give_zero_and_known_closed_form() -> None:
    a = stats(features(500, 64, 4))
    assert abs(frechet_distance(*a, *a)) < 1e-9 * np.trace(a[1])
    few = stats(features(10, 512, 5))  # rank 9 in 512 dimensions: still ~0, not round-off noise
    assert abs(frechet_distance(*few, *few)) < 1e-10 * np.trace(few[1])
    # N(m1, s1 I) vs N(m2, s2 I): |m1-m2|^2 + d (sqrt(s1) - sqrt(s2))^2
    d, m1, m2 = 16, np.zeros(16), np.full(16, 0.5)
    assert frechet_distance(m1, 4.0 * np.eye(d), m2, 9.0 * np.eye(d)) == pytest.approx(d * 0.25 + d * 1.0, rel=1e-12)


def test_low_rank_factor_path_equals_the_eigendecomposition_path() -> None:
    """FeatureStats.factor() (n <= d: sigma = B B^T from the rows) gives the same distance, without a d x d eigh."""
    x = features(12, 256, 10)
    acc = FeatureStats(256)
    acc.update(x[:5])
    acc.update(x[5:])
    mu, sigma = acc.mu_sigma()
    b = acc.factor()
    assert b.shape == (256, 12)
    np.testing.assert_allclose(b @ b.T, sigma, rtol=1e-10, atol=1e-12)
    ref = stats(features(400, 256, 11, shift=0.2))
    got = frechet_distance(mu, sigma, *ref, factor1=b)
    assert got == pytest.approx(frechet_distance(mu, sigma, *ref), rel=1e-10)
    assert got == pytest.approx(scipy_fid(mu, sigma, *ref), rel=1e-6)
    assert abs(frechet_distance(mu, sigma, mu, sigma, factor1=b)) < 1e-10 * np.trace(sigma)
    acc.update(features(300, 256, 12))  # more rows than dimensions: no factor kept
    assert acc.factor() is None and acc.rows is None


def test_feature_stats_are_float64_and_batching_independent() -> None:
    x = (features(300, 32, 6) + 1000.0).astype(np.float32)  # large offset: float32 sums would lose digits
    mu_ref, sigma_ref = stats(x.astype(np.float64))
    for split in ([300], [1, 299], [7] * 42 + [6]):
        acc, start = FeatureStats(32), 0
        for size in split:
            acc.update(x[start:start + size])
            start += size
        mu, sigma = acc.mu_sigma()
        assert mu.dtype == sigma.dtype == np.float64 and acc.n == 300
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-13)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-7, atol=1e-9 * np.abs(sigma_ref).max())
        assert np.array_equal(sigma, sigma.T)
    with pytest.raises(UCGMError, match=r"expected \[N, 32\]"):
        FeatureStats(32).update(np.zeros((3, 31)))


def test_inception_score_is_torch_fidelitys() -> None:
    logits = np.random.default_rng(7).normal(size=(100, 1008)).astype(np.float32) * 3
    want = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    assert inception_score(logits) == (want["inception_score_mean"], want["inception_score_std"])
    assert inception_score(np.zeros((20, 1008), np.float32))[0] == pytest.approx(1.0)  # uniform p(y|x)
    with pytest.raises(UCGMError, match="at least 10 samples"):
        inception_score(logits[:5])


# ----- reference files ---------------------------------------------------------------------------

def ref_stats(d: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    a = rng.normal(size=(d, 8))
    return rng.normal(size=d), a @ a.T + 0.01 * np.eye(d)


def test_reads_adm_reference_batches_and_our_own(tmp_path: Path) -> None:
    mu, sigma = ref_stats()
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"  # ADM layout: images + pool and spatial statistics
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:10], sigma_s=sigma[:10, :10])
    ref = load_reference(adm)
    assert ref.format == "adm-npz" and ref.resolution is None and len(ref.sha256) == 64
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    ours = tmp_path / "ours.npz"
    save_reference(ours, mu.astype(np.float32), sigma, num_images=12, resolution=[8, 8], evaluator="torch-fidelity",
                   evaluator_version="0.4.0", inception_weights_sha256="ab" * 32)
    ref = load_reference(ours)
    assert ref.format == "ucgm-eval-ref" and ref.resolution == (8, 8) and ref.mu.dtype == np.float64
    assert ref.describe()["num_images"] == 12 and ref.describe()["evaluator"] == "torch-fidelity"
    with np.load(ours) as data:  # what pytorch-fid / the ADM evaluator read
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (2048, 2048)


def test_reads_torch_fidelity_statistics(tmp_path: Path) -> None:
    stat = fid_features_to_statistics(torch.from_numpy(features(30, 2048, 9).astype(np.float32)))
    path = tmp_path / "input1-inception-v3-compat-stat-fid-2048.pt"
    torch.save(stat, path)  # how torch-fidelity caches statistics
    ref = load_reference(path)
    assert ref.format == "torch-fidelity"
    np.testing.assert_array_equal(ref.mu, stat["mu"])
    np.testing.assert_array_equal(ref.sigma, stat["sigma"])


def test_reads_edm2_dataset_refs(tmp_path: Path) -> None:
    import pickle

    mu, sigma = ref_stats()
    path = tmp_path / "img512.pkl"
    with open(path, "wb") as f:  # calculate_metrics.py save_stats: a plain pickle of numpy statistics
        pickle.dump({"num_images": 1281167, "fid": {"mu": mu, "sigma": sigma},
                     "fd_dinov2": {"mu": mu[:1024], "sigma": sigma[:1024, :1024]}}, f)
    ref = load_reference(path)
    assert ref.format == "edm2-pkl" and ref.meta == {"num_images": 1281167}
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma)
    with open(path, "wb") as f:
        pickle.dump({"fid": {"mu": mu}, "x": Evil()}, f)
    with pytest.raises(UCGMError, match="refused to unpickle global"):
        load_reference(path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case,message", [
    ("no_keys", "expected keys 'mu' and 'sigma'"),
    ("sample_batch", "looks like a sample batch"),
    ("wrong_dim", r"expected mu \[2048\] and sigma \[2048, 2048\].*got mu \[64\]"),
    ("nan", "NaN or infinite"),
    ("asymmetric", "not symmetric"),
    ("not_zip", "not an .npz"),
    ("missing", "no such file"),
    ("pickled_code", "refused to load"),
    ("pt_without_keys", "expected a dict with 'mu' and 'sigma'"),
])
def test_bad_reference_files_are_clear_errors(tmp_path: Path, case: str, message: str) -> None:
    mu, sigma = ref_stats()
    path = tmp_path / "ref.npz"
    if case == "no_keys":
        np.savez(path, m=mu, s=sigma)
    elif case == "sample_batch":
        np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.zeros(2))
    elif case == "wrong_dim":
        small = ref_stats(64)
        np.savez(path, mu=small[0], sigma=small[1])
    elif case == "nan":
        mu[3] = np.nan
        np.savez(path, mu=mu, sigma=sigma)
    elif case == "asymmetric":
        sigma[0, 1] += 1.0
        np.savez(path, mu=mu, sigma=sigma)
    elif case == "not_zip":
        path.write_bytes(b"hello")
    elif case == "pickled_code":
        path = tmp_path / "stats.pt"
        torch.save({"mu": mu, "sigma": sigma, "x": Evil()}, path)
    elif case == "pt_without_keys":
        path = tmp_path / "stats.pt"
        torch.save({"mean": torch.zeros(3)}, path)
    with pytest.raises(UCGMError, match=message) as info:
        load_reference(path)
    assert "\n" not in str(info.value)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(UCGMError, match="mu shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UCGMError, match="sigma shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_statistics_and_distance_do_not_depend_on_blas_threads() -> None:
    """Multi-threaded BLAS changes eigh's last bits with the thread count (checked first, on this machine);
    our float64 statistics and Frechet distance give the same bits under any thread limit."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((900, 1024)) * 2 + 0.5, rng.standard_normal((700, 1024))
    with threadpool_limits(1):
        one = np.linalg.eigvalsh(a.T @ a)
    with threadpool_limits(4):
        many = np.linalg.eigvalsh(a.T @ a)
    if np.array_equal(one, many):
        pytest.skip("this machine's BLAS gives the same bits on any thread count: nothing to guard against here")

    def distance() -> float:
        sa, sb = FeatureStats(1024), FeatureStats(1024)
        sa.update(a[:400])
        sa.update(a[400:])
        sb.update(b)
        return frechet_distance(*sa.mu_sigma(), *sb.mu_sigma())

    values = []
    for threads in (1, 2, 4):
        with threadpool_limits(threads):
            values.append(distance())
    assert values[0] == values[1] == values[2], values
