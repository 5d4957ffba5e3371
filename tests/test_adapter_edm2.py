"""EDM2 adapter: tiny snapshots in NVIDIA's release format load safely and match upstream.

tests/fixtures/edm2/ is made by scripts/fixtures/make_edm2.py from NVlabs/edm2 @4bf8162 (its docstring says
how; torch 2.14.1, numpy 2.4.6, Python 3.11, CPU): tiny-cond.pkl and tiny-uncond.pkl, pickled as
training/training_loop.py saves snapshots (float16 `ema`), and expected.safetensors, upstream's denoiser
outputs D, D_uncond, D_guided_1.7, D_nolabel and D_fp16_params on fixed noisy inputs.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ucgm_convert as uc
from ucgm_convert.adapters import detect_family
from ucgm_convert.adapters import edm2 as edm2_adapter
from ucgm_convert.errors import UCGMError
from ucgm_convert.nets.edm2 import EDM2UNet
from ucgm_convert.transports import EDM

FIXTURES = Path(__file__).parent / "fixtures" / "edm2"
COND = FIXTURES / "tiny-cond.pkl"
UNCOND = FIXTURES / "tiny-uncond.pkl"
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "expected.safetensors")


@pytest.fixture(scope="module")
def cond() -> uc.GenerativeModel:
    return uc.load(COND)


@pytest.fixture(scope="module")
def uncond() -> uc.GenerativeModel:
    return uc.load(UNCOND)


def _precond(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning with sigma_data 0.5: c_in, c_skip, c_out as [B, 1, 1, 1]."""
    s = sigma.view(-1, 1, 1, 1)
    n = (s**2 + 0.25).sqrt()
    return 1 / n, 0.25 / n**2, 0.5 * s / n


