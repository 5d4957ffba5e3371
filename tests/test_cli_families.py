"""End to end through the CLI, for every family's published format: sample -> PNG, convert, hostile input.

Each case is a tiny fixture of the adapter tests in its upstream container (REPA-E train_repae.py
end-to-end `.pt`, LightningDiT train.py `.pt` + a latents_stats file, DDT Lightning `.ckpt`, EDM2
`.pkl`, our own folder). VAEs that a file does not carry are tiny random diffusers AutoencoderKL
folders (2 levels, so images are 2x the latent grid) written to tmp_path and passed with --vae;
REPA-E's in-file VAE is exercised with a copy of the fixture whose `vae` has 32-group widths
(the tiny fixture VAE has 4 GroupNorm groups, which its weights cannot tell; see
test_tiny_in_file_vae_with_4_groups_fails_cleanly). Our own format is the pixel-space tiny SiT of
conftest.py (identity VAE, so images are the latent grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from test_adapter_lightningdit import write_checkpoint as write_lightningdit
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.generation import balanced_labels, generate_batch
from ucgm_convert.images import grid_image
from ucgm_convert.nets.ldm_vae import ldm_to_diffusers
from ucgm_convert.recipe import load_recipe
from ucgm_convert.settings import SamplingSettings

FIXTURES = Path(__file__).parent / "fixtures"
NUM, STEPS, SEED = 2, 2, 0
runner = CliRunner()


@dataclasses.dataclass
class Case:
    """One family's fixture and how to load it: CLI flags, the matching `uc.load` overrides, its VAE."""

    path: Path
    flags: list[str]
    overrides: dict
    latent_channels: int
    wrong_family: str
    vae_dir: Path | None = None  # a tiny diffusers folder passed with --vae (None: the model's own VAE)

    @property
    def vae_flags(self) -> list[str]:
        return ["--vae", str(self.vae_dir)] if self.vae_dir else []


def tiny_kl(latent_channels: int, seed: int, widths: tuple[int, ...] = (8, 16), groups: int = 4,
            layers: int = 1) -> AutoencoderKL:
    """A random diffusers AutoencoderKL (downsampling 2 ** (len(widths) - 1)), weights ~ N(0, 0.3^2)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(widths),
                        up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                        layers_per_block=layers, norm_num_groups=groups, latent_channels=latent_channels)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.3)
    return vae.eval()


def tiny_vae_folder(folder: Path, latent_channels: int, seed: int = 0) -> Path:
    """tiny_kl saved as a diffusers folder (config.json + diffusion_pytorch_model.safetensors), for --vae."""
    tiny_kl(latent_channels, seed).save_pretrained(folder)
    return folder


def read_torch_file(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    tmp = tmp_path_factory.mktemp("families")
    lightningdit = write_lightningdit("full", tmp / "lightningdit.pt")  # 6 channels, 8x8 latents
    stats = tmp / "stats" / "latents_stats.pt"
    stats.parent.mkdir()
    torch.save({"mean": torch.linspace(-0.5, 0.5, 6).view(1, 6, 1, 1), "std": torch.linspace(0.5, 2, 6).view(1, 6, 1, 1)},
               stats)
    vae4 = tiny_vae_folder(tmp / "vae4", 4)
    return {
        "repa-e": Case(FIXTURES / "repa_e" / "e2e.pt", ["--num-heads", "2"], {"num_heads": 2}, 4, "lightningdit",
                       vae4),
        "lightningdit": Case(lightningdit, ["--latent-stats", str(stats)], {"latent_stats": str(stats)}, 6, "repa-e",
                             tiny_vae_folder(tmp / "vae6", 6, seed=1)),
        "ddt": Case(FIXTURES / "ddt" / "ddt_tiny_lightning.ckpt", ["--resolution", "64"], {"resolution": 64}, 4,
                    "edm2", vae4),
        "edm2": Case(FIXTURES / "edm2" / "tiny-cond.pkl", [], {}, 4, "ddt", vae4),
        "ucgm": Case(uc.save_checkpoint(tiny_model(), tmp / "ours"), [], {}, 3, "repa-e"),
        "repa": Case(FIXTURES / "repa" / "repa.pt", ["--num-heads", "2"], {"num_heads": 2}, 4, "sit", vae4),
        "sit": Case(FIXTURES / "sit" / "SiT-T-2-64.pt", ["--num-heads", "2"], {"num_heads": 2}, 4, "repa", vae4),
        "dit": Case(FIXTURES / "dit" / "DiT-T-2-64.pt", ["--num-heads", "2"], {"num_heads": 2}, 4, "edm2", vae4),
    }


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    """The single non-empty stderr line of a failed command (no traceback, no table)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def fixed_inputs(model: uc.GenerativeModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, *model.latent_shape, generator=gen)
    return x, torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, model.num_classes - 1, model.null_class])


