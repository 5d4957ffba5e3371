"""The sampling loop never reads device data on the host (a GPU would wait at every such read).

Meta tensors have no data: any `.item()`, `bool(tensor)` or copy to the host raises, so a whole
`uc.sample` run on the meta device proves the loop issues work without one device sync.
"""

from __future__ import annotations

import pytest
import torch

import ucgm_convert as uc
from ucgm_convert.model import checked_network

CONFIG = uc.ModelConfig(family="ucgm", arch="sit", transport="Linear", num_classes=10, latent_shape=(4, 8, 8),
                        arch_kwargs=dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=10))


def _meta_model() -> uc.GenerativeModel:
    return uc.GenerativeModel(checked_network(CONFIG, "test"), CONFIG)


# The multistep solvers copy the time grid to the host once, before the loop (ucgm_convert/multistep.py), so a
# meta-device run cannot tell that single copy from one inside the loop: they are not listed here.
@pytest.mark.parametrize("settings", [{}, {"extrapolation": 0.5, "time_dist": (1.2, 0.7, 1.2)},
                                      {"stochasticity": "auto"}, {"stochasticity": 0.3}, {"order": 2}])
def test_guided_sampling_runs_without_reading_the_device(settings: dict) -> None:
    model = _meta_model()
    x = torch.empty(3, *CONFIG.latent_shape, device="meta")
    y = torch.zeros(3, dtype=torch.long, device="meta")
    out = uc.sample(uc.guided(model, 1.5), x, "Linear", steps=5, y=y, **settings)
    assert out.device.type == "meta" and out.shape == x.shape


def test_a_partial_guidance_interval_reads_t_once_per_evaluation() -> None:
    """Skipping the unconditional half outside the interval needs t on the host: the one sync left (documented)."""
    model = _meta_model()
    x = torch.empty(3, *CONFIG.latent_shape, device="meta")
    y = torch.zeros(3, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        uc.sample(uc.guided(model, 1.5, interval=(0.2, 0.8)), x, "Linear", steps=5, y=y)
