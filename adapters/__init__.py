"""Source-family adapters (installed as ucgm_convert.adapters).

Each adapter module has NAME, `detect(path) -> bool` (from the file's contents, never its
name alone) and `load(path, device, dtype, **overrides) -> GenerativeModel`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ucgm_convert.errors import UCGMError
from ucgm_convert.readers import is_damaged_zip

from . import ddt
from . import edm2
from . import lightningdit
from . import repa_e
from . import ucgm

ADAPTERS: dict[str, ModuleType] = {ucgm.NAME: ucgm, edm2.NAME: edm2, ddt.NAME: ddt, lightningdit.NAME: lightningdit, repa_e.NAME: repa_e}


def get_adapter(family: str) -> ModuleType:
    """The adapter for `family`; an unknown name lists the known ones."""
    if family not in ADAPTERS:
        raise UCGMError(f"unknown family {family!r}; known families: {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


def detect_family(path: Path) -> str:
    """The family whose adapter recognises `path`'s contents."""
    if path.is_file() and is_damaged_zip(path):
        raise UCGMError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?)")
    for name, adapter in ADAPTERS.items():
        if adapter.detect(path):
            return name
    raise UCGMError(f"{path}: not a checkpoint of any known family ({', '.join(ADAPTERS)})")
