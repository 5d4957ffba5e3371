"""DDT encoder sharing in `uc.sample`: refresh-every-step is today's output, sharing skips encoder forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ucgm_convert as uc
from ucgm_convert.analytic import GaussianMixture
from ucgm_convert.errors import UCGMError
from ucgm_convert.jobs.source import Resolved, SamplingOverrides
from ucgm_convert.settings import SamplingSettings

CKPT = Path(__file__).parent / "fixtures" / "ddt" / "ddt_tiny_lightning.ckpt"


@pytest.fixture(scope="module")
def model() -> uc.GenerativeModel:
    return uc.load(CKPT)


def _block_calls(model: uc.GenerativeModel) -> tuple[list[int], list[torch.utils.hooks.RemovableHandle]]:
    """Forward counts of the first encoder block and the last decoder block (observed with hooks)."""
    calls = [0, 0]
    blocks = model.net.blocks
    assert model.net.encoder_depth < len(blocks)

    def hook(index: int):
        def count(*_):
            calls[index] += 1
        return count

    return calls, [blocks[0].register_forward_hook(hook(0)), blocks[-1].register_forward_hook(hook(1))]


def _run(model, steps=6, guidance=False, **kwargs) -> torch.Tensor:
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    fn = uc.guided(model, 2.0) if guidance else model
    with torch.no_grad():
        return uc.sample(fn, noise, transport=model.transport, steps=steps, y=torch.tensor([1, 3]), **kwargs)


def test_refresh_every_evaluation_is_todays_output_exactly(model) -> None:
    assert model.shares_encoder
    today = _run(model)
    use = uc.EncoderUse()
    same = _run(model, encoder_refresh=1, encoder_use=use)
    assert torch.equal(today, same)
    assert (use.encoder_evals, use.decoder_evals) == (6, 6)


@pytest.mark.parametrize(("refresh", "encoder_evals"), [(2, 3), (3, 2), (6, 1), ([0, 4, 5], 3)])
def test_sharing_skips_encoder_forwards_as_stated(model, refresh, encoder_evals) -> None:
    calls, handles = _block_calls(model)
    use = uc.EncoderUse()
    try:
        shared = _run(model, encoder_refresh=refresh, encoder_use=use)
    finally:
        for h in handles:
            h.remove()
    assert (use.encoder_evals, use.decoder_evals) == (encoder_evals, 6)
    assert calls == [encoder_evals, 6]
    assert uc.count_encoder_evals(6, 1, (0.001, 0.001), refresh) == encoder_evals
    today = _run(model)
    assert torch.isfinite(shared).all() and not torch.equal(shared, today)


def test_sharing_with_guidance_and_order_two(model) -> None:
    use = uc.EncoderUse()
    _run(model, guidance=True, encoder_refresh=2, encoder_use=use)
    assert (use.encoder_evals, use.decoder_evals) == (3, 6)  # one batched cond+uncond forward each
    use = uc.EncoderUse()
    _run(model, steps=6, order=2, encoder_refresh=2, encoder_use=use)
    nfe = uc.count_nfe(6, 2)
    assert (use.encoder_evals, use.decoder_evals) == (uc.count_encoder_evals(6, 2, (0.001, 0.001), 2), nfe)


def test_a_model_without_a_shareable_encoder_is_refused() -> None:
    gm = GaussianMixture.random(dim=2, components=2, seed=0)
    with pytest.raises(ValueError, match="shares its condition encoder"):
        uc.sample(gm, torch.randn(4, 2), steps=4, encoder_refresh=2)
    with pytest.raises(ValueError, match="encoder_refresh must be"):
        uc.sample(gm, torch.randn(4, 2), steps=4, encoder_refresh=0)
    sit = uc.load("embedded:demo")
    assert not sit.shares_encoder
    resolved = Resolved(sit, "embedded:demo", None, SamplingSettings(steps=4), "test")
    with pytest.raises(UCGMError, match="--encoder-refresh: .*no shareable condition encoder"):
        resolved.sampling_with(SamplingOverrides(encoder_refresh=2))


def test_encoder_refresh_is_a_setting(model) -> None:
    s = SamplingSettings(steps=8, encoder_refresh=3)
    assert s.as_sample_kwargs()["encoder_refresh"] == 3
    assert (s.encoder_evals, s.sampler_nfe, s.nfe_label) == (3, 8, "8 (encoder 3)")
    assert s.replace(cfg_scale=2.0).nfe_label == "8x2 (encoder 3x2)"
    assert SamplingSettings(steps=8).nfe_label == "8"
    resolved = Resolved(model, str(CKPT), None, SamplingSettings(steps=4), "test")
    assert resolved.sampling_with(SamplingOverrides(encoder_refresh=2)).encoder_refresh == 2