def _denoised(model, expected: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """D = c_skip x_sigma + c_out F with F = model(c_in x_sigma, t(sigma), y), as upstream Precond."""
    x, sigma = expected["x_sigma"], expected["sigma"]
    c_in, c_skip, c_out = _precond(sigma)
    with torch.no_grad():
        return c_skip * x + c_out * model(c_in * x, EDM.time_of_sigma(sigma), y)


def test_conditional_matches_upstream_precond(cond, expected) -> None:
    torch.testing.assert_close(_denoised(cond, expected, expected["labels"]), expected["D"], **TOL)


def test_transport_input_is_c_in_scaled(cond, expected) -> None:
    """The EDM transport's x_t = (x + sigma z) / sqrt(sigma^2 + 0.25) is exactly Precond's c_in x_sigma."""
    sigma = expected["sigma"]
    t = EDM.time_of_sigma(sigma)
    c_in, _, _ = _precond(sigma)
    x_sigma = expected["x_sigma"]
    z = torch.randn_like(x_sigma)
    x = x_sigma - sigma.view(-1, 1, 1, 1) * z
    x_t = cond.transport.alpha_in(t).view(-1, 1, 1, 1) * z + cond.transport.gamma_in(t).view(-1, 1, 1, 1) * x
    torch.testing.assert_close(x_t, c_in * x_sigma, atol=1e-5, rtol=1e-5)


def test_unconditional_matches_upstream_and_ignores_y(uncond, expected) -> None:
    labels = expected["labels"]
    torch.testing.assert_close(_denoised(uncond, expected, labels), expected["D_uncond"], **TOL)
    torch.testing.assert_close(_denoised(uncond, expected, labels.flip(0) + 100), expected["D_uncond"], **TOL)
    assert uncond.num_classes == 1 and uncond.config["arch_kwargs"]["label_dim"] == 0


def test_null_class_skips_label_embedding(cond, expected) -> None:
    """y == null_class (= label_dim; EDM2 has no null class) is UCGM's `uncond=True` branch, per row."""
    y = expected["labels"].clone()
    y[[1, 3]] = cond.null_class
    out = _denoised(cond, expected, y)
    torch.testing.assert_close(out[[1, 3]], expected["D_nolabel"][[1, 3]], **TOL)
    torch.testing.assert_close(out[[0, 2]], expected["D"][[0, 2]], **TOL)


def test_guidance_with_separate_network_matches_edm2(cond, uncond, expected) -> None:
    """EDM2 guides denoised outputs, D_g + g (D - D_g); that is linear in F, so guiding F is the same."""
    x, sigma = expected["x_sigma"], expected["sigma"]
    c_in, c_skip, c_out = _precond(sigma)
    # sigma = 80 is t = 1.002 (just above the transport's range), hence the wide interval.
    fn = uc.guided(cond, 1.7, interval=(0.0, 2.0), uncond_model=uncond)
    with torch.no_grad():
        out = c_skip * x + c_out * fn(c_in * x, EDM.time_of_sigma(sigma), expected["labels"])
    torch.testing.assert_close(out, expected["D_guided_1.7"], **TOL)


def test_float16_snapshot_weights_are_loaded_exactly(cond, expected) -> None:
    """Default float32 weights hold the file's float16 values; upstream on raw float16 params differs
    only by its float16 gain arithmetic."""
    assert all(p.dtype == torch.float32 for p in cond.net.state_dict().values())
    torch.testing.assert_close(_denoised(cond, expected, expected["labels"]), expected["D_fp16_params"],
                               atol=5e-3, rtol=0)


def test_architecture_and_config_inferred_for_two_sizes(cond, uncond) -> None:
    a = cond.config["arch_kwargs"]
    assert (a["img_resolution"], a["img_channels"], a["label_dim"], a["model_channels"], a["channel_mult"],
            a["noise_channels"], a["emb_channels"], a["num_blocks"], a["attn_resolutions"],
            a["channels_per_head"]) == (8, 4, 10, 16, [1, 2], 16, 32, 2, [4], 16)
    b = uncond.config["arch_kwargs"]
    assert (b["model_channels"], b["num_blocks"], b["attn_resolutions"], b["label_dim"], b["channels_per_head"]) \
        == (8, 1, [8], 0, 8)
    assert cond.family == "edm2" and cond.transport.name == "EDM" and cond.num_classes == 10
    assert cond.null_class == 10 and cond.latent_shape == (4, 8, 8) and cond.recipe == "edm2-s"
    assert cond.guidance_channels is None


def test_vae_spec_from_pickled_encoder(cond, uncond) -> None:
    assert cond.config["vae"] == {"norm_groups": 32, "name": "sd-vae", "source": "stabilityai/sd-vae-ft-mse",
                                  "latent_mean": [5.81, 3.25, 0.12, -2.15],
                                  "latent_std": [4.17 / 0.5, 4.62 / 0.5, 3.71 / 0.5, 3.28 / 0.5], "pixel_range": "0,1"}
    assert uncond.config["vae"]["latent_mean"] == [1.0, -2.0, 0.5, 0.25]
    assert uncond.config["vae"]["latent_std"] == [4.0, 8.0, 6.0, 10.0]


def test_vae_spec_defaults_and_pixel_encoder() -> None:
    assert edm2_adapter.vae_spec(None, 4)["latent_std"] == [s / 0.5 for s in edm2_adapter.RAW_STD]
    rgb = edm2_adapter.vae_spec({"class_name": "StandardRGBEncoder"}, 3)
    assert rgb["name"] == "identity" and rgb["pixel_range"] == "-1,1"


@pytest.mark.parametrize("size, mc, millions", [("XS", 128, 124.7), ("S", 192, 280.2), ("M", 256, 497.8),
                                               ("L", 320, 777.5), ("XL", 384, 1119.3), ("XXL", 448, 1523.2)])
def test_released_sizes_build_and_infer(size: str, mc: int, millions: float) -> None:
    """img512 sizes XS..XXL: parameter counts of the paper's table; shapes give back the config."""
    with torch.device("meta"):
        net = EDM2UNet(img_resolution=64, img_channels=4, label_dim=1000, model_channels=mc)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == millions
    state = {f"unet.{k}": v for k, v in net.state_dict().items()}
    arch = edm2_adapter.infer_arch(state, Path(f"edm2-img512-{size.lower()}.pkl"))
    assert (arch["model_channels"], arch["channel_mult"], arch["num_blocks"], arch["attn_resolutions"],
            arch["emb_channels"], arch["label_dim"]) == (mc, [1, 2, 3, 4], 3, [16, 8], 4 * mc, 1000)


def test_lower_precision_load(expected) -> None:
    half = uc.load(COND, dtype=torch.bfloat16)
    assert half.net.out_conv.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_denoised(half, expected, expected["labels"]), expected["D"], atol=0.1, rtol=0)


def test_recipe_by_size() -> None:
    assert [edm2_adapter.RECIPES.get(mc, edm2_adapter.DEFAULT_RECIPE) for mc in (128, 192, 320, 448)] \
        == ["edm2-s", "edm2-s", "edm2-l", "edm2-xxl"]


