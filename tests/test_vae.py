"""VAE subsystem: latent-diffusion layout fidelity, key maps, de-normalisation, sources and errors.

Made by scripts/fixtures/make_vae.py (run it with --upstream PATH; see scripts/fixtures/README.md).
Fixtures (tests/fixtures/vae/) were produced OUTSIDE this repository with the upstream
latent-diffusion autoencoder as copied in REPA-E: github.com/End2End-Diffusion/REPA-E, commit
3ad80468e78ec4fc93e6e70aa08e7b3b8303a171, models/autoencoder.py (`AutoencoderKL`, `Encoder`,
`Decoder`; its `dictdot` import replaced by a 3-line dict subclass). Upstream hard-codes 32
GroupNorm groups, so the script set `Normalize.__defaults__ = (4,)`, built
`AutoencoderKL(embed_dim=4, ch_mult=[1, 2])` and replaced its encoder / decoder with
`Encoder(double_z=True, **kw)` / `Decoder(**kw)`, kw = ch 8, out_ch 3, ch_mult (1, 2),
num_res_blocks 2, dropout 0, resamp_with_conv True, in_channels 3, resolution 16, z_channels 4,
and attn_resolutions (8,) for `ldm_f16d32_tiny` (attention inside the lowest level, as the
f16d32 VA-VAE / E2E-VAVAE at 16x16) or () for `ldm_sdvae_tiny` (the SD-VAE f8d4 layout).
Seeds: torch.manual_seed(0) / (1), then every parameter ~ N(0, 0.3^2); inputs after
torch.manual_seed(100) / (101): latents = randn(2, 4, 8, 8), images = rand(2, 3, 16, 16) * 2 - 1.
Saved: `<name>.safetensors` = vae.state_dict() (latent-diffusion key names); `<name>_io.safetensors`
= latents, decoded = vae.decode(latents).sample, images, posterior_mean / posterior_logvar of
vae.encode(images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from ucgm_convert.errors import UCGMError
from ucgm_convert.nets.ldm_vae import autoencoder_kl_config, ldm_to_diffusers
from ucgm_convert.vae import decode, encode, load_vae, to_uint8

FIXTURES = Path(__file__).parent / "fixtures" / "vae"
ATOL = 1e-5


def spec(name: str = "ldm-f16d32", **fields) -> dict:
    """A spec for the tiny VAEs: unit statistics, [-1, 1] output, 4 GroupNorm groups."""
    return {"name": name, "source": None, "latent_mean": 0.0, "latent_std": 1.0, "pixel_range": "-1,1",
            "norm_groups": 4, **fields}


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return load_file(str(FIXTURES / f"{name}.safetensors")), load_file(str(FIXTURES / f"{name}_io.safetensors"))


def tiny_diffusers_kl(seed: int = 0) -> AutoencoderKL:
    """diffusers AutoencoderKL, widths (8, 16), 4 groups, 4 latent channels, random weights."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.3)
    return vae.eval()


# (a) fidelity of the latent-diffusion layout against upstream ------------------------------------

@pytest.mark.parametrize("name", ["ldm_f16d32_tiny", "ldm_sdvae_tiny"])
def test_ldm_layout_matches_upstream(name: str) -> None:
    vae = load_vae(spec(), path=FIXTURES / f"{name}.safetensors")
    _, io = fixture(name)
    with torch.no_grad():
        decoded = vae.decode(io["latents"]).sample
        posterior = vae.encode(io["images"]).latent_dist
    torch.testing.assert_close(decoded, io["decoded"], atol=ATOL, rtol=0)
    torch.testing.assert_close(posterior.mean, io["posterior_mean"], atol=ATOL, rtol=0)
    torch.testing.assert_close(posterior.logvar, io["posterior_logvar"], atol=ATOL, rtol=0)
    # through the public API: unit statistics, [-1, 1] -> [0, 1]; encode gives the posterior mean
    torch.testing.assert_close(decode(io["latents"], spec(), vae), ((io["decoded"] + 1) / 2).clamp(0, 1),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(encode(io["images"], spec(), vae), io["posterior_mean"], atol=ATOL, rtol=0)


def test_attention_levels_read_from_weights() -> None:
    state, _ = fixture("ldm_f16d32_tiny")
    config = autoencoder_kl_config(ldm_to_diffusers(state, "f16d32"), "f16d32", norm_groups=4)
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]
    assert (config["block_out_channels"], config["layers_per_block"], config["latent_channels"]) == ([8, 16], 2, 4)


# (b) latent-diffusion -> diffusers key map for the SD-VAE layout ----------------------------------

