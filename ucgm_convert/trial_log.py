"""The JSONL trial log that makes `uc.search` resumable: a header naming the search, then one line per trial."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import UCGMError


class TrialLog:
    """The JSONL record of a search: a header naming what is searched, then one line per trial.

    Appends are single `os.write` calls followed by fsync; a line torn by kill -9 (no newline)
    is cut off when the log is reopened. A log whose header differs from this search is an error.
    """

    def __init__(self, path: Path | None, header: dict[str, Any]) -> None:
        self.path = path
        self.cache: dict[str, float] = {}
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = self._intact_lines(path)
        if lines:
            if json.loads(lines[0]) != header:
                raise UCGMError(f"{path}: this trial log belongs to another search (other model, budget or "
                                "settings); pass another --out or delete the file")
            for line in lines[1:]:
                entry = json.loads(line)
                self.cache[entry["key"]] = math.inf if entry["distance"] is None else float(entry["distance"])
        else:
            self._append(header)

    @staticmethod
    def _intact_lines(path: Path) -> list[str]:
        if not path.exists():
            return []
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(keep))
        lines = [line for line in keep.decode("utf-8").splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                raise UCGMError(f"{path}: line {i + 1} is not JSON; not a trial log of `ucgm search`") from None
        return lines

    def _append(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def record(self, key: str, distance: float) -> None:
        self.cache[key] = distance
        self._append({"key": key, "distance": distance if math.isfinite(distance) else None})