def test_snapshot_reader_exposes_state_and_init_kwargs() -> None:
    snap = edm2_adapter.load_edm2_pickle(COND)
    assert snap["init_kwargs"]["model_channels"] == 16 and snap["sigma_data"] == 0.5
    assert snap["ema"]["unet.out_conv.weight"].dtype == torch.float16
    assert {"unet.emb_fourier.freqs", "logvar_linear.weight"} <= set(snap["ema"])
    assert snap["encoder"]["class_name"] == "StabilityVAEEncoder" and len(snap["encoder"]["scale"]) == 4


def test_detection_from_contents(tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    shutil.copy(COND, renamed)
    assert detect_family(renamed).name == "edm2"
    assert uc.load(renamed, family="edm2").num_classes == 10
    other = tmp_path / "state.pkl"
    torch.save({"w": torch.ones(2)}, other)
    assert not edm2_adapter.detect(other)


def test_wrong_family_is_an_error(tmp_path: Path) -> None:
    other = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, other)
    with pytest.raises(UCGMError, match="plain.pt"):
        uc.load(other, family="edm2")
    with pytest.raises(UCGMError, match="tiny-cond.pkl"):
        uc.load(COND, family="ucgm")


def test_overrides(cond, expected) -> None:
    with pytest.raises(UCGMError, match=r"unknown override\(s\) num_heads.*accepted: channels_per_head"):
        uc.load(COND, num_heads=4)
    clipped = uc.load(COND, clip_act=0.5)
    assert clipped.config["arch_kwargs"]["clip_act"] == 0.5
    assert not torch.allclose(_denoised(clipped, expected, expected["labels"]), expected["D"])


def test_missing_and_unexpected_keys_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = dict(edm2_adapter.load_edm2_pickle(COND))
    state = dict(snap["ema"])
    del state["unet.dec.4x4_in0.attn_proj.weight"]
    state["unet.enc.8x8_block0.extra.weight"] = torch.zeros(1)
    monkeypatch.setattr(edm2_adapter, "load_edm2_pickle", lambda path: dict(snap, ema=state))
    with pytest.raises(UCGMError, match=r"tiny-cond\.pkl.*missing keys: dec\.4x4_in0\.attn_proj\.weight.*"
                                        r"unexpected keys: enc\.8x8_block0\.extra\.weight"):
        uc.load(COND)


def test_shape_that_fits_no_edm2_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = dict(edm2_adapter.load_edm2_pickle(COND))
    state = dict(snap["ema"])
    state["unet.enc.4x4_block0.conv_res1.weight"] = torch.zeros(20, 20, 3, 3)
    monkeypatch.setattr(edm2_adapter, "load_edm2_pickle", lambda path: dict(snap, ema=state))
    with pytest.raises(UCGMError, match=r"tiny-cond\.pkl: unet\.enc\.4x4_block0\.conv_res1\.weight has 20 "
                                        r"channels, not a multiple of model_channels 16"):
        uc.load(COND)


def test_truncated_snapshot(tmp_path: Path) -> None:
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(COND.read_bytes()[: COND.stat().st_size // 2])
    for family in (None, "edm2"):
        with pytest.raises(UCGMError, match=r"cut\.pkl.*(truncated|ends early)"):
            uc.load(cut, family=family)


def test_hostile_snapshot_is_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    path = tmp_path / "edm2-img512-xs-2147483-0.135.pkl"
    path.write_bytes(pickle.dumps({"note": "torch_utils.persistence _reconstruct_persistent_obj", "ema": Evil()}))
    with pytest.raises(UCGMError, match=r"refused to unpickle global (posix|nt)\.system"):
        uc.load(path)
    assert not marker.exists()


def test_sampling_with_guidance_runs(cond) -> None:
    noise = torch.randn(2, *cond.latent_shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 7])
    x = uc.sample(uc.guided(cond, 2.0, (0, 1)), noise, transport=cond.transport, steps=3, y=y)
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_convert_round_trip_through_our_format(cond, expected, tmp_path: Path) -> None:
    reloaded = uc.load(uc.save_checkpoint(cond, tmp_path / "edm2-tiny"))
    assert reloaded.family == "edm2" and reloaded.config["vae"] == cond.config["vae"]
    torch.testing.assert_close(_denoised(reloaded, expected, expected["labels"]), expected["D"], **TOL)
