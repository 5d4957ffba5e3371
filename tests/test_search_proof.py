"""The quick case of bench/search_proof.py: searched settings beat UniPC, DPM-Solver++ 2M and the recipes."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import search_proof  # noqa: E402  (a script-style benchmark: it imports core from its folder)
from core import Options  # noqa: E402


def test_searched_settings_win_on_fresh_noise_on_a_small_mixture(tmp_path: Path) -> None:
    result = search_proof.run(Options(quick=True, out=tmp_path))
    assert result.plots == [tmp_path / "search_proof.png"] and result.plots[0].read_bytes()[:4] == b"\x89PNG"
    assert [row[3] for row in result.rows] == [2, 4]
    for row in result.rows:
        searched, unipc, dpm, recipes = row[4:8]
        assert searched < min(unipc, dpm), row  # measured on fresh noise against the exact moments
        assert searched <= recipes, row
