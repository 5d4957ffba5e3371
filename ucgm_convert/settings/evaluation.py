"""Evaluation choices shared by recipes, `ucgm eval fid` and results.json: metric names and the uint8 rule.

How decoded [0, 1] images become uint8 pixels differs between the published pipelines (each checked
in its upstream's sampling / metrics code):
  truncate: floor(255 x)        LINs-lab/UCGM metrics/torch_quality.py FIDDataset (x * 255 -> uint8);
                                REPA-E generate.py (clamp(255 * (y + 1) / 2) -> uint8)
  round:    floor(255 x + 0.5)  LightningDiT tokenizer/vavae.py decode_to_images (127.5 y + 128 -> uint8);
                                DDT src/models/vae.py fp2uint8 ((y + 1) * 127.5 + 0.5 -> uint8);
                                EDM2 training/encoders.py (y * 127.5 + 128 -> uint8)      (y = 2 x - 1)
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

from .base import Describe, choice

METRIC_NAMES = ("fid", "is", "sfid", "prec", "rec", "fd_dinov2")
DEFAULT_METRICS = ("fid", "is")
UINT8_RULES = {
    "round": "round half up: floor(255 * x + 0.5) for x in [0, 1] (LightningDiT, DDT, EDM2 pipelines)",
    "truncate": "truncate: floor(255 * x) for x in [0, 1] (x * 255 -> uint8: LINs-lab/UCGM's FID, REPA-E)",
}
UINT8_DEFAULT = "round"


def split_metrics(names: Any) -> list[str]:
    """'fid,is' or ['fid', 'is'] -> known names in order without duplicates; ValueError naming what is wrong."""
    items = [str(n).strip() for n in (names.split(",") if isinstance(names, str) else names) if str(n).strip()]
    unknown = [n for n in items if n not in METRIC_NAMES]
    if unknown or not items:
        raise ValueError(f"unknown {', '.join(unknown) or 'empty list'}")
    return list(dict.fromkeys(items))


Uint8Rule = choice(*UINT8_RULES)
MetricList = Annotated[Any, AfterValidator(split_metrics),
                       Describe(f"a comma-separated subset of {', '.join(METRIC_NAMES)}")]