def test_ldm_key_map_equals_diffusers_converter() -> None:
    state, io = fixture("ldm_sdvae_tiny")
    ours = ldm_to_diffusers(state, "sdvae")
    config = autoencoder_kl_config(ours, "sdvae", norm_groups=4)
    reference = convert_ldm_vae_checkpoint(state, config)
    assert sorted(ours) == sorted(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    plain = AutoencoderKL(**config).eval()
    plain.load_state_dict(reference, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.decode(io["latents"]).sample, io["decoded"], atol=ATOL, rtol=0)
    vae = load_vae(spec("sd-vae"), path=FIXTURES / "ldm_sdvae_tiny.safetensors")
    assert isinstance(vae, AutoencoderKL)
    torch.testing.assert_close(decode(io["latents"], spec("sd-vae"), vae),
                               ((io["decoded"] + 1) / 2).clamp(0, 1), atol=ATOL, rtol=0)


# sources: diffusers folder, single file, Lightning / REPA-E containers, stored state, Hub cache ----

def test_diffusers_folder_and_single_file(tmp_path: Path) -> None:
    ref = tiny_diffusers_kl()
    ref.save_pretrained(tmp_path / "folder")
    save_file(ref.state_dict(), str(tmp_path / "vae.safetensors"))
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = ((ref.decode(z).sample + 1) / 2).clamp(0, 1)
    for source in (tmp_path / "folder", tmp_path / "vae.safetensors"):
        vae = load_vae(spec("sd-vae"), path=source)
        torch.testing.assert_close(decode(z, spec("sd-vae"), vae), expected, atol=ATOL, rtol=0)


def test_deprecated_diffusers_attention_names(tmp_path: Path) -> None:
    """sd-vae-ft-* files on the Hub predate diffusers' attention rename (query/key/value/proj_attn)."""
    ref = tiny_diffusers_kl(1)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in ref.state_dict().items():
        for new, legacy in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        state[k] = v
    assert any(".query." in k for k in state)
    ref.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(load_vae(spec("sd-vae"), path=tmp_path).decode(z).sample,
                                   ref.decode(z).sample, atol=ATOL, rtol=0)


def test_training_containers_filtered(tmp_path: Path) -> None:
    state, io = fixture("ldm_f16d32_tiny")
    extras = {"loss.discriminator.main.0.weight": torch.zeros(2), "foundation_model.model.cls_token": torch.zeros(2),
              "linear_proj.weight": torch.zeros(2)}
    torch.save({"state_dict": {**state, **extras}, "epoch": 3}, tmp_path / "lightning.ckpt")
    torch.save({"vae": state, "ema": {"x_embedder.proj.weight": torch.zeros(1)}, "steps": 1}, tmp_path / "repae.pt")
    for name in ("lightning.ckpt", "repae.pt"):
        vae = load_vae(spec(), path=tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(vae.decode(io["latents"]).sample, io["decoded"], atol=ATOL, rtol=0)
    torch.save({"state_dict": {**state, "discriminator.fc.weight": torch.zeros(2)}}, tmp_path / "odd.ckpt")
    with pytest.raises(UCGMError, match=r"odd\.ckpt.*unexpected keys.*discriminator\.fc\.weight"):
        load_vae(spec(), path=tmp_path / "odd.ckpt")


def test_folder_with_one_weights_file_and_stats(tmp_path: Path) -> None:
    state, io = fixture("ldm_f16d32_tiny")
    torch.save(state, tmp_path / "e2e-vavae-400k.pt")
    torch.save({"mean": torch.zeros(1, 4, 1, 1)}, tmp_path / "e2e-vavae-400k-latents-stats.pt")
    vae = load_vae(spec(), path=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(io["latents"]).sample, io["decoded"], atol=ATOL, rtol=0)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(UCGMError, match="exactly one VAE weights file.*e2e-vavae-400k.pt, other.pt"):
        load_vae(spec(), path=tmp_path)


def test_stored_state_and_path_precedence(tmp_path: Path) -> None:
    from conftest import tiny_model

    state, io = fixture("ldm_f16d32_tiny")
    with torch.no_grad():
        vae = load_vae(spec(), state=state)
        torch.testing.assert_close(vae.decode(io["latents"]).sample, io["decoded"], atol=ATOL, rtol=0)
    model = tiny_model()
    model.cfg = model.cfg.replace(vae=spec())
    model.vae_state = {"encoder.bogus": torch.zeros(1)}  # an explicit path wins over stored weights
    vae = model.load_vae(path=FIXTURES / "ldm_f16d32_tiny.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(io["latents"]).sample, io["decoded"], atol=ATOL, rtol=0)
    model.vae_state = dict(state)
    assert isinstance(model.load_vae(), AutoencoderKL)


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The on-disk layout huggingface_hub's cache uses (refs/main -> snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())


def test_hub_id_from_cache_and_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    ref = tiny_diffusers_kl()
    ref.save_pretrained(tmp_path / "saved")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-vae",
                    {n: tmp_path / "saved" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")})
    vae = load_vae(spec("sd-vae", source="someone/tiny-vae"))
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, ref.decode(z).sample, atol=ATOL, rtol=0)
    with pytest.raises(UCGMError, match=r"download the repo REPA-E/e2e-vavae"):
        load_vae(spec(source="REPA-E/e2e-vavae"))


def test_dc_ae_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                        decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm").eval()
    ref.save_pretrained(tmp_path)
    dc = spec("dc-ae", latent_mean=0.5, latent_std=2.0)
    vae = load_vae(dc, path=tmp_path)
    m = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected = ((ref.decode(m * 2.0 + 0.5).sample + 1) / 2).clamp(0, 1)
        images = torch.rand(2, 3, 8, 8) * 2 - 1
        expected_latents = (ref.encode(images).latent - 0.5) / 2.0
        torch.testing.assert_close(encode(images, dc, vae), expected_latents, atol=ATOL, rtol=0)
    torch.testing.assert_close(decode(m, dc, vae), expected, atol=ATOL, rtol=0)
    with pytest.raises(UCGMError, match="DC-AE needs its diffusers config"):
        load_vae(dc, path=tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UCGMError, match="_class_name is 'AutoencoderDC', but VAE 'sd-vae'"):
        load_vae(spec("sd-vae"), path=tmp_path)


# (c) de-normalisation and pixel ranges by hand -------------------------------------------------

def test_identity_denormalisation_and_ranges() -> None:
    m = torch.tensor([[[[-3.0]], [[0.25]], [[1.0]]]])  # [1, 3, 1, 1]
    # z = m * std + mean per channel: [-3*0.5+1, 0.25*2+0, 1*1-0.5] = [-0.5, 0.5, 0.5]
    per_channel = {"name": "identity", "latent_mean": [1.0, 0.0, -0.5], "latent_std": [0.5, 2.0, 1.0]}
    # "-1,1": (z + 1) / 2 -> [0.25, 0.75, 0.75]
    assert decode(m, {**per_channel, "pixel_range": "-1,1"}).flatten().tolist() == [0.25, 0.75, 0.75]
    # "0,1": clamp only -> [0, 0.5, 0.5]
    assert decode(m, {**per_channel, "pixel_range": "0,1"}).flatten().tolist() == [0.0, 0.5, 0.5]
    # scalar statistics (DDT: mean 0, std 1/0.18215): z = m / 0.18215
    scalar = {"name": "identity", "latent_mean": 0.0, "latent_std": 1 / 0.18215, "pixel_range": "0,1"}
    torch.testing.assert_close(decode(torch.full((1, 1, 1, 1), 0.09), scalar), torch.full((1, 1, 1, 1), 0.09 / 0.18215))
    # the default identity spec keeps the demo behaviour and encode inverts the statistics
    x = torch.tensor([[[[-2.0, -1.0, 0.0, 1.0, 3.0]]]])
    assert decode(x, {"name": "identity"}).flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    torch.testing.assert_close(decode(encode(images, per_channel), per_channel), (images + 1) / 2)


def test_kl_denormalisation_and_sampling() -> None:
    vae = load_vae(spec(), path=FIXTURES / "ldm_f16d32_tiny.safetensors")
    _, io = fixture("ldm_f16d32_tiny")
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 4.0]
    s = spec(latent_mean=mean, latent_std=std, pixel_range="0,1")
    m = torch.randn(2, 4, 8, 8)
    mean_t, std_t = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = vae.decode(m * std_t + mean_t).sample.clamp(0, 1)
    torch.testing.assert_close(decode(m, s, vae), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(encode(io["images"], s, vae), (io["posterior_mean"] - mean_t) / std_t, atol=ATOL, rtol=0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    drawn = encode(io["images"], s, vae, noise=noise)  # the posterior draw mean + std * noise, as upstream's sample()
    posterior = io["posterior_mean"] + (0.5 * io["posterior_logvar"]).exp() * noise
    torch.testing.assert_close(drawn, (posterior - mean_t) / std_t, atol=ATOL, rtol=0)
    assert not torch.allclose(drawn, encode(io["images"], s, vae))


def test_to_uint8() -> None:
    images = torch.tensor([0.0, 0.5, 1.0, 0.499]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = to_uint8(images)
    assert out.shape == (1, 2, 2, 3) and out.dtype == torch.uint8
    assert out[0, :, :, 0].flatten().tolist() == [0, 128, 255, 127]


def test_to_uint8_truncates_like_the_ucgm_reference_and_rounds_half_up_like_lightningdit() -> None:
    x = torch.tensor([0.999, 0.5, 1.0, 0.499, 1.5, -0.2]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    assert to_uint8(x, "truncate")[0, :, :, 0].flatten().tolist() == [254, 127, 255, 127, 255, 0]
    # numpy's truncating cast of x * 255 (UCGM metrics/torch_quality.py) on the same values
    assert to_uint8(x, "truncate")[0, :, :, 0].flatten().tolist() == (x[0, 0].clamp(0, 1) * 255).numpy().astype(
        np.uint8).flatten().tolist()
    assert to_uint8(x, "round")[0, :, :, 0].flatten().tolist() == [255, 128, 255, 127, 255, 0]
    # LightningDiT decode_to_images: clamp(127.5 * y + 128, 0, 255) -> uint8 with y = 2 x - 1
    y = x[0, 0].clamp(0, 1) * 2 - 1
    assert to_uint8(x, "round")[0, :, :, 0].tolist() == torch.clamp(127.5 * y + 128.0, 0, 255).to(torch.uint8).tolist()
    with pytest.raises(UCGMError, match="uint8 rule"):
        to_uint8(x, "nearest")


# (d) bad inputs ------------------------------------------------------------------------------

def test_missing_and_unknown_keys_named(tmp_path: Path) -> None:
    state, _ = fixture("ldm_f16d32_tiny")
    missing = {k: v for k, v in state.items() if k != "decoder.up.0.block.1.norm2.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    renamed_key = r"decoder\.up_blocks\.1\.resnets\.1\.norm2\.weight"  # up.0 is diffusers' last up block
    with pytest.raises(UCGMError, match=r"missing\.safetensors.*missing keys: " + renamed_key):
        load_vae(spec(), path=tmp_path / "missing.safetensors")
    extra = {**state, "encoder.down.0.block.0.temb_proj.weight": torch.zeros(8, 4)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UCGMError, match=r"extra\.safetensors.*encoder\.down\.0\.block\.0\.temb_proj\.weight"):
        load_vae(spec(), path=tmp_path / "extra.safetensors")
    wrong = dict(state, **{"decoder.conv_in.weight": torch.zeros(16, 5, 3, 3)})
    with pytest.raises(UCGMError, match="shape mismatch|latent"):
        load_vae(spec(), state=wrong)
    with pytest.raises(UCGMError, match="norm_groups 3 does not fit"):
        load_vae(spec(norm_groups=3), state=state)


def test_bad_specs_and_sources(tmp_path: Path) -> None:
    with pytest.raises(UCGMError, match="vae spec: name: expected one of 'identity', 'sd-vae', 'ldm-f16d32', 'dc-ae', got 'sd-vea'"):
        decode(torch.zeros(1, 4, 2, 2), spec("sd-vea"))
    with pytest.raises(UCGMError, match="pass --vae PATH"):
        load_vae(spec())
    with pytest.raises(UCGMError, match="VAE 'sd-vae' needs latent_std"):
        load_vae({"name": "sd-vae", "latent_mean": 0.0, "pixel_range": "-1,1"})
    with pytest.raises(UCGMError, match="pixel_range"):
        decode(torch.zeros(1, 1, 1, 1), {"name": "identity", "pixel_range": "0,255"})
    with pytest.raises(UCGMError, match="latent_std has 2 values but the latents have 4 channels"):
        decode(torch.zeros(1, 4, 1, 1), {"name": "identity", "latent_std": [1.0, 2.0]})
    with pytest.raises(UCGMError, match="vae spec: scale: unknown key; allowed keys: name, source"):
        decode(torch.zeros(1, 1, 1, 1), {"name": "identity", "scale": 2})
    with pytest.raises(UCGMError, match="needs its network"):
        decode(torch.zeros(1, 4, 2, 2), spec())
    with pytest.raises(UCGMError, match="no such file or folder"):
        load_vae(spec(), path=tmp_path / "nope.pt")
    (tmp_path / "truncated.pt").write_bytes((FIXTURES / "ldm_f16d32_tiny.safetensors").read_bytes()[:100])
    with pytest.raises(UCGMError, match="truncated.pt"):
        load_vae(spec(), path=tmp_path / "truncated.pt")
    (tmp_path / "truncated.safetensors").write_bytes((FIXTURES / "ldm_f16d32_tiny.safetensors").read_bytes()[:1000])
    with pytest.raises(UCGMError, match="truncated.safetensors"):
        load_vae(spec(), path=tmp_path / "truncated.safetensors")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UCGMError, match="no VAE weights"):
        load_vae(spec("sd-vae"), path=tmp_path / "cfg")
