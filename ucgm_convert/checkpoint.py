"""Our checkpoint format: a folder with model.safetensors, config.json, recipe.yaml, README.md.

Folders are written to a temporary sibling and renamed into place, so a reader never sees a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UCGMError
from .model import GenerativeModel, ModelConfig
from .statedict import load_state_dict_strict

WEIGHTS_NAME = "model.safetensors"
VAE_WEIGHTS_NAME = "vae.safetensors"
CONFIG_NAME = "config.json"
RECIPE_NAME = "recipe.yaml"
CARD_NAME = "README.md"


def is_checkpoint_dir(path: Path) -> bool:
    """True for a folder in our format: config.json with an `arch` field (or unreadable JSON,
    so that loading reports the precise problem) next to model.safetensors."""
    config = path / CONFIG_NAME
    if not (path.is_dir() and config.is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return True
    return isinstance(data, dict) and "arch" in data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool) -> None:
    """Give a temp file/folder the permissions a plain open()/mkdir() would (mkstemp uses 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_dir(out_dir: Path) -> "_AtomicDir":
    """Context manager yielding a temporary folder that replaces `out_dir` on success."""
    return _AtomicDir(Path(out_dir))


class _AtomicDir:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def __enter__(self) -> Path:
        parent = self.out_dir.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
            _default_mode(self.tmp, directory=True)
        except OSError as err:
            raise UCGMError(f"{self.out_dir}: cannot write here ({err.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for item in self.tmp.rglob("*"):  # some writers (safetensors) create files 0600
            _default_mode(item, directory=item.is_dir())
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        _default_mode(Path(tmp), directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    model: GenerativeModel,
    out_dir: str | Path,
    recipe_yaml: str | None = None,
    card: str | None = None,
) -> Path:
    """Write `model` in our format to `out_dir` (replaced atomically if it exists)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "ucgm-convert"})
        if model.vae_state is not None:
            vae_state = {k: v.detach().to("cpu").contiguous() for k, v in model.vae_state.items()}
            save_file(vae_state, str(tmp / VAE_WEIGHTS_NAME), metadata={"format": "ucgm-convert"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
        if recipe_yaml is not None:
            (tmp / RECIPE_NAME).write_text(recipe_yaml)
        if card is not None:
            (tmp / CARD_NAME).write_text(card)
    return out_dir


def read_config(path: Path) -> ModelConfig:
    """Parse and validate `path`/config.json."""
    config_path = path / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UCGMError(f"{path}: not a ucgm-convert checkpoint folder (no {CONFIG_NAME})") from None
    except ValueError as err:
        raise UCGMError(f"{config_path}: invalid JSON ({err})") from None
    return ModelConfig.from_dict(data, source=str(config_path))


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> GenerativeModel:
    """Rebuild a model from a folder in our format; every weight must match the architecture."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UCGMError(f"{path}: missing {WEIGHTS_NAME}")
    model = GenerativeModel.build(config)
    load_state_dict_strict(model.net, read_safetensors(weights), str(weights))
    if (path / VAE_WEIGHTS_NAME).is_file():
        model.vae_state = read_safetensors(path / VAE_WEIGHTS_NAME)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupted file gives one clear error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UCGMError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
