"""`ucgm search`: the UCGM-S settings that come closest to many-step samples at each NFE budget."""

from __future__ import annotations

from typing import Annotated

from ..console import Reporter
from ..jobs import search
from .common import clean_errors
from .groups import SEARCH
from .options import flags


@clean_errors
@flags
def search_command(config: Annotated[search.SearchConfig, SEARCH]) -> None:
    """Search sampler settings per --nfe budget; writes OUT/nfe-N.yaml (usable as --from on sample, eval fid,
    tune), OUT/table.csv/json and OUT/distance.png. An interrupted search resumes from OUT's trial logs."""
    search.run(config, Reporter())
