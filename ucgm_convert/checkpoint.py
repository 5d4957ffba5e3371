"""Our checkpoint format: a folder with model.safetensors, config.json, recipe.yaml, README.md.

Folders are written to a temporary sibling and renamed into place, so a reader never sees a
half-written checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UCGMError
from .formats.safetensors_file import read_safetensors
from .formats.statedict import load_state_dict_strict
from .foundation import atomic_dir
from .model import GenerativeModel, ModelConfig, checked_network

WEIGHTS_NAME = "model.safetensors"
VAE_WEIGHTS_NAME = "vae.safetensors"
CONFIG_NAME = "config.json"
RECIPE_NAME = "recipe.yaml"
CARD_NAME = "README.md"
RESULTS_NAME = "results.json"


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


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    model: GenerativeModel,
    out_dir: str | Path,
    recipe_yaml: str | None = None,
    card: str | None = None,
) -> Path:
    """Write `model` in our format to `out_dir` (replaced atomically if it exists)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(_cpu_state(model.net.state_dict()), str(tmp / WEIGHTS_NAME), metadata={"format": "ucgm-convert"})
        if model.vae_state is not None:
            save_file(_cpu_state(model.vae_state), str(tmp / VAE_WEIGHTS_NAME), metadata={"format": "ucgm-convert"})
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
    except (ValueError, OSError) as err:
        raise UCGMError(f"{config_path}: invalid JSON ({err})") from None
    return ModelConfig.parse(data, str(config_path))


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> GenerativeModel:
    """Rebuild a model from a folder in our format; every weight must match the architecture."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UCGMError(f"{path}: missing {WEIGHTS_NAME}")
    net = checked_network(config, str(path / CONFIG_NAME))
    load_state_dict_strict(net, read_safetensors(weights), str(weights), assign=True)
    model = GenerativeModel(net, config)
    if (path / VAE_WEIGHTS_NAME).is_file():
        model.vae_state = read_safetensors(path / VAE_WEIGHTS_NAME)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
