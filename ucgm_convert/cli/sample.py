"""`ucgm sample`: UCGM-S sampling of any loaded model to an .npz and a PNG grid."""

from __future__ import annotations

from typing import Annotated

from ..console import Reporter
from ..jobs import sample
from .common import clean_errors
from .groups import SAMPLE
from .options import flags


@clean_errors
@flags
def sample_command(config: Annotated[sample.SampleConfig, SAMPLE]) -> None:
    """Sample a model with UCGM-S and write OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels) and OUT/grid.png."""
    sample.run(config, Reporter())
