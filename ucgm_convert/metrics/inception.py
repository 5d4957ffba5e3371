"""torch-fidelity's InceptionV3 (the TF 2015-12-05 FID network ported to PyTorch) as a feature extractor.

Input: uint8 images [N, H, W, 3] at the evaluation resolution; the network resizes them to
299x299 itself with torch-fidelity's TF1-compatible bilinear interpolation (as the ADM
evaluator's TF graph does), so images are never resized before it.
Output: '2048' pool3 features (FID) and 'logits_unbiased' (Inception Score), float32.

Weights (the order they are looked for):
1. `--inception-weights PATH` (the `weights_path` argument);
2. the environment variable UCGM_INCEPTION_WEIGHTS;
3. torch-fidelity's download cache, `torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth`
   (= $TORCH_HOME/hub/checkpoints/..., ~/.cache/torch/hub/checkpoints/... by default);
4. a download from torch-fidelity's release URL into that cache (skipped when HF_HUB_OFFLINE=1
   or UCGM_OFFLINE=1); if that fails, the error says which file to place where.
Files are read with torch.load(weights_only=True) first, so a weights file cannot run code.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UCGMError
from ..formats.torch_files import safe_load
from ..foundation import sha256_file

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}"
WEIGHTS_ENV = "UCGM_INCEPTION_WEIGHTS"
OFFLINE_ENVS = ("UCGM_OFFLINE", "HF_HUB_OFFLINE")
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registered name for this network
FEATURES = ("2048", "logits_unbiased")
DOWNLOAD_TIMEOUT_S = 60


def cache_path() -> Path:
    """Where torch-fidelity's own download (torch.hub.load_state_dict_from_url) keeps the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


def _missing_message(reason: str) -> str:
    return (f"Inception weights: {reason}. Download {WEIGHTS_URL} on a machine with internet and place "
            f"the file {WEIGHTS_FILENAME} at {cache_path()} (torch-fidelity's cache; set TORCH_HOME to move it), "
            f"or pass --inception-weights PATH, or set {WEIGHTS_ENV}=PATH")


def resolve_weights(weights_path: str | Path | None = None) -> Path:
    """The weights file to use: explicit path, $UCGM_INCEPTION_WEIGHTS, torch-fidelity's cache, or a download."""
    explicit = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        origin = "--inception-weights" if weights_path is not None else WEIGHTS_ENV
        if not path.is_file():
            raise UCGMError(f"{origin} {path}: no such file (expected torch-fidelity's {WEIGHTS_FILENAME})")
        return path
    cached = cache_path()
    if cached.is_file():
        return cached
    if _offline():
        raise UCGMError(_missing_message(f"{cached} does not exist and downloads are off "
                                         f"({'/'.join(OFFLINE_ENVS)} is set)"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)  # temp file + rename
    except Exception as err:  # URLError, timeouts, HTTP errors: all mean "not downloadable here"
        raise UCGMError(_missing_message(f"{cached} does not exist and the download failed "
                                         f"({type(err).__name__}: {err})")) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a torch-fidelity Inception weights file, read without running pickled code."""
    state = safe_load(path, "Inception weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UCGMError(f"{path}: expected a state dict of tensors ({WEIGHTS_FILENAME} layout)")
    return state


def build_network(state: dict[str, torch.Tensor] | None, features: tuple[str, ...] = FEATURES) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with `state` loaded strictly (None: its random init).

    Its constructor reads the weights with an unrestricted torch.load(path); we give it a file we
    just wrote holding an empty dict and load the safely-read `state` in its place.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _InceptionV3(FeatureExtractorInceptionV3):  # type: ignore[misc]
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if isinstance(state_dict, dict) and not state_dict:  # the constructor's placeholder
                if state is None:
                    return None
                state_dict = state
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory(prefix="ucgm-inception-") as tmp:
        placeholder = os.path.join(tmp, "empty.pth")
        torch.save({}, placeholder)
        try:
            return _InceptionV3(EXTRACTOR_NAME, list(features), feature_extractor_weights_path=placeholder)
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys, shape mismatches
            raise UCGMError(f"Inception weights do not fit torch-fidelity's InceptionV3: "
                            f"{' '.join(str(err).split())[:300]}") from None


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matmuls (TF32 would change the features on Ampere+ GPUs)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class InceptionFeatures:
    """Callable feature extractor: uint8 [N, H, W, 3] -> (pool [N, 2048], logits [N, 1008]) float32 numpy."""

    network: nn.Module
    weights_path: str
    weights_sha256: str
    device: torch.device

    def __call__(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise UCGMError(f"Inception input: expected uint8 images [N, H, W, 3], got {x.dtype} {list(x.shape)}")
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.no_grad(), no_tf32():
            pool, logits = self.network(x)
        return pool.cpu().numpy().astype(np.float32), logits.cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What results.json records about the evaluator."""
        import torch_fidelity

        return {
            "name": "torch-fidelity",
            "version": torch_fidelity.__version__,
            "network": f"{EXTRACTOR_NAME} (FeatureExtractorInceptionV3, TF inception-2015-12-05 port)",
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "fid_features": "2048 (pool3)",
            "is_features": "logits_unbiased",
            "resize": "inside the network: TF1-compatible bilinear to 299x299 from uint8",
            "precision": "float32, TF32 off",
        }


def load_inception(weights_path: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Resolve, safely read and load torch-fidelity's Inception weights onto `device`."""
    path = resolve_weights(weights_path)
    state = read_weights(path)
    network = build_network(state).to(device).eval()
    return InceptionFeatures(network, str(path), sha256_file(path), torch.device(device))
