"""sFID (Nash et al. 2021) features as the ADM evaluator takes them, from torch-fidelity's Inception port.

Evidence for which layer and which element order:
- ADM (openai/guided-diffusion evaluations/evaluator.py L23-24, L586-600): FID_SPATIAL_NAME =
  "mixed_6/conv:0" is fetched from classify_image_graph_def.pb (the 2015-12-05 Inception graph)
  next to "pool_3:0", then `spatial = spatial[..., :7]` on that NHWC [N, 17, 17, 192] tensor and
  `spatial_pred.reshape([N, -1])` (L158): element (h, w, c) sits at index (h * 17 + w) * 7 + c,
  N x 7 x 17 x 17 = 2023 values. Its statistics are numpy mean / np.cov (L174-177), compared with
  the same Frechet distance as FID (L57); reference batches store them as mu_s / sigma_s (L168-171).
- Graph node names: the ops of one conv layer in that graph are `<scope>/conv2d_params` (Const),
  `<scope>/Conv2D`, `<scope>/batchnorm/{beta,gamma,moving_mean,moving_variance}` (Const),
  `<scope>/batchnorm` (BatchNormWithGlobalNormalization), `<scope>/CheckNumerics`,
  `<scope>/control_dependency` and finally `<scope>` itself (graph op listing of
  classify_image_graph_def.pb, e.g. "conv/Conv2D", "conv/batchnorm", "conv/CheckNumerics",
  "conv/control_dependency", "conv"). The only op that can be the ReLU is the bare `<scope>`, so
  "mixed_6/conv:0" is ReLU(BN(Conv2D(x))): the post-activation output of the 1x1 branch, NOT the
  raw convolution (that would be "mixed_6/conv/Conv2D:0").
- Which PyTorch module: torch-fidelity's converter (toshas/torch-fidelity
  utils/util_convert_inception_weights.py L137-138) maps "mixed_6/conv/conv2d_params" to
  Mixed_6d.branch1x1.conv and "mixed_6/conv/batchnorm" to Mixed_6d.branch1x1.bn (TF mixed,
  mixed_1, mixed_2 = Mixed_5b-d; mixed_3 = Mixed_6a; mixed_4..7 = Mixed_6b..e; mixed_8 = Mixed_7a;
  mixed_9, mixed_10 = Mixed_7b, 7c). BasicConv2d.forward returns relu(bn(conv(x))), so the output
  of the module Mixed_6d.branch1x1 is that tensor, [N, 192, 17, 17] NCHW. The converter permutes
  conv weights (3, 2, 0, 1) and keeps output-channel order, so TF channel c is PyTorch channel c.
- So ADM's vector is x[:, :7].permute(0, 2, 3, 1).reshape(N, 2023) of that module's output.
  The Frechet distance is invariant under one permutation applied to both sets' coordinates, but
  our statistics are compared with ADM's stored mu_s / sigma_s, so the order must be ADM's.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UCGMError
from .inception import InceptionFeatures

SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF "mixed_6/conv:0"
SPATIAL_CHANNELS = 7
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_GRID * SPATIAL_GRID  # 2023


def spatial_features(branch: torch.Tensor) -> torch.Tensor:
    """ADM's `mixed_6/conv[..., :7]` flattened in NHWC order: element (h, w, c) at (h * 17 + w) * 7 + c."""
    if branch.ndim != 4 or branch.shape[1] < SPATIAL_CHANNELS or tuple(branch.shape[2:]) != (SPATIAL_GRID,) * 2:
        raise UCGMError(f"sFID layer: expected [N, >= {SPATIAL_CHANNELS}, {SPATIAL_GRID}, {SPATIAL_GRID}], "
                        f"got {list(branch.shape)}")
    return branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(branch), SPATIAL_DIM)


@dataclass
class InceptionWithSpatial:
    """uint8 [N, H, W, 3] -> pool [N, 2048], logits [N, 1008], spatial [N, 2023], float32, from ONE forward.

    A forward hook on Mixed_6d.branch1x1 (registered for the call only) copies the sFID slice
    while InceptionFeatures runs its usual forward; the network itself is unchanged.
    """

    inception: InceptionFeatures

    def __call__(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        captured: list[torch.Tensor] = []
        layer = self.inception.network.get_submodule(SPATIAL_LAYER)
        handle = layer.register_forward_hook(lambda _module, _inputs, out: captured.append(spatial_features(out)))
        try:
            pool, logits = self.inception(images)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise UCGMError(f"sFID: the Inception forward ran {SPATIAL_LAYER} {len(captured)} times, expected once")
        return pool, logits, captured[0].cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What results.json records about the evaluator (the Inception record plus the sFID layer)."""
        return {**self.inception.describe(),
                "sfid_features": (f"{SPATIAL_DIM} = TF mixed_6/conv:0 (= {SPATIAL_LAYER} output, after BN and "
                                  f"ReLU), channels 0..6, flattened NHWC as the ADM evaluator")}


def read_adm_spatial_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mu_s [2023] and sigma_s [2023, 2023] (float64) of an ADM reference batch (VIRTUAL_imagenet256_labeled.npz)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"mu_s", "sigma_s"} <= set(data.files):
                raise UCGMError(f"{path}: no sFID statistics: expected keys 'mu_s' and 'sigma_s' (ADM reference "
                                f"batch), found {', '.join(sorted(data.files)) or 'none'}")
            mu, sigma = np.asarray(data["mu_s"], np.float64), np.asarray(data["sigma_s"], np.float64)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UCGMError(f"{path}: not a readable .npz file ({err})") from None
    if mu.shape != (SPATIAL_DIM,) or sigma.shape != (SPATIAL_DIM, SPATIAL_DIM):
        raise UCGMError(f"{path}: expected mu_s [{SPATIAL_DIM}] and sigma_s [{SPATIAL_DIM}, {SPATIAL_DIM}], "
                        f"got {list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UCGMError(f"{path}: mu_s/sigma_s contain NaN or infinite values")
    return mu, sigma
