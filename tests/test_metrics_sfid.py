"""sFID features: the hooked Mixed_6d.branch1x1 slice, ADM's NHWC layout, and sFID against a direct computation.

The Inception network is torch-fidelity's port with random conv weights AND random batch-norm
statistics (so pre- and post-BN / ReLU tensors differ clearly), saved as a weights file and
loaded the way users load theirs. One thread: Inception runs ~10x slower with 2 here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frechet_direct import direct_fd_low_rank
from torch_fidelity.interpolate_compat_tensorflow import (
    interpolate_bilinear_2d_like_tensorflow1x,
)

from ucgm_convert.errors import UCGMError
from ucgm_convert.metrics import frechet_from_stats
from ucgm_convert.metrics.fid import FeatureStats
from ucgm_convert.metrics.inception import build_network, load_inception
from ucgm_convert.metrics.sfid import (
    SPATIAL_DIM,
    InceptionWithSpatial,
    read_adm_spatial_stats,
    spatial_features,
)

STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c")  # up to Mixed_6d's input


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = build_network(None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=g))
                module.bias.copy_(0.2 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(net.state_dict(), path)
    return path


def images(n: int, seed: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_hooked_tensor_is_mixed_6d_1x1_conv_bn_relu_recomputed_by_hand(weights: Path) -> None:
    inception = load_inception(weights)
    net = inception.network
    x = images(2, seed=1)
    pool, logits, spatial = InceptionWithSpatial(inception)(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, SPATIAL_DIM)
    want_pool, want_logits = inception(x)  # the hook changes nothing else in the forward
    np.testing.assert_array_equal(pool, want_pool)
    np.testing.assert_array_equal(logits, want_logits)

    with torch.no_grad():  # torch-fidelity's input pipeline, then the stem up to Mixed_6d's input
        h = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        h = (interpolate_bilinear_2d_like_tensorflow1x(h, size=(299, 299), align_corners=False) - 128) / 128
        for name in STEM:
            h = getattr(net, name)(h)
        assert h.shape == (2, 768, 17, 17)
        branch = net.Mixed_6d.branch1x1
        conv = F.conv2d(h, branch.conv.weight)  # TF mixed_6/conv/Conv2D: 1x1, no bias
        bn = branch.bn
        post = torch.relu((conv - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-3)
                          * bn.weight[:, None, None] + bn.bias[:, None, None])  # batchnorm (eps 0.001), then ReLU
    nhwc = post.numpy().transpose(0, 2, 3, 1)  # TF layout [N, 17, 17, 192]
    want = nhwc[..., :7].reshape(2, -1)  # ADM: spatial[..., :7], then reshape([N, -1])
    np.testing.assert_allclose(spatial, want, rtol=1e-4, atol=1e-5)
    raw = conv.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)
    assert np.abs(spatial - raw).max() > 0.1  # not the raw convolution
    assert spatial.min() == 0.0 and (spatial == 0).mean() > 0.05  # post-ReLU


def test_layout_is_adms_nhwc_slice_and_flatten() -> None:
    n, c, h, w = 2, 192, 17, 17
    t = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    got = spatial_features(t).numpy()
    want = t.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(n, -1)
    np.testing.assert_array_equal(got, want)
    for hh, ww, cc in [(0, 0, 1), (3, 5, 6), (16, 16, 0)]:  # element (h, w, c) at (h * 17 + w) * 7 + c
        assert got[1, (hh * 17 + ww) * 7 + cc] == t[1, cc, hh, ww]
    with pytest.raises(UCGMError, match=r"expected \[N, >= 7, 17, 17\]"):
        spatial_features(torch.zeros(1, 192, 8, 8))


def spatial_like(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    basis = np.random.default_rng(0).normal(size=(40, SPATIAL_DIM))  # both sets: the same correlations
    return np.maximum(np.random.default_rng(seed).normal(size=(n, 40)) @ basis / 6 + shift, 0.0)  # ReLU-like


def test_sfid_matches_a_direct_computation_and_ignores_a_common_permutation() -> None:
    samples, reference = spatial_like(90, 2), spatial_like(120, 3, shift=0.05)
    stats = FeatureStats(SPATIAL_DIM)
    for part in np.array_split(samples.astype(np.float32), 4):
        stats.update(part)
    ref_mu, ref_sigma = reference.mean(axis=0), np.cov(reference, rowvar=False)
    got = frechet_from_stats(stats, ref_mu, ref_sigma)
    want = direct_fd_low_rank(samples.astype(np.float32).astype(np.float64), reference)
    assert got == pytest.approx(want, rel=1e-8)
    perm = np.random.default_rng(4).permutation(SPATIAL_DIM)  # FD is invariant to one order for both sets...
    permuted = FeatureStats(SPATIAL_DIM)
    permuted.update(samples.astype(np.float32)[:, perm])
    assert frechet_from_stats(permuted, ref_mu[perm], ref_sigma[np.ix_(perm, perm)]) == pytest.approx(got, rel=1e-8)
    assert frechet_from_stats(permuted, ref_mu, ref_sigma) > 2 * got  # ...but not to mixing two orders


def test_reads_mu_s_sigma_s_of_an_adm_reference_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(SPATIAL_DIM, 4))
    mu_s, sigma_s = rng.normal(size=SPATIAL_DIM), a @ a.T
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=mu_s.astype(np.float32), sigma_s=sigma_s)
    mu, sigma = read_adm_spatial_stats(path)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (SPATIAL_DIM, SPATIAL_DIM)
    np.testing.assert_array_equal(mu, mu_s.astype(np.float32))
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(UCGMError, match="expected keys 'mu_s' and 'sigma_s'.*found mu, sigma"):
        read_adm_spatial_stats(path)
    np.savez(path, mu_s=np.zeros(10), sigma_s=np.eye(10))
    with pytest.raises(UCGMError, match=r"expected mu_s \[2023\]"):
        read_adm_spatial_stats(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(UCGMError, match="not a readable .npz"):
        read_adm_spatial_stats(path)
