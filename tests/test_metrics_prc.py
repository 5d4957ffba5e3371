"""Precision / recall (ADM evaluator definition) against a direct O(N^2) scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch_fidelity.metric_prc import prc_features_to_metric

from ucgm_convert.errors import UCGMError
from ucgm_convert.metrics.precision_recall import knn_radii, precision_recall


def direct(reference: np.ndarray, samples: np.ndarray, k: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """ADM's ManifoldEstimator written out: full squared-distance matrices, sort, k-th column, `<=`, any."""
    radii_r = np.sort(cdist(reference, reference, "sqeuclidean"), axis=1)[:, k]
    radii_g = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, k]
    d = cdist(samples, reference, "sqeuclidean")  # [G, R]
    precision = float((d <= radii_r[None, :]).any(axis=1).mean())
    recall = float((radii_g[None, :] >= d.T).any(axis=1).mean())
    return precision, recall, radii_r, radii_g


def clouds(n_ref: int, n_gen: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    ref = np.abs(rng.normal(size=(n_ref, d)) @ mixing)
    gen = np.abs(0.8 * rng.normal(size=(n_gen, d)) @ mixing + 0.2)  # overlapping, narrower, shifted
    return ref.astype(np.float32), gen.astype(np.float32)


@pytest.mark.parametrize("n_ref,n_gen,d,k", [(40, 25, 8, 1), (300, 250, 32, 3), (120, 333, 64, 5), (9, 6, 3, 3)])
def test_matches_the_direct_computation(n_ref: int, n_gen: int, d: int, k: int) -> None:
    ref, gen = clouds(n_ref, n_gen, d, seed=n_ref + k)
    want_p, want_r, radii_r, radii_g = direct(ref.astype(np.float64), gen.astype(np.float64), k)
    got = precision_recall(ref, gen, k=k, block=32)
    assert (got.precision, got.recall) == (want_p, want_r)
    assert 0.0 < got.precision < 1.0 or n_ref < 20  # a non-trivial case, not all-in / all-out
    np.testing.assert_allclose(knn_radii(ref, k=k, block=32), radii_r, rtol=1e-10)
    np.testing.assert_allclose(knn_radii(gen, k=k, block=7), radii_g, rtol=1e-10)
    assert (got.k, got.num_reference, got.num_samples) == (k, n_ref, n_gen)


def test_results_do_not_depend_on_the_block_size() -> None:
    ref, gen = clouds(60, 50, 48, seed=3)
    results = {block: precision_recall(ref, gen, block=block) for block in (1, 5, 64, 10_000)}
    assert len(set(results.values())) == 1
    radii = [knn_radii(gen, block=block) for block in (1, 13, 10_000)]
    for r in radii[1:]:
        np.testing.assert_allclose(r, radii[0], rtol=1e-13)


def test_boundary_self_inclusion_and_direction_on_exact_integers() -> None:
    """1-D integers (exact in float64): radius = distance to the k-th OTHER point; `<=` counts the boundary.

    Reference {0, 1, 3} with k=1: squared radii 1, 1, 4. Sample 5 is at squared distance 4 from 3:
    inside only because of `<=`. Sample 100 is outside. Sample radii are 95^2, so all reference
    points are inside the samples' manifold. precision = 1/2, recall = 1.
    """
    ref, gen = np.array([[0.0], [1.0], [3.0]]), np.array([[5.0], [100.0]])
    np.testing.assert_array_equal(knn_radii(ref, k=1), [1.0, 1.0, 4.0])
    got = precision_recall(ref, gen, k=1)
    assert (got.precision, got.recall) == (0.5, 1.0)
    swapped = precision_recall(gen, ref, k=1)  # the roles swap: reference = {5, 100}
    assert (swapped.precision, swapped.recall) == (1.0, 0.5)


def test_duplicates_and_ties_on_an_integer_lattice_match_the_direct_computation() -> None:
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 4, size=(80, 3)).astype(np.float64)  # many duplicates and equal distances
    gen = rng.integers(0, 5, size=(70, 3)).astype(np.float64)
    for k in (1, 3, 6):
        want_p, want_r, radii_r, _ = direct(ref, gen, k)
        got = precision_recall(ref, gen, k=k, block=16)
        assert (got.precision, got.recall) == (want_p, want_r)
        np.testing.assert_array_equal(knn_radii(ref, k=k, block=16), radii_r)


def test_same_definition_as_torch_fidelity() -> None:
    """torch-fidelity 0.4 (float32 Euclidean cdist, generated = features_1) agrees on continuous data."""
    ref, gen = clouds(200, 180, 32, seed=5)
    want = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), prc_neighborhood=3,
                                  prc_batch_size=10_000, save_cpu_ram=True, verbose=False)
    got = precision_recall(ref, gen)
    assert got.precision == pytest.approx(want["precision"], abs=1e-6)
    assert got.recall == pytest.approx(want["recall"], abs=1e-6)
    assert 0.0 < got.recall < got.precision < 1.0


def test_describe_records_definition_k_and_features() -> None:
    record = precision_recall(*clouds(20, 20, 4, seed=6)).describe()
    assert record["k"] == 3 and "pool3" in record["features"] and "k-th nearest" in record["definition"]
    assert {"precision", "recall", "num_reference", "num_samples", "distances"} <= set(record)


@pytest.mark.parametrize("ref,gen,kwargs,message", [
    (np.zeros((10, 4)), np.zeros((10, 5)), {}, "4-d, sample features 5-d"),
    (np.zeros((3, 4)), np.zeros((10, 4)), {}, "reference features has 3 rows"),
    (np.zeros((10, 4)), np.zeros((10, 4)), {"k": 0}, "k must be >= 1"),
    (np.zeros(10), np.zeros((10, 4)), {}, r"expected float features \[N, D\]"),
    (np.full((10, 4), np.nan), np.zeros((10, 4)), {}, "NaN or infinite"),
])
def test_bad_input_is_a_one_line_error(ref: np.ndarray, gen: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(UCGMError, match=message) as info:
        precision_recall(ref, gen, **kwargs)
    assert "\n" not in str(info.value)
