"""Reading checkpoint files safely, once: torch files with weights_only + mmap, cached by path.

Adapters call these in `detect` and `load`, so detection never loads a file twice and no
checkpoint can run code while being read.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UCGMError

# Plain-data classes that released checkpoints pickle besides tensors (REPA-E stores its
# argparse Namespace under "args"); nothing here can execute code when unpickled.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def is_torch_zip(path: Path) -> bool:
    """True for a torch.save zip archive (the format of every .pt/.ckpt since torch 1.6)."""
    return path.is_file() and zipfile.is_zipfile(path)


_GLOBAL = re.compile(r"GLOBAL (\S+)")
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
               IndexError, TypeError)


def load_error(path: str | Path, err: BaseException, what: str) -> UCGMError:
    """One line for a failed torch.load: a refused import (naming it), else "not readable".

    torch's own message is not repeated: it advises re-running with weights_only=False, the one
    thing never to do with a file of unknown origin.
    """
    found = _GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if found:
        return UCGMError(f"{path}: refused to load {what}: the file would import {found.group(1)} while unpickling, "
                         "which could run code; only tensors and plain data are read")
    return UCGMError(f"{path}: not a readable {what} (truncated, corrupted or not a torch.save file)")


def safe_load(path: str | Path, what: str, allowed: list[Any] | None = None, mmap: bool = False) -> Any:
    """torch.load with weights_only=True (plus the `allowed` plain-data classes); errors via `load_error`."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except LOAD_ERRORS as err:
        raise load_error(path, err, what) from None


@functools.lru_cache(maxsize=4)
def _read_torch_cached(path: str, mtime_ns: int, size: int) -> Any:
    return safe_load(path, "PyTorch checkpoint", SAFE_GLOBALS, mmap=True)


def is_damaged_zip(path: Path) -> bool:
    """True for a file that starts like a zip (torch.save) archive but is not a readable one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def read_torch(path: str | Path) -> Any:
    """torch.load(path) with weights_only=True and mmap (weights stay on disk until used)."""
    path = Path(path)
    if not path.is_file():
        raise UCGMError(f"{path}: no such file")
    if is_damaged_zip(path):
        raise UCGMError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?)")
    if not is_torch_zip(path):
        raise UCGMError(f"{path}: not a PyTorch zip checkpoint (torch.save format)")
    stat = path.stat()
    return _read_torch_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def tensor_dict(obj: Any, source: str, key: str | None = None) -> dict[str, Tensor]:
    """`obj[key]` (or obj) as a str -> Tensor dict, with an error naming the file and key."""
    value = obj if key is None else (obj.get(key) if isinstance(obj, Mapping) else None)
    where = f"{source}" + (f" [{key!r}]" if key else "")
    if not isinstance(value, Mapping) or not all(isinstance(v, Tensor) for v in value.values()):
        raise UCGMError(f"{where}: expected a state dict (name -> tensor)")
    return dict(value)


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under `prefix`, with the prefix removed (others dropped)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
