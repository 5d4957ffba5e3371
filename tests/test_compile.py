"""`--compile` (torch.compile of the network) draws the same images as eager sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ucgm_convert.jobs import sample
from ucgm_convert.jobs.source import ModelSource


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_images(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = {}
    for compiled in (False, True):
        config = sample.SampleConfig(source=ModelSource(checkpoint=str(tiny_checkpoint)), num=4, batch_size=4,
                                     out=tmp_path / f"out-{compiled}", device="cpu", compile=compiled)
        sample.run(config)
        images[compiled] = np.load(tmp_path / f"out-{compiled}" / "samples.npz")["arr_0"].astype(int)
    assert images[True].shape == images[False].shape == (4, 8, 8, 3)
    assert np.abs(images[True] - images[False]).max() <= 1  # kernels round differently: at most one grey level
