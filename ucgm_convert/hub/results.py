"""What `ucgm eval fid` measured, read back for model cards: results.json, defensively.

results.json is a JSON object, a list of them, or {"results": [...]}; a sweep folder (sweep.json)
stands for the results.json of each of its points. Per result, keys used (all optional but one
number; unknown keys ignored): "metrics" (name -> value: fid, is, sfid, prec, rec, fd_dinov2),
else the older "fid" and "inception_score"; the NFE as "nfe" (int or label such as "40x2"),
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

SWEEP_NAME = "sweep.json"  # jobs/evaluate/sweep.py SUMMARY_JSON (hub sits above jobs)


@dataclass
class MeasuredResult:
    """One entry of results.json."""

    fid: float | None
    nfe: str
    inception_score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # every number measured, by metric name
    uint8: str | None = None  # the pixel rule the samples were made with
    reference_sha256: str | None = None
    num_samples: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    state_sha256: str | None = None  # of the weights measured (ucgm eval fid records it)
    source: str = ""


def read_results(path: str | Path) -> list[MeasuredResult]:
    """The measured results of `path` (a folder: its results.json, absent = none; or a file)."""
    path = Path(path)
    if path.is_dir() and (path / SWEEP_NAME).is_file():
        return [r for point in sorted(p for p in path.iterdir() if (p / RESULTS_NAME).is_file())
                for r in read_results(point)]
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
        metrics = _metrics_of(entry)
        if not metrics:
            continue
        sampling = entry.get("sampling") if isinstance(entry.get("sampling"), dict) else {}
        settings = next((s for s in (entry.get("settings"), sampling.get("settings")) if isinstance(s, dict)), {})
        model = entry.get("model") if isinstance(entry.get("model"), dict) else {}
        reference = entry.get("reference") if isinstance(entry.get("reference"), dict) else {}
        results.append(MeasuredResult(
            fid=metrics.get("fid"),
            nfe=_nfe_of(entry.get("nfe", sampling.get("nfe_per_sample")), settings),
            inception_score=metrics.get("is"),
            metrics=metrics,
            uint8=text_or_none(entry.get("uint8")),
            reference_sha256=text_or_none(reference.get("sha256")),
            num_samples=_integer(entry.get("num_samples")),
            settings=settings,
            reference=_reference_text(entry.get("reference")) or text_or_none(entry.get("dataset")),
            state_sha256=text_or_none(model.get("state_sha256")),
            source=str(file),
        ))
    return results


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    """name -> value of every finite number measured ("metrics", else the older "fid" / "inception_score")."""
    given = entry.get("metrics")
    if isinstance(given, dict):
        return {str(k): v for k, value in given.items() if (v := _number(value)) is not None}
    inception = entry.get("inception_score")
    if isinstance(inception, dict):  # ucgm eval fid: {"mean", "std", "splits", ...}
        inception = inception.get("mean")
    found = {"fid": _number(entry.get("fid")), "is": _number(inception)}
    return {k: v for k, v in found.items() if v is not None}


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
