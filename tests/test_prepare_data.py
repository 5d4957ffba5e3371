"""`ucgm prepare-data`: image tree -> sharded model-space latents + labels + meta.json.

Everything runs for real on tiny inputs: a 3-class tree of random images of various sizes and
aspect ratios (plus a corrupt .jpg and a .txt), the identity "VAE" and a tiny random diffusers
AutoencoderKL saved as a local diffusers folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import ucgm_convert.jobs.prepare.encode as pe
import ucgm_convert.jobs.prepare.job as pd
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.latent_folder import LatentFolder
from ucgm_convert.jobs import prepare
from ucgm_convert.jobs.prepare.images import center_crop_arr, list_images, load_image, to_pixel_range
from ucgm_convert.jobs.source import ArchOverrides, ModelSource
from ucgm_convert.settings import VaeSpec

SIZES = [(40, 30), (17, 33), (64, 64), (100, 20), (16, 16)]  # (width, height)
CLASSES = ["cat", "dog", "fish"]


def prepare_data(images: Path, out: Path, *, vae: str | None = None, recipe: str | None = None,
                 checkpoint: str | None = None, resolution: int | None = None, **flags: object) -> prepare.PrepareResult:
    """`prepare.run` with the flags as keywords (model-source and resolution flags in their groups)."""
    source = ModelSource(vae=vae, recipe=recipe, checkpoint=checkpoint)
    return prepare.run(prepare.PrepareConfig(images=images, out=out, source=source,
                                             arch=ArchOverrides(resolution=resolution), **flags))


def make_tree(root: Path) -> Path:
    """3 classes x 5 images (jpg / png, RGB / L / RGBA / P) + dog/broken.jpg + cat/notes.txt + README.md."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "RGB", "P"]
    for _c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(modes[i])
            suffix = ".png" if modes[i] in ("RGBA", "P") or i % 2 else ".jpg"
            img.save(root / name / f"img{i}{suffix}")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("a dataset")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random diffusers AutoencoderKL (factor 2, 4 latent channels) saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("vae") / "tiny-kl"
    vae.eval().save_pretrained(folder)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def all_rows(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    meta = json.loads((folder / "meta.json").read_text())
    shards = [load_file(str(folder / name)) for name in meta["shards"]]
    return torch.cat([s["latents"] for s in shards]), torch.cat([s["labels"] for s in shards])


def expected_pixels(tree: Path, res: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The readable images in sorted order, cropped by load_image, in [-1, 1]; with their labels."""
    files, labels = [], []
    for c, name in enumerate(CLASSES):
        for p in sorted((tree / name).iterdir()):
            if p.suffix in (".jpg", ".png") and p.name != "broken.jpg":
                files.append(f"{name}/{p.name}")
                labels.append(c)
    arrs = np.stack([load_image(tree / f, res) for f in files])
    return files, to_pixel_range(arrs, "-1,1"), torch.tensor(labels)


# ---------------------------------------------------------------------------------------------

def test_center_crop_by_hand(tree: Path) -> None:
    """ADM's center_crop_arr on a 100x20 image at 8 px, written out step by step."""
    img = Image.open(tree / "cat" / "img3.png").convert("RGB")
    assert img.size == (100, 20)
    step = img.resize((50, 10), resample=Image.BOX)  # 20 >= 16: halve once; 10 < 16: stop
    step = step.resize((40, 8), resample=Image.BICUBIC)  # short side -> 8: 50 * 0.8 = 40
    by_hand = np.array(step)[0:8, 16:24]  # centre: (40 - 8) // 2 = 16
    np.testing.assert_array_equal(center_crop_arr(img, 8), by_hand)
    np.testing.assert_array_equal(load_image(tree / "cat" / "img3.png", 8), by_hand)
    # an image already at the size is untouched; odd margins round down like ADM
    small = Image.open(tree / "cat" / "img4.png").convert("RGB")
    np.testing.assert_array_equal(center_crop_arr(small, 16), np.array(small))
    tall = Image.open(tree / "cat" / "img1.png").convert("RGB")  # 17 x 33 at 8: 17 >= 16 halves to 8 x 16
    expect = np.array(tall.resize((8, 16), Image.BOX).resize((8, 16), Image.BICUBIC))[4:12, 0:8]
    np.testing.assert_array_equal(center_crop_arr(tall, 8), expect)


def test_identity_tree(tree: Path, tmp_path: Path) -> None:
    """Pixel-space ("identity") latents: order, labels, flips, skipped files, meta.json, LatentFolder."""
    out = tmp_path / "out"
    result = prepare_data(tree, out, vae="identity", resolution=8, mirror=True, shard_size=4, batch_size=3)
    files, pixels, labels = expected_pixels(tree, 8)
    latents, got_labels = all_rows(out)
    assert len(files) == 15 and latents.shape == (30, 3, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents[0::2], pixels, atol=0, rtol=0)  # identity: exactly the crops
    torch.testing.assert_close(latents[1::2], pixels.flip(-1), atol=0, rtol=0)  # the mirror right after
    assert torch.equal(got_labels, labels.repeat_interleave(2)) and got_labels.dtype == torch.int64

    # 16 listed images (incl. broken.jpg) -> shards of 4 images; shard 1 lost broken.jpg
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shards"] == [f"shard-0000{i}.safetensors" for i in range(4)]
    assert meta["shard_samples"] == [8, 6, 8, 8]
    assert (meta["num_samples"], meta["latent_shape"], meta["num_classes"]) == (30, [3, 8, 8], 3)
    assert meta["class_names"] == CLASSES and meta["resolution"] == 8 and meta["mirror"] is True
    assert meta["flip"] is None and meta["num_flipped"] == 0
    assert meta["vae"]["name"] == "identity" and (meta["latent_mean"], meta["latent_std"]) == (0.0, 1.0)
    raw = latents.double()
    np.testing.assert_allclose(meta["measured_mean"], raw.mean(dim=(0, 2, 3)).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(meta["measured_std"], raw.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-7)

    skipped = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["README.md", "cat/notes.txt", "dog/broken.jpg"]
    assert "not inside a class folder" in skipped[0] and "extension" in skipped[1] and "Error" in skipped[2]
    assert [f for f, _ in result.skipped] == ["README.md", "cat/notes.txt", "dog/broken.jpg"]
    assert (result.num_images, result.num_samples, result.num_shards) == (16, 30, 4)

    data = LatentFolder(out)  # the tuner's reader accepts it
    assert data.num_samples == 30 and data.latent_shape == (3, 8, 8) and data.num_classes == 3
    rows, rows_labels = data.get(torch.tensor([0, 9, 29]))
    torch.testing.assert_close(rows, latents[[0, 9, 29]], atol=0, rtol=0)
    data.check_statistics(VaeSpec(name="identity", latent_mean=0.0, latent_std=1.0))


def test_tiny_vae_folder(tree: Path, tiny_vae: Path, tmp_path: Path) -> None:
    """A diffusers AutoencoderKL folder: spec from its config, posterior mean, flips, statistics."""
    from diffusers import AutoencoderKL

    out = tmp_path / "out"
    prepare_data(tree, out, vae=str(tiny_vae), resolution=16, mirror=True, sample_posterior=False, shard_size=6)
    meta = json.loads((out / "meta.json").read_text())
    std = 1 / 0.18215  # the config's scaling_factor (diffusers' default)
    assert meta["vae"]["name"] == "sd-vae" and meta["vae"]["pixel_range"] == "-1,1"
    assert meta["latent_mean"] == 0.0 and meta["latent_std"] == pytest.approx(std)
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_samples"] == 30

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    _, pixels, labels = expected_pixels(tree, 16)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
        raw_flipped = vae.encode(pixels.flip(-1)).latent_dist.mean
    latents, got_labels = all_rows(out)
    torch.testing.assert_close(latents[0::2], raw / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latents[1::2], raw_flipped / std, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_labels, labels.repeat_interleave(2))
    both = torch.stack([raw, raw_flipped], 1).flatten(0, 1).double()
    np.testing.assert_allclose(meta["measured_mean"], both.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(meta["measured_std"], both.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-5)

    # --sample-posterior: a seeded draw, not the mean
    drawn = tmp_path / "drawn"
    prepare_data(tree, drawn, vae=str(tiny_vae), resolution=16, flip=0.0, sample_posterior=True, seed=3, shard_size=6)
    sampled, _ = all_rows(drawn)
    assert sampled.shape == (15, 4, 8, 8) and not torch.allclose(sampled, raw / std, atol=1e-3)


def test_resume_is_byte_identical(tree: Path, tiny_vae: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run, a deleted shard, a leftover temp file and a truncated shard: reruns finish
    the job and give the same bytes as one uninterrupted run."""
    kwargs = dict(vae=str(tiny_vae), resolution=16, mirror=True, sample_posterior=True, shard_size=4, batch_size=3)
    ref = tmp_path / "ref"
    prepare_data(tree, ref, **kwargs)
    expected = folder_bytes(ref)
    assert sorted(expected) == ["meta.json", *(f"shard-0000{i}.safetensors" for i in range(4)), "skipped.txt"]

    # interrupted while encoding shard 2: shards 0-1 stay, nothing else is there
    out = tmp_path / "out"
    real = pd.encode_shard

    def interrupted(index: int, *args, **kw):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *args, **kw)

    monkeypatch.setattr(pd, "encode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tree, out, **kwargs)
    monkeypatch.setattr(pd, "encode_shard", real)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (out / ".shard-00002.safetensors.tmp-abc123").write_bytes(b"half a shard")  # a killed writer's leftover
    result = prepare_data(tree, out, **kwargs)
    assert result.reused_shards == [0, 1] and result.encoded_shards == [2, 3]
    assert folder_bytes(out) == expected
    assert not list(out.glob(".*"))

    # a deleted shard and a truncated one are encoded again; the others are kept
    (out / "shard-00001.safetensors").unlink()
    data = (out / "shard-00003.safetensors").read_bytes()
    (out / "shard-00003.safetensors").write_bytes(data[: len(data) // 2])
    result = prepare_data(tree, out, **kwargs)
    assert result.reused_shards == [0, 2] and result.encoded_shards == [1, 3]
    assert folder_bytes(out) == expected

    # shards made with other settings are never mixed in
    with pytest.raises(UCGMError, match="other images or settings.*--overwrite"):
        prepare_data(tree, out, **{**kwargs, "mirror": False})
    monkeypatch.setattr(pd, "encode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):  # an interrupted re-encode leaves no meta.json over mixed shards
        prepare_data(tree, out, **{**kwargs, "mirror": False}, overwrite=True)
    monkeypatch.setattr(pd, "encode_shard", real)
    assert not (out / "meta.json").exists()
    result = prepare_data(tree, out, **{**kwargs, "mirror": False}, overwrite=True)
    assert result.encoded_shards == [2, 3] and json.loads((out / "meta.json").read_text())["num_samples"] == 15


@pytest.mark.slow
def test_two_processes_match_one(tree: Path, tiny_vae: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes (unfinished shards round-robin, rank 0 writes meta.json), resuming a
    folder with one finished shard, gives the same bytes as 1 process."""
    args = [str(tree), "--vae", str(tiny_vae), "--resolution", "16", "--mirror", "--sample-posterior",
            "--shard-size", "3", "--batch-size", "2", "--workers", "1"]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels' round-off depends on the thread count: the same as the workers'
    try:
        prepare_data(tree, one, vae=str(tiny_vae), resolution=16, mirror=True, sample_posterior=True, shard_size=3,
                     batch_size=2, workers=1)
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    two.mkdir()
    (two / "shard-00000.safetensors").write_bytes((one / "shard-00000.safetensors").read_bytes())  # resumed too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ucgm_convert", "prepare-data", *args, "--out", str(two)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr and "1 finished shard(s) kept, 5 to encode" in proc.stderr
    assert folder_bytes(two) == folder_bytes(one)


def test_labels_file(tmp_path: Path) -> None:
    """A flat folder with a CSV (with header) or JSON labels file; missing entries are an error."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12 + i, 9, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    (flat / "labels.csv").write_text("file,label\n0.png,2\n1.png,0\n./2.png,5\n3.png,2\nextra.png,1\n")
    out = tmp_path / "out"
    prepare_data(flat, out, vae="identity", resolution=8, labels=flat / "labels.csv")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 6 and meta["num_samples"] == 4 and meta["class_names"] == [str(i) for i in range(6)]
    assert all_rows(out)[1].tolist() == [2, 0, 5, 2]
    assert (out / "skipped.txt").read_text() == "labels.csv\tnot an image file (extension)\n"

    (tmp_path / "labels.json").write_text(json.dumps({"0.png": 1, "1.png": 1, "2.png": 0, "3.png": 3}))
    prepare_data(flat, tmp_path / "out2", vae="identity", resolution=8, labels=tmp_path / "labels.json")
    assert all_rows(tmp_path / "out2")[1].tolist() == [1, 1, 0, 3]

    (tmp_path / "partial.json").write_text(json.dumps({"0.png": 1, "2.png": 0}))
    with pytest.raises(UCGMError, match=r"no label for 2 of 4 image\(s\): 1.png, 3.png"):
        list_images(flat, tmp_path / "partial.json")
    with pytest.raises(UCGMError, match="flat folder of images needs --labels"):
        list_images(flat)


def test_from_recipe_and_checkpoint(tree: Path, tiny_vae: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--from demo (identity, 16 px), --from edm2-s with --vae weights (its 0..1 range and per-channel
    statistics), --checkpoint of a pixel model (resolution from its latent shape)."""
    from diffusers import AutoencoderKL
    prepare_data(tree, tmp_path / "demo", recipe="demo")
    meta = json.loads((tmp_path / "demo" / "meta.json").read_text())
    assert meta["resolution"] == 16 and meta["latent_shape"] == [3, 16, 16] and meta["vae"]["name"] == "identity"

    prepare_data(tree, tmp_path / "edm2", recipe="edm2-s", vae=str(tiny_vae), resolution=16, shard_size=8, flip=0.0,
                 sample_posterior=False)
    meta = json.loads((tmp_path / "edm2" / "meta.json").read_text())
    spec = meta["vae"]
    assert spec["name"] == "sd-vae" and spec["pixel_range"] == "0,1" and len(spec["latent_std"]) == 4
    assert spec["source"] == str(tiny_vae) and meta["resolution"] == 16
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    _, pixels, _ = expected_pixels(tree, 16)
    with torch.no_grad():
        raw = vae.encode((pixels + 1) / 2).latent_dist.mean  # 0..1 input
    mean = torch.tensor(spec["latent_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec["latent_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(all_rows(tmp_path / "edm2")[0], (raw - mean) / std, atol=1e-5, rtol=1e-5)

    prepare_data(tree, tmp_path / "ckpt", checkpoint=str(tiny_checkpoint))
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["latent_shape"] == [3, 8, 8]
    with pytest.raises(UCGMError, match=r"model expects latents of shape \[3, 8, 8\]"):
        prepare_data(tree, tmp_path / "bad", checkpoint=str(tiny_checkpoint), resolution=16)
    with pytest.raises(UCGMError, match="statistics of repa-e models are stored with the model checkpoint"):
        prepare_data(tree, tmp_path / "bad", recipe="repa-e")


def test_bad_inputs_are_one_line_errors(tree: Path, tmp_path: Path) -> None:
    """Each bad input: exit status 2 and one `error:` line naming the problem, no traceback."""
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    only_text = tmp_path / "texts"
    (only_text / "a").mkdir(parents=True)
    (only_text / "a" / "x.txt").write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "partial.csv").write_text("cat/img0.jpg,0\n")
    cases = [
        ([str(tmp_path / "missing"), "--vae", "identity", "--resolution", "8"], "no such folder"),
        ([str(empty), "--vae", "identity", "--resolution", "8"], "the folder is empty"),
        ([str(only_text), "--vae", "identity", "--resolution", "8"], "no images found"),
        ([str(tree), "--vae", "identity", "--resolution", "8", "--labels", str(tmp_path / "nope.csv")], "no such file"),
        ([str(tree), "--vae", "identity", "--resolution", "8", "--labels", str(tmp_path / "partial.csv")],
         "no label for 15 of 16"),
        ([str(tree), "--vae", "identity", "--resolution", "8", "--out", str(a_file / "sub")], "cannot write here"),
        ([str(tree), "--vae", str(tmp_path / "no-such-vae"), "--resolution", "8"], "unknown VAE"),
        ([str(tree), "--vae", "sd-vae", "--resolution", "8"], "names a kind of VAE"),
        ([str(tree), "--resolution", "8"], "no VAE"),
        ([str(tree), "--vae", "identity"], "--resolution is required"),
        ([str(tree), "--from", "no-such-recipe"], "unknown recipe"),
        ([str(tree), "--vae", "identity", "--resolution", "8", "--device", "gpu0"], "not a torch device"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(([str(tree), "--vae", "identity", "--resolution", "8", "--out", str(locked / "out")],
                      "cannot write here"))
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "out")]
        result = runner.invoke(app, ["prepare-data", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# Reference parity: 50% random flips and posterior draws by default, per image from the seed
# --------------------------------------------------------------------------------------------


def listing_index(tree: Path, files: list[str]) -> list[int]:
    """Each readable file's index in the listing (the broken one keeps its place)."""
    listed = list_images(tree, None).files
    return [listed.index(f) for f in files]


def test_defaults_flip_half_and_draw_from_the_posterior(tree: Path, tmp_path: Path) -> None:
    """Like the reference (data.py + utilities/dataset.py: a 50% horizontal flip, the VAE posterior sampled):
    each image is stored once, mirrored exactly when its seeded coin says so, and meta.json says how."""
    config = prepare.PrepareConfig(images=tree, out=tmp_path / "o")
    assert (config.flip, config.sample_posterior, config.mirror) == (0.5, True, False)
    out = tmp_path / "out"
    prepare_data(tree, out, vae="identity", resolution=8, shard_size=4, batch_size=3)
    files, pixels, labels = expected_pixels(tree, 8)
    coins = [pe.flipped(0, i, 0.5) for i in listing_index(tree, files)]
    latents, got_labels = all_rows(out)
    assert latents.shape == (15, 3, 8, 8) and torch.equal(got_labels, labels)
    want = torch.stack([p.flip(-1) if c else p for p, c in zip(pixels, coins)])
    torch.testing.assert_close(latents, want, atol=0, rtol=0)
    assert 3 <= sum(coins) <= 12 and not all(c == coins[0] for c in coins)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["flip"], meta["mirror"], meta["sample_posterior"], meta["seed"]) == (0.5, False, True, 0)
    assert meta["num_flipped"] == sum(coins)

    other = tmp_path / "seed7"
    prepare_data(tree, other, vae="identity", resolution=8, seed=7)
    assert [pe.flipped(7, i, 0.5) for i in listing_index(tree, files)] != coins
    none = tmp_path / "none"
    prepare_data(tree, none, vae="identity", resolution=8, flip=0.0)
    torch.testing.assert_close(all_rows(none)[0], pixels, atol=0, rtol=0)
    assert json.loads((none / "meta.json").read_text())["num_flipped"] == 0


def test_posterior_draw_is_per_image_and_independent_of_batching(tree: Path, tiny_vae: Path, tmp_path: Path) -> None:
    """Default rows are z = mean + std * noise(seed, image), the reference's posterior sample, with the noise
    fixed per image: batch size and shard size do not change any row."""
    from diffusers import AutoencoderKL

    one = tmp_path / "one"
    prepare_data(tree, one, vae=str(tiny_vae), resolution=16, shard_size=4, batch_size=1)
    files, pixels, _ = expected_pixels(tree, 16)
    index = listing_index(tree, files)
    coins = [pe.flipped(0, i, 0.5) for i in index]
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    x = torch.stack([p.flip(-1) if c else p for p, c in zip(pixels, coins)])
    noise = torch.stack([pe.posterior_noise(0, i, c, (4, 8, 8)) for i, c in zip(index, coins)])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    std = 1 / 0.18215
    got = all_rows(one)[0]
    torch.testing.assert_close(got, (dist.mean + dist.std * noise) / std, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, dist.mean / std, atol=1e-3)  # a draw, not the mean

    many = tmp_path / "many"
    prepare_data(tree, many, vae=str(tiny_vae), resolution=16, shard_size=16, batch_size=7)
    torch.testing.assert_close(all_rows(many)[0], got, atol=1e-6, rtol=0)
    mean_only = tmp_path / "mean"
    prepare_data(tree, mean_only, vae=str(tiny_vae), resolution=16, flip=0.0, sample_posterior=False)
    meta = json.loads((mean_only / "meta.json").read_text())
    assert (meta["flip"], meta["sample_posterior"], meta["seed"]) == (0.0, False, None)


def test_cli_prints_the_settings_and_refuses_a_boolean_flip(tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["prepare-data", str(tree), "--vae", "identity", "--resolution", "8"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "settings: each image mirrored with probability 0.5 (--flip); a VAE posterior draw per row " \
           "(--sample-posterior); seed 0" in " ".join(result.stderr.split())
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--flip", "0", "--no-sample-posterior"])
    assert result.exit_code == 0, result.output
    assert "no flips (--flip 0); the VAE posterior mean (--no-sample-posterior)" in " ".join(result.stderr.split())
    with pytest.raises(UCGMError, match=r"^flip: expected a number .*--mirror stores both orientations"):
        prepare.PrepareConfig(images=tree, out=tmp_path / "c", flip=True)
