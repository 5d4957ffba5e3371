"""`uc.load`: a checkpoint file, folder, embedded model or Hub repo id -> GenerativeModel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from ._version import __version__
from .adapters import detect_family, get_family
from .errors import UCGMError
from .foundation import looks_like_hub_id, one_line
from .model import GenerativeModel

EMBEDDED_PREFIX = "embedded:"


def embedded_path(name: str) -> Path:
    """The folder of a model shipped inside the package (e.g. "demo")."""
    path = Path(str(resources.files("ucgm_convert.assets") / name))
    if not path.is_dir():
        raise UCGMError(f"no embedded model {name!r} (looked in {path})")
    return path


def resolve_source(source: str | Path) -> Path:
    """A local path for `source`: an existing path, `embedded:NAME`, or a Hub repo id (cached)."""
    text = str(source)
    if text.startswith(EMBEDDED_PREFIX):
        return embedded_path(text[len(EMBEDDED_PREFIX):])
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(text):
        return _hub_snapshot(text)
    raise UCGMError(f"{text}: no such file or folder (and not a Hugging Face repo id like user/name)")


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or reuse from the cache, offline too) a Hub repo and return its local folder."""
    try:
        return Path(snapshot_download(repo_id, library_name="ucgm-convert", library_version=__version__))
    except HFValidationError as err:
        raise UCGMError(f"{repo_id}: not a valid Hugging Face repo id ({one_line(err)})") from None
    except IncompleteSnapshotError:
        raise UCGMError(f"{repo_id}: the cached copy in {constants.HF_HUB_CACHE} is incomplete and the Hub "
                        "cannot be reached; download it again while online") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise UCGMError(f"{repo_id}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                            "HF_HUB_OFFLINE is set; download it once while online (unset HF_HUB_OFFLINE)") from None
        raise UCGMError(f"{repo_id}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
                        "is unreachable; download it once while online") from None
    except RepositoryNotFoundError:
        raise UCGMError(f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private or gated: "
                        "log in with `hf auth login` or set HF_TOKEN)") from None
    except HfHubHTTPError as err:
        raise UCGMError(f"{repo_id}: Hugging Face Hub error: {one_line(err)}") from None


def load(
    source: str | Path,
    family: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> GenerativeModel:
    """Load `source` as a GenerativeModel; the family is detected from the contents unless given."""
    path = resolve_source(source)
    chosen = get_family(family) if family is not None else detect_family(path)
    if family is not None and not chosen.detect(path):
        try:
            actual = f"its contents look like family {detect_family(path).name!r}"
        except UCGMError as err:
            actual = str(err)
        raise UCGMError(f"{path}: does not look like a {family!r} checkpoint ({actual})")
    return chosen.load(path, device=device, dtype=dtype, **overrides)
