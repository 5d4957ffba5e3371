"""Source-family adapters (installed as ucgm_convert.adapters): one module per family.

Each module declares `FAMILY`, a `Family` (adapters/family.py): `detect(path) -> bool` from the
file's contents (never its name alone), `load(path, device, dtype, **overrides) -> GenerativeModel`,
and the facts the rest of the package needs (licence, dataset, VAE spec, default recipe, ...).
Adding a family is one module here plus its entry in FAMILIES; detection tries them in order.
"""

from __future__ import annotations

from pathlib import Path

from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.torch_files import is_damaged_zip

from . import ddt, dit, edm2, lightningdit, repa, repa_e, sit, ucgm, ucgm_release
from .family import IMAGENET, UNKNOWN_LICENSE, Family, License

__all__ = ["FAMILIES", "IMAGENET", "UNKNOWN_LICENSE", "Family", "License", "detect_family", "family_names",
           "get_family"]

# Detection order: our own format first, then the families whose files are the most specific (a UCGM
# checkpoint of a LightningDiT or SiT would also pass those families' looser checks; REPA, SiT and DiT go
# before REPA-E, which also accepts any SiT-named container).
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY
                               for m in (ucgm, ucgm_release, edm2, ddt, lightningdit, repa, sit, dit, repa_e)}


def family_names() -> tuple[str, ...]:
    """The known family names, in detection order."""
    return tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise UCGMError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(path: Path) -> Family:
    """The family whose adapter recognises `path`'s contents."""
    if path.is_file() and is_damaged_zip(path):
        raise UCGMError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?)")
    for family in FAMILIES.values():
        if family.detect(path):
            rivals = [name for name in family.confusable_with if FAMILIES[name].detect(path)]
            if rivals:
                names = " or ".join(repr(n) for n in (family.name, *rivals))
                raise UCGMError(f"{path}: the contents fit {names} alike (same keys and shapes; a different "
                                f"time convention and target); pass --family {family.name} or --family "
                                f"{rivals[0]} (family= in Python)")
            return family
    raise UCGMError(f"{path}: not a checkpoint of any known family ({', '.join(FAMILIES)})")
