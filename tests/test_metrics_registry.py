"""The metric names of `ucgm eval`, the network pass each needs, and which share one pass."""

from __future__ import annotations

import pytest

from ucgm_convert.errors import UCGMError
from ucgm_convert.metrics import METRICS, parse_metrics, passes
from ucgm_convert.metrics.sfid import SPATIAL_DIM
from ucgm_convert.settings.evaluation import METRIC_NAMES


def test_names_and_shared_passes() -> None:
    assert list(METRICS) == ["fid", "is", "sfid", "prec", "rec", "fd_dinov2"]
    assert passes("fid,is,sfid,prec,rec,fd_dinov2") == {"inception": ["fid", "is", "sfid", "prec", "rec"],
                                                        "dinov2": ["fd_dinov2"]}
    assert passes(["fd_dinov2"]) == {"dinov2": ["fd_dinov2"]}
    assert parse_metrics(" sfid, fid ,sfid") == ["sfid", "fid"]
    assert METRICS["sfid"].dim == SPATIAL_DIM and METRICS["prec"].features == METRICS["fid"].features == "pool"


@pytest.mark.parametrize("names,message", [("fid,kid", "unknown kid"), ("", "unknown empty list")])
def test_unknown_names_are_one_line_errors(names: str, message: str) -> None:
    with pytest.raises(UCGMError, match=message) as info:
        parse_metrics(names)
    assert "fid, is, sfid, prec, rec, fd_dinov2" in str(info.value) and "\n" not in str(info.value)


def test_the_registry_is_what_recipes_and_flags_validate_against() -> None:
    assert tuple(METRICS) == METRIC_NAMES
