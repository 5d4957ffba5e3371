"""LightningDiT adapter: outputs equal upstream's on tiny random models in upstream's file layout.

Made by scripts/fixtures/make_lightningdit.py (run it with --upstream PATH; see scripts/fixtures/README.md).
How the fixtures in tests/fixtures/lightningdit/ were produced (outside this repository):
upstream hustvl/LightningDiT at commit 2725fed42a14898744433809949834e26957bcdd, its own
`models.lightningdit.LightningDiT` (with TORCHDYNAMO_DISABLE=1 so the @torch.compile decorators
run eagerly, XFORMERS_DISABLED=1, einops 0.8.2 and torchdiffeq 0.2.5 from PyPI, fairscale
stubbed: models/rmsnorm.py imports it only for its unused Llama classes) on CPU, torch 2.14.1,
float32. Per variant (<name>.json holds the constructor arguments; 0.17-0.68M parameters,
10 classes, 8x8 latents; the "model" weights of train.py containers use seed "model_seed"):
  full     RMSNorm + SwiGLU + RoPE (the released recipe), 6 channels, patch 1, hidden 96, 4 heads
  qknorm   the same + q/k RMSNorm, 4 channels, patch 2, hidden 128, 2 heads
  noshift  LayerNorm, GELU MLP, no RoPE, LayerNorm q/k norm, wo_shift, learn_sigma, hidden 64, 2 heads
  plain    nothing switched on (SiT layout), hidden 128, 2 heads
The upstream model was built (torch.manual_seed(0)); its state-dict key names and shapes, minus
the fixed tables pos_embed / feat_rope.freqs_{cos,sin}, were saved to <name>.json as "keys";
every other tensor was replaced by `random_state(keys, seed)` below (nonzero adaLN, so every
gate is live); the fixed tables were saved as-is ("fixed.*"). Then, with upstream code:
  out      = model.eval()(x, t, y) on x = randn(3, C, 8, 8) (Generator seed 100 + seed),
             t = [0.05, 0.5, 0.9], y = [1, 7, 10] (10 = null class);
  cfg_in / cfg_out = model.forward_with_cfg(cat[cfg_x, cfg_x], t, cat[cfg_y, null], cfg_scale=4,
             cfg_interval=True, cfg_interval_start=0.125)[:2] at t = 0.6 and t = 0.1;
  path_*   = transport.path.ICPlan().plan(t, noise, data) (full only): upstream's x_t and target.
The tests rebuild each checkpoint in upstream's container (train.py's {"model", "ema", "opt",
"config"} or a bare state dict; "model" gets different weights, so using it instead of "ema"
fails) and compare our outputs with upstream's.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ucgm_convert as uc
from ucgm_convert.adapters import detect_family, get_family
from ucgm_convert.nets.lightningdit import LightningDiT

FIXTURES = Path(__file__).parent / "fixtures" / "lightningdit"
VARIANTS = ("full", "qknorm", "noshift", "plain")
ATOL = 1e-5


def random_state(spec: list, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for (name, shape) pairs: randn / sqrt(fan_in), norms 1 + 0.1 randn, biases 0.1 randn."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec:
        value = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) >= 2:
            value = value / math.prod(shape[1:]) ** 0.5
        elif "norm" in name:
            value = 1 + 0.1 * value
        else:
            value = 0.1 * value
        out[name] = value
    return out


def fixture(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((FIXTURES / f"{name}.json").read_text()), load_file(FIXTURES / f"{name}.safetensors")


def upstream_state(name: str, seed_key: str = "seed") -> dict[str, torch.Tensor]:
    """The tiny model's weights exactly as fed to upstream (seeded tensors + upstream's fixed tables)."""
    meta, tensors = fixture(name)
    state = random_state(meta["keys"], meta[seed_key])
    if seed_key == "seed":
        total = float(sum(v.double().sum() for v in state.values()))
        assert total == pytest.approx(meta["checksum"], rel=1e-12), "torch.randn no longer reproduces the fixture"
    state.update({k[len("fixed."):]: v for k, v in tensors.items() if k.startswith("fixed.")})
    return state


def write_checkpoint(name: str, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save variant `name` in upstream's container: train.py's dict (with an AdamW state) or bare."""
    meta, _ = fixture(name)
    state = upstream_state(name) if state is None else state
    if meta["container"] == "bare":
        torch.save(state, path)
        return path
    training = upstream_state(name, "model_seed")
    params = [v.clone().requires_grad_(True) for k, v in training.items()
              if not k.startswith(("pos_embed", "feat_rope"))]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0, betas=(0.9, 0.95))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    torch.save({"model": training, "ema": state, "opt": opt.state_dict(), "config": meta["config"]}, path)
    return path


