"""The quick case of `python -m bench.search_proof`: searched settings beat UniPC, DPM-Solver++ 2M and the recipes."""

from __future__ import annotations

from pathlib import Path

from bench import search_proof
from bench.core import Options


def test_searched_settings_win_on_fresh_noise_on_a_small_mixture(tmp_path: Path) -> None:
    result = search_proof.run(Options(quick=True, out=tmp_path))
    assert result.plots == [tmp_path / "search_proof.png"] and result.plots[0].read_bytes()[:4] == b"\x89PNG"
    assert [row[3] for row in result.rows] == [2, 4]
    for row in result.rows:
        searched, unipc, dpm, recipes = row[4:8]
        assert searched < min(unipc, dpm), row  # measured on fresh noise against the exact moments
        assert searched <= recipes, row
