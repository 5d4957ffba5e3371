"""What `ucgm eval fid` measured, read back for model cards: results.json, defensively.

results.json is a JSON object, a list of them, or {"results": [...]}. Per result, keys used (all
but "fid" optional; unknown keys ignored): "fid"; the NFE as "nfe" (int or label such as "40x2"),
else "sampling"."nfe_per_sample", else computed from the settings; the settings as "settings" or
"sampling"."settings"; "inception_score" (a number, or a mapping with "mean"); "num_samples";
"reference" (text, or a mapping with "name" or "path"), "dataset" as a fallback; and
"model"."state_sha256", the hash of the weights measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import RESULTS_NAME
from ..errors import UCGMError
from ..settings import SamplingSettings, SettingsError


@dataclass
class MeasuredResult:
    """One entry of results.json."""

    fid: float
    nfe: str
    inception_score: float | None = None
    num_samples: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    state_sha256: str | None = None  # of the weights measured (ucgm eval fid records it)
    source: str = ""


def read_results(path: str | Path) -> list[MeasuredResult]:
    """The measured results of `path` (a folder: its results.json, absent = none; or a file)."""
    path = Path(path)
    file = path / RESULTS_NAME if path.is_dir() else path
    if not file.is_file():
        if file != path:
            return []
        raise UCGMError(f"{file}: no such results file")
    try:
        data = json.loads(file.read_text())
    except ValueError as err:
        raise UCGMError(f"{file}: invalid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        entries = data["results"]
    elif isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        entries = [data]
    else:
        raise UCGMError(f"{file}: expected a JSON object or a list of objects, got {type(data).__name__}")
    results = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        fid = _number(entry.get("fid"))
        if fid is None:
            continue
        sampling = entry.get("sampling") if isinstance(entry.get("sampling"), dict) else {}
        settings = next((s for s in (entry.get("settings"), sampling.get("settings")) if isinstance(s, dict)), {})
        model = entry.get("model") if isinstance(entry.get("model"), dict) else {}
        inception = entry.get("inception_score")
        if isinstance(inception, dict):  # ucgm eval fid: {"mean", "std", "splits", ...}
            inception = inception.get("mean")
        results.append(MeasuredResult(
            fid=fid,
            nfe=_nfe_of(entry.get("nfe", sampling.get("nfe_per_sample")), settings),
            inception_score=_number(inception),
            num_samples=_integer(entry.get("num_samples")),
            settings=settings,
            reference=_reference_text(entry.get("reference")) or text_or_none(entry.get("dataset")),
            state_sha256=text_or_none(model.get("state_sha256")),
            source=str(file),
        ))
    return results


def _reference_text(value: Any) -> str | None:
    """A short name for the FID reference statistics (results.json "reference": text or mapping)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        for key in ("name", "path"):
            if isinstance(value.get(key), str) and value[key]:
                return Path(value[key]).name if key == "path" else value[key]
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _nfe_of(value: Any, settings: dict[str, Any]) -> str:
    """The NFE label: results.json's "nfe", else computed from its sampling settings."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if _integer(value) is not None:
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    try:
        known = {k: v for k, v in settings.items() if k in SamplingSettings.model_fields}
        return SamplingSettings(**known).nfe_label
    except SettingsError:  # settings of unknown shape: say so rather than fail the push
        return "?"