def check_sample_output(out: Path, model: uc.GenerativeModel, vae: torch.nn.Module, factor: int) -> None:
    """samples.npz holds the model's latents decoded by `vae` at factor x the latent grid; grid.png tiles them."""
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    side = model.latent_shape[1] * factor
    assert images.shape == (NUM, side, side, 3) and images.dtype == np.uint8
    assert labels.tolist() == balanced_labels(NUM, range(model.num_classes))
    assert all(len(np.unique(img)) > 8 for img in images)  # not constant: real decoded pictures
    base = model.cfg.sampling or (load_recipe(model.recipe).sampling if model.recipe else None)  # else its recipe's
    settings = base.replace(steps=STEPS) if base is not None else SamplingSettings(steps=STEPS)
    _, expected = generate_batch(model, settings, labels.tolist(), range(NUM), SEED, vae_module=vae)
    assert np.array_equal(images, expected.numpy())
    assert np.array_equal(np.asarray(Image.open(out / "grid.png").convert("RGB")), np.asarray(grid_image(images)))


FAMILIES = ("repa-e", "lightningdit", "ddt", "edm2", "ucgm", "repa", "sit", "dit")


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_writes_decoded_images(family: str, cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases[family]
    result = runner.invoke(app, ["sample", "--checkpoint", str(case.path), "--family", family, *case.flags,
                                 *case.vae_flags, "--steps", str(STEPS), "--num", str(NUM), "--seed", str(SEED),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = uc.load(case.path, **case.overrides)
    vae = model.load_vae(case.vae_dir)
    check_sample_output(tmp_path / "out", model, vae, factor=1 if case.vae_dir is None else 2)


def e2e_with_32_group_vae(path: Path) -> Path:
    """The REPA-E end-to-end fixture with `vae` replaced by a random 32-group KL VAE in latent-diffusion names.

    The names come from the tiny latent-diffusion fixture (same layout: 2 levels, 2 res blocks,
    mid attention, no level attention); the tensors from a diffusers VAE of widths (32, 64).
    """
    layout = load_file(FIXTURES / "vae" / "ldm_sdvae_tiny.safetensors")
    by_storage = {v.data_ptr(): k for k, v in layout.items()}
    diffusers_name = {by_storage[v.data_ptr()]: k for k, v in ldm_to_diffusers(layout, "layout").items()}
    weights = tiny_kl(4, 3, (32, 64), groups=32, layers=2).state_dict()
    ckpt = read_torch_file(FIXTURES / "repa_e" / "e2e.pt")
    ckpt["vae"] = {}
    for key, like in layout.items():
        value = weights[diffusers_name[key]]
        ckpt["vae"][key] = value.reshape(*value.shape, *(1,) * (like.ndim - value.ndim))  # attention: 1x1 convs
    torch.save(ckpt, path)
    return path


def test_repa_e_in_file_vae_through_sample_and_convert(tmp_path: Path) -> None:
    """The VAE stored in an end-to-end checkpoint decodes the CLI's samples, also after `ucgm convert`."""
    path = e2e_with_32_group_vae(tmp_path / "e2e32.pt")
    code, _, stderr = invoke("convert", str(path), "--num-heads", "2", "--out", str(tmp_path / "ours"))
    assert code == 0, stderr
    for source, flags in ((path, ["--num-heads", "2"]), (tmp_path / "ours", [])):
        out = tmp_path / f"out-{source.name}"
        result = runner.invoke(app, ["sample", "--checkpoint", str(source), *flags, "--steps", str(STEPS),
                                     "--num", str(NUM), "--out", str(out)])
        if isinstance(result.exception, ValueError):
            raise result.exception
        assert result.exit_code == 0, result.output
        model = uc.load(source, **({"num_heads": 2} if flags else {}))
        assert model.vae_state is not None
        check_sample_output(out, model, model.load_vae(), factor=2)


def test_tiny_in_file_vae_with_4_groups_fails_cleanly(cases: dict[str, Case], tmp_path: Path) -> None:
    """GroupNorm group counts are not in the weights: the 4-group tiny VAE cannot decode with the default 32.

    The CLI has no way to pass the spec's norm_groups, so this is one clear error line (the
    --vae override path is what test_sample_writes_decoded_images exercises).
    """
    code, _, stderr = invoke("sample", "--checkpoint", str(cases["repa-e"].path), "--num-heads", "2",
                             "--steps", "2", "--num", "2", "--out", str(tmp_path / "o"))
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "norm_groups 32" in errors[0] and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_is_bit_identical(family: str, cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases[family]
    code, _, stderr = invoke("convert", str(case.path), "--out", str(tmp_path / "ours"), *case.flags)
    assert code == 0, stderr
    source, converted = uc.load(case.path, **case.overrides), uc.load(tmp_path / "ours")
    assert converted.family == source.family and converted.config == source.config
    inputs = fixed_inputs(source)
    with torch.no_grad():
        assert torch.equal(converted(*inputs), source(*inputs))
    if source.vae_state is None:
        assert converted.vae_state is None
    else:
        assert converted.vae_state.keys() == source.vae_state.keys()
        assert all(torch.equal(converted.vae_state[k], v) for k, v in source.vae_state.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_family_is_one_line(family: str, cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases[family]
    code, _, stderr = invoke("sample", "--checkpoint", str(case.path), "--family", case.wrong_family,
                             "--steps", "2", "--out", str(tmp_path / "o"))
    line = one_error_line(stderr)
    assert code == 2
    assert str(case.path) in line and repr(case.wrong_family) in line and repr(family) in line, line
    assert not (tmp_path / "o").exists()


def truncated_copy(path: Path, folder: Path) -> Path:
    """A copy of `path` cut to half its bytes (of model.safetensors, for a folder in our format)."""
    if path.is_dir():
        copy = shutil.copytree(path, folder / path.name)
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return copy
    copy = folder / path.name
    copy.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("command", ["sample", "convert"])
def test_truncated_file_is_one_line(family: str, command: str, cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases[family]
    cut = truncated_copy(case.path, tmp_path)
    out = ["--out", str(tmp_path / "o")]
    args = ["sample", "--checkpoint", str(cut), "--steps", "2", *out] if command == "sample" else ["convert", str(cut), *out]
    for family_flag in ([], ["--family", family]):
        code, _, stderr = invoke(*args, *family_flag)
        line = one_error_line(stderr)
        assert code == 2 and re.search(re.escape(str(cut)), line), line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["repa-e", "lightningdit", "ddt", "repa", "sit", "dit"])
def test_truncated_torch_zip_is_called_truncated(family: str, cases: dict[str, Case], tmp_path: Path) -> None:
    cut = truncated_copy(cases[family].path, tmp_path)
    code, _, stderr = invoke("convert", str(cut), "--out", str(tmp_path / "o"))
    assert code == 2 and "truncated" in one_error_line(stderr).replace(str(cut), "FILE")


def test_ddt_encoder_depth_comes_from_the_recipe_and_the_flag_overrides_it(cases: dict[str, Case],
                                                                          tmp_path: Path) -> None:
    from ucgm_convert.recipe import apply_overrides, load_recipe, recipe_text

    case = cases["ddt"]
    recipe = tmp_path / "ddt-tiny.yaml"
    recipe.write_text(recipe_text("ddt-256").replace("encoder_depth: 22", "encoder_depth: 2"))
    outs = {}
    for name, extra in (("recipe", []), ("flag", ["--encoder-depth", "1"])):
        result = runner.invoke(app, ["sample", "--from", str(recipe), "--checkpoint", str(case.path), *case.flags,
                                     *case.vae_flags, "--steps", "2", "--cfg", "1.0", "--num", "2",
                                     "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / name / "samples.npz") as data:
            outs[name] = data["arr_0"]
    for name, depth in (("recipe", 2), ("flag", 1)):
        model = uc.load(case.path, **{**case.overrides, "encoder_depth": depth})
        vae = model.load_vae(case.vae_dir)
        settings = apply_overrides(load_recipe(recipe).sampling, steps=2, cfg_scale=1.0)
        expected = generate_batch(model, settings, [0, 1], range(2), 0, vae_module=vae)[1].numpy()
        assert np.array_equal(outs[name], expected), name