def load_quiet(path: Path, **kwargs) -> uc.GenerativeModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return uc.load(path, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant written once in upstream's container (tests that alter a file write their own)."""
    folder = tmp_path_factory.mktemp("lightningdit")
    return {name: write_checkpoint(name, folder / f"{name}.pt") for name in VARIANTS}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> dict[str, uc.GenerativeModel]:
    return {name: load_quiet(path) for name, path in checkpoints.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_upstream(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    meta, fx = fixture(name)
    model = models[name]
    kwargs = meta["upstream_kwargs"]
    got = model.cfg.arch_kwargs
    for flag in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "learn_sigma"):
        assert got[flag] == kwargs.get(flag, False), flag
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        assert got[key] == kwargs[key], key
    assert model.family == "lightningdit" and model.recipe == "lightningdit"
    assert model.latent_shape == (kwargs["in_channels"], 8, 8)
    assert model.num_classes == 10 and model.null_class == 10
    with torch.no_grad():
        out = model(fx["x"], fx["t"], fx["y"])
    torch.testing.assert_close(out, fx["out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_guidance_matches_forward_with_cfg(name: str, models: dict[str, uc.GenerativeModel]) -> None:
    """uc.guided with the model's policy = upstream forward_with_cfg: first 3 channels guided, rest conditional."""
    meta, fx = fixture(name)
    model = models[name]
    assert model.guidance_channels == 3
    cfg = meta["cfg"]
    fn = uc.guided(model, cfg["scale"], (cfg["interval_start"], 1.0))
    with torch.no_grad():
        for tag in ("in", "out"):
            t = torch.full((2,), cfg[f"t_{tag}"])
            torch.testing.assert_close(fn(fx["cfg_x"], t, fx["cfg_y"]), fx[f"cfg_{tag}"], atol=ATOL, rtol=0)
        # channels="all" guides the rest too, so it must differ from upstream's 3-channel policy there
        t = torch.full((2,), cfg["t_in"])
        every_fn = uc.guided(model, cfg["scale"], (cfg["interval_start"], 1.0), channels="all")
        every = every_fn(fx["cfg_x"], t, fx["cfg_y"])
    torch.testing.assert_close(every[:, :3], fx["cfg_in"][:, :3], atol=ATOL, rtol=0)
    assert (every[:, 3:] - fx["cfg_in"][:, 3:]).abs().max() > 1e-3


def test_transport_is_upstream_path() -> None:
    """Upstream's ICPlan x_t and velocity target are ReLinear's x_t and F: no time or sign flip."""
    _, fx = fixture("full")
    transport = uc.get_transport("ReLinear")
    t = fx["path_t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(transport.interpolate(fx["path_data"], fx["path_noise"], t), fx["path_xt"])
    torch.testing.assert_close(transport.target(fx["path_data"], fx["path_noise"], t), fx["path_ut"])
    assert transport.integrates_forward  # upstream integrates t: 0 (noise) -> 1 (data)


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_network_recomputes_upstream_tables(name: str) -> None:
    """A freshly built net (GenerativeModel.build) has upstream's pos_embed and RoPE tables."""
    meta, fx = fixture(name)
    switches = dict.fromkeys(("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "learn_sigma"), False)
    net = LightningDiT(**{**switches, **meta["upstream_kwargs"]})  # upstream's argument names; its defaults are off
    state = net.state_dict()
    fixed = {k[len("fixed."):]: v for k, v in fx.items() if k.startswith("fixed.")}
    assert set(fixed) == {k for k in state if k.startswith(("pos_embed", "feat_rope"))}
    for key, value in fixed.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0)


def test_saved_in_our_format_reloads_identically(models: dict[str, uc.GenerativeModel], tmp_path: Path) -> None:
    _, fx = fixture("qknorm")
    model = models["qknorm"]
    again = uc.load_checkpoint(uc.save_checkpoint(model, tmp_path / "ours"))
    assert again.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(again(fx["x"], fx["t"], fx["y"]), fx["out"], atol=ATOL, rtol=0)


def test_latent_statistics(tmp_path: Path) -> None:
    path = write_checkpoint("full", tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match="latent statistics"):
        model = uc.load(path)
    assert model.cfg.vae.to_dict() == {"norm_groups": 32, "name": "ldm-f16d32", "source": None, "latent_mean": 0.0, "latent_std": 1.0,
                             "pixel_range": "-1,1"}
    mean, std = torch.linspace(-1, 1, 6).view(1, 6, 1, 1), torch.linspace(0.5, 2, 6).view(1, 6, 1, 1)
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")  # found next to the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae = uc.load(path).cfg.vae.to_dict()
    assert vae["latent_mean"] == pytest.approx(mean.flatten().tolist())
    assert vae["latent_std"] == pytest.approx(std.flatten().tolist())
    other = tmp_path / "elsewhere.pt"
    torch.save({"mean": mean * 0 + 3, "std": std}, other)
    assert uc.load(path, latent_stats=other).cfg.vae.latent_mean == [3.0] * 6
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, other)
    with pytest.raises(uc.UCGMError, match="elsewhere.pt.*6 values"):
        uc.load(path, latent_stats=other)


def test_hub_style_folder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A folder with one checkpoint (a Hub snapshot) loads it, with the latents_stats.pt beside it."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "lightningdit-xl-imagenet256-800ep.pt").write_bytes(checkpoints["full"].read_bytes())
    torch.save({"mean": torch.full((1, 6, 1, 1), 0.5), "std": torch.full((1, 6, 1, 1), 2.0)},
               folder / "latents_stats.pt")
    model = uc.load(folder)
    assert model.family == "lightningdit" and model.cfg.vae.latent_std == [2.0] * 6
    (folder / "copy.pt").write_bytes(checkpoints["qknorm"].read_bytes())
    with pytest.raises(uc.UCGMError, match="several LightningDiT checkpoints"):
        uc.load(folder, family="lightningdit")


def test_detection_and_family_override(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(checkpoints["full"].read_bytes())
    for name in VARIANTS:
        assert detect_family(checkpoints[name]).name == "lightningdit", name
    assert detect_family(renamed).name == "lightningdit"
    assert load_quiet(renamed, family="lightningdit").family == "lightningdit"
    with pytest.raises(uc.UCGMError, match="does not look like a 'ddt'"):
        uc.load(renamed, family="ddt")
    # the plain layout without train.py's config is a SiT/DiT state dict, not recognisably LightningDiT
    bare_plain = tmp_path / "plain.pt"
    torch.save(upstream_state("plain"), bare_plain)
    assert not get_family("lightningdit").detect(bare_plain)


def test_overrides(checkpoints: dict[str, Path]) -> None:
    rope = checkpoints["full"]
    with pytest.raises(uc.UCGMError, match="unknown override.*bogus.*num_heads, latent_stats"):
        uc.load(rope, bogus=1)
    with pytest.raises(uc.UCGMError, match="num_heads=2 contradicts"):
        load_quiet(rope, num_heads=2)
    model = load_quiet(checkpoints["plain"], num_heads=4)  # no RoPE / q-k norm: heads are a choice
    assert model.cfg.arch_kwargs["num_heads"] == 4 and model.net.blocks[0].attn.num_heads == 4


def test_key_problems_named(tmp_path: Path) -> None:
    state = upstream_state("qknorm")
    del state["blocks.1.attn.proj.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(3)
    path = write_checkpoint("qknorm", tmp_path / "bad.pt", state)
    with pytest.raises(uc.UCGMError, match=r"bad\.pt.*missing keys: blocks\.1\.attn\.proj\.bias.*unexpected keys: "
                                           r"blocks\.0\.attn\.extra"):
        load_quiet(path, family="lightningdit")


def test_rope_table_must_fit_latent_grid(tmp_path: Path) -> None:
    state = upstream_state("full")
    state["feat_rope.freqs_cos"] = state["feat_rope.freqs_cos"][:16]
    path = write_checkpoint("full", tmp_path / "rope.pt", state)
    with pytest.raises(uc.UCGMError, match=r"rope\.pt: tensor feat_rope\.freqs_cos has shape \[16, 24\]"):
        load_quiet(path)


def test_truncated_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = checkpoints["full"]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(uc.UCGMError, match=r"cut.pt: .*truncated or corrupted"):
        uc.load(cut, family="lightningdit")
    with pytest.raises(uc.UCGMError, match=r"cut.pt: not a readable PyTorch checkpoint \(truncated or corrupted\?\)"):
        get_family("lightningdit").load(cut)


def test_guided_sampling_runs(models: dict[str, uc.GenerativeModel]) -> None:
    model = models["full"]
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 5])
    out = uc.sample(uc.guided(model, 2.0, (0, 1)), noise, transport=model.transport, steps=3, y=y)
    assert out.shape == noise.shape and torch.isfinite(out).all()
