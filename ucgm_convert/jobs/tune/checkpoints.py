"""A tuning run's folder: checkpoints written atomically, found again after a kill, metrics trimmed to match.

    OUT/model.safetensors, config.json, recipe.yaml, README.md   the final EMA model (at the end)
    OUT/checkpoints/step-000100/    EMA model (our format) + train_state.pt (student, optimizer,
                                    step, RNG states, sampler position, recipe, tune config)
    OUT/last -> checkpoints/step-000100                          newest complete checkpoint
    OUT/metrics.jsonl               one line per step: step, loss, lr, grad_norm, skipped, time
    OUT/samples/step-000100.png     few-step samples of the EMA model from fixed noise

A checkpoint folder is staged as `.step-XXXXXX.partial` and renamed into place, so a folder under
its final name is complete; resuming takes the newest one whose files read back, and says so
when it has to fall back past a damaged one.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import CARD_NAME, CONFIG_NAME, RECIPE_NAME, VAE_WEIGHTS_NAME, WEIGHTS_NAME, save_checkpoint
from ...console import SILENT, Reporter
from ...errors import UCGMError
from ...formats.safetensors_file import read_safetensors
from ...formats.torch_files import safe_load
from ...foundation import write_file_atomic
from ...model import GenerativeModel

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LAST = "last"
STATE_FORMAT = 1
# What a tuning run's folder holds: a folder with only these is a (previous) run.
OWNED = (CHECKPOINTS, METRICS_NAME, SAMPLES, LAST, WEIGHTS_NAME, VAE_WEIGHTS_NAME, CONFIG_NAME, RECIPE_NAME,
         CARD_NAME)
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (folder renamed into place, train_state.pt inside), oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / STATE_NAME).is_file() and (entry / WEIGHTS_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder of the run in `out`, or None."""
    dirs = step_dirs(Path(out))
    return dirs[-1][1] if dirs else None


def step_of(checkpoint: Path) -> int:
    """The step number in a checkpoint folder's name (step-000100 -> 100)."""
    return int(checkpoint.name.split("-", 1)[1])


def read_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(train_state.pt, EMA weights) of a checkpoint; UCGMError naming the file when one does not read back."""
    path = checkpoint / STATE_NAME
    state = safe_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "step" not in state:
        raise UCGMError(f"{path}: not a train_state.pt of this version of ucgm-convert")
    return state, read_safetensors(checkpoint / WEIGHTS_NAME)


Intact = tuple[Path, dict[str, Any], dict[str, torch.Tensor]]  # folder, train state, EMA weights


def newest_intact(out: Path, reporter: Reporter = SILENT) -> Intact | None:
    """The newest checkpoint whose files read back, with its state; damaged newer ones are named and skipped."""
    damaged = []
    for _, folder in reversed(step_dirs(out)):
        try:
            state, ema = read_state(folder)
        except UCGMError as err:
            damaged.append(str(err))
            continue
        for message in damaged:
            reporter.note(f"--resume: {message}; falling back to {folder}")
        return folder, state, ema
    if damaged:
        raise UCGMError(f"--resume {out}: every checkpoint is damaged ({damaged[0]}); start over with --overwrite")
    return None


def _write_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_file_atomic(path, buffer.getvalue())


def point_last(out: Path, target: Path) -> None:
    """OUT/last -> the newest checkpoint (a symlink, or a text file where links are not allowed)."""
    link = out / LAST
    tmp = out / f".{LAST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, out), tmp)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        write_file_atomic(link, (os.path.relpath(target, out) + "\n").encode())


def save(out: Path, step: int, ema: GenerativeModel, state: dict[str, Any], recipe_yaml: str, card: str,
         keep: int) -> Path:
    """Write checkpoint `step` (EMA model + train_state.pt) atomically, point `last` at it, prune old ones."""
    root = out / CHECKPOINTS
    name = f"step-{step:06d}"
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(ema, staging, recipe_yaml=recipe_yaml, card=card)
    _write_torch(staging / STATE_NAME, {"format": STATE_FORMAT, "step": step, **state})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    point_last(out, final)
    if keep:
        for _, old in step_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partials(out: Path) -> None:
    """Remove checkpoint folders a kill cut in half (staged, never renamed)."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)


def copy_final(out: Path, checkpoint: Path) -> None:
    """Copy the EMA model of `checkpoint` into OUT (file by file, config.json last)."""
    for name in (WEIGHTS_NAME, VAE_WEIGHTS_NAME, RECIPE_NAME, CARD_NAME, CONFIG_NAME):
        src = checkpoint / name
        if not src.is_file():
            continue
        tmp = out / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / name)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines after `step` (written by the interrupted run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_file_atomic(path, "".join(k + "\n" for k in kept).encode())


def clear_run(out: Path) -> None:
    """Remove a previous run's files from `out` (--overwrite); nothing else in it is touched."""
    for name in OWNED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
