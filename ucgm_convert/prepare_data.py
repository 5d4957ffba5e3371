"""`ucgm prepare-data`: an image folder -> a prepared latent folder that `ucgm tune --data` reads.

Input: an ImageNet-style tree (one sub-folder per class; classes are the sorted sub-folder names,
labels 0..K-1) or a folder with a labels file (CSV ``file,label`` rows or a JSON object
``{file: label}``; file names relative to the folder). Files are taken in sorted order of their
relative paths; only torchvision's image extensions count as images (the set DiT's ImageFolder
reads). Each image is converted to RGB, centre-cropped the ADM / DiT way (`center_crop_arr`),
mapped to the VAE's pixel range and encoded (posterior mean, or a draw with
``sample_posterior``; optional horizontal-flip copies right after each image).

Output (the format `latent_data.LatentFolder` reads):

- ``shard-00000.safetensors``, ...: shard s holds the images ``files[s*shard_size :
  (s+1)*shard_size]`` that could be read, as ``latents`` [n, C, H, W] float32 (model space,
  m = (z - latent_mean) / latent_std) and ``labels`` [n] int64; with ``flip`` row 2i is image i and
  row 2i+1 its mirror. The safetensors metadata key ``ucgm`` (JSON) holds the shard's settings
  fingerprint, its unreadable files and the float64 per-channel sums of the raw latents;
- ``meta.json``: num_samples, latent_shape, num_classes, latent_mean, latent_std, vae (spec),
  shards (file names of the non-empty shards, in order), shard_samples, class_names, resolution,
  flip, measured_mean / measured_std (per-channel statistics of the RAW latents z on this data),
  and the other settings;
- ``skipped.txt``: ``path<TAB>reason`` for every file that was not encoded.

Every shard is written to a temporary file and renamed, so a shard under its final name is
complete. A rerun (after an interruption) keeps the finished shards whose fingerprint matches and
encodes the rest; the result is byte-identical to an uninterrupted run (same device and kernels).
Under torchrun the unfinished shards go round-robin over the ranks (a fresh run: shard s on rank
s % world_size) and rank 0 writes skipped.txt and meta.json after a barrier.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from . import distributed
from .checkpoint import write_file_atomic
from .errors import UCGMError
from .latent_data import META_NAME, shard_name
from .vae import SPEC_FIELDS, VAES, check_spec, encode, hub_folder, load_vae

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageList",
    "PrepareResult",
    "SKIPPED_NAME",
    "center_crop_arr",
    "list_images",
    "load_image",
    "measured_statistics",
    "prepare_data",
    "resolve_vae",
    "to_pixel_range",
]

# torchvision's IMG_EXTENSIONS: the files DiT / ADM's ImageFolder reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SKIPPED_NAME = "skipped.txt"
FORMAT = "ucgm-prepare-data/1"
META_KEY = "ucgm"  # the one safetensors metadata entry (JSON), so the header is byte-stable
SHOWN = 5  # file names shown in messages
DEFAULT_SHARD_SIZE = 10_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Published conventions of Hub VAEs that ship no usable normalisation: the DiT / SiT scale.
KNOWN_VAES = {
    "stabilityai/sd-vae-ft-ema": {"name": "sd-vae", "latent_mean": 0.0, "latent_std": 1 / 0.18215,
                                  "pixel_range": "-1,1"},
    "stabilityai/sd-vae-ft-mse": {"name": "sd-vae", "latent_mean": 0.0, "latent_std": 1 / 0.18215,
                                  "pixel_range": "-1,1"},
}
# Families whose latent statistics are stored with the model checkpoint, not with the recipe.
STATS_WITH_CHECKPOINT = ("lightningdit", "repa-e")

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / DiT centre crop: halve with BOX while the short side >= 2*size, resize with BICUBIC so
    the short side is `image_size`, then crop the centre square. Returns uint8 [size, size, C]."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """An image file as RGB, centre-cropped to `resolution`: uint8 [resolution, resolution, 3]."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return center_crop_arr(rgb, resolution)


def to_pixel_range(images: np.ndarray | Tensor, pixel_range: str) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in "-1,1" (ToTensor + Normalize(0.5, 0.5)) or "0,1"."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(255)
    return (x - 0.5) / 0.5 if pixel_range == "-1,1" else x


# ---------------------------------------------------------------------------------------------
# The file list
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageList:
    """The images to encode (sorted relative paths) with their labels, and what was left out."""

    root: Path
    files: list[str]
    labels: list[int]
    class_names: list[str]
    num_classes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    mode: str = "folders"  # "folders" (class sub-folders) or "labels" (labels file)


def _walk(folder: Path, root: Path, exclude: Path | None) -> Iterator[str]:
    """Relative posix paths of every non-hidden file under `folder` (hidden folders skipped too)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and (exclude is None or (here / d).resolve() != exclude)]
        for name in filenames:
            if not name.startswith("."):
                yield (here / name).relative_to(root).as_posix()


def _sort_key(rel: str) -> tuple[str, ...]:
    return tuple(rel.split("/"))


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _key(name: str) -> str:
    """A labels-file key as a relative posix path ("./a\\b.jpg" -> "a/b.jpg")."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _read_labels(path: Path) -> dict[str, int]:
    """A labels file: JSON object {file: int} or CSV rows `file,label` (an optional header row)."""
    where = f"--labels {path}"
    if not path.is_file():
        raise UCGMError(f"{where}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UCGMError(f"{where}: cannot read ({err})") from None
    out: dict[str, int] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise UCGMError(f"{where}: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise UCGMError(f"{where}: expected a JSON object {{file name: integer label}}, got {type(data).__name__}")
        for name, label in data.items():
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise UCGMError(f"{where}: the label of {name!r} must be an integer >= 0, got {label!r}")
            out[_key(name)] = label
    else:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise UCGMError(f"{where}: line {i + 1}: expected `file,label`, got {','.join(row)!r}")
            name, label_text = row[0].strip(), row[1].strip()
            try:
                label = int(label_text)
            except ValueError:
                if i == 0:  # a header row
                    continue
                raise UCGMError(f"{where}: line {i + 1}: label must be an integer, got {label_text!r}") from None
            if label < 0:
                raise UCGMError(f"{where}: line {i + 1}: label must be >= 0, got {label}")
            out[_key(name)] = label
    if not out:
        raise UCGMError(f"{where}: no entries; expected `file,label` rows (CSV) or {{file: label}} (JSON)")
    return out


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def list_images(folder: str | Path, labels_file: str | Path | None = None,
                exclude: str | Path | None = None) -> ImageList:
    """The sorted image list of `folder`: class sub-folders, or every image with `labels_file`.

    Files that are not images (by extension) and, for a class tree, files outside the class
    folders are listed in `skipped`. `exclude` (the output folder) is never listed.
    """
    root = Path(folder).expanduser()
    where = f"image folder {root}"
    if not root.exists():
        raise UCGMError(f"{where}: no such folder")
    if not root.is_dir():
        raise UCGMError(f"{where}: not a folder")
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None
    skipped: list[tuple[str, str]] = []
    if labels_file is not None:
        mapping = _read_labels(Path(labels_file).expanduser())
        everything = sorted(_walk(root, root, excluded), key=_sort_key)
        if not everything:
            raise UCGMError(f"{where}: the folder is empty")
        files = [f for f in everything if _is_image(f)]
        skipped += [(f, "not an image file (extension)") for f in everything if not _is_image(f)]
        if not files:
            raise UCGMError(f"{where}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        missing = [f for f in files if f not in mapping]
        if missing:
            raise UCGMError(f"--labels {labels_file}: no label for {len(missing)} of {len(files)} image(s): "
                            f"{_shown(missing)} (keys are paths relative to {root})")
        labels = [mapping[f] for f in files]
        num_classes = max(labels) + 1
        return ImageList(root, files, labels, [str(i) for i in range(num_classes)], num_classes, skipped, "labels")

    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and (excluded is None or Path(e.path).resolve() != excluded)]
    loose = [e.name for e in entries if not e.is_dir()]
    if not entries or (not classes and not loose):
        raise UCGMError(f"{where}: the folder is empty")
    if not classes:
        if any(_is_image(n) for n in loose):
            raise UCGMError(f"{where}: no class sub-folders; a flat folder of images needs --labels FILE "
                            "(CSV `file,label` or JSON {file: label})")
        raise UCGMError(f"{where}: no images found (expected one sub-folder of images per class, "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    skipped += [(n, "not inside a class folder") for n in loose]
    files, labels = [], []
    for label, name in enumerate(classes):
        for rel in sorted(_walk(root / name, root, excluded), key=_sort_key):
            if _is_image(rel):
                files.append(rel)
                labels.append(label)
            else:
                skipped.append((rel, "not an image file (extension)"))
    if not files:
        raise UCGMError(f"{where}: no images found in its {len(classes)} class folder(s) "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(root, files, labels, classes, len(classes), sorted(skipped, key=lambda s: _sort_key(s[0])))


# ---------------------------------------------------------------------------------------------
# The VAE spec and network
# ---------------------------------------------------------------------------------------------

def _parse_stat(value: Any, flag: str) -> float | list[float] | None:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    try:
        parts = [float(p) for p in str(value).split(",") if p.strip()]
    except ValueError:
        raise UCGMError(f"{flag}: expected a number or comma-separated numbers (one per channel), "
                        f"got {value!r}") from None
    if not parts:
        raise UCGMError(f"{flag}: expected a number or comma-separated numbers, got {value!r}")
    return parts[0] if len(parts) == 1 else parts


def _diffusers_config(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "config.json", folder / "vae" / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError) as err:
                raise UCGMError(f"{candidate}: not a readable JSON config: {err}") from None
            return data if isinstance(data, dict) else None
    return None


def _spec_from_vae_source(source: str) -> tuple[dict[str, Any], str | None]:
    """(spec, local path for load_vae) of --vae NAME_OR_PATH without a recipe or checkpoint.

    Known Hub ids use their published convention; a diffusers folder (or Hub repo) its config's
    scaling_factor / shift_factor; bare weights need --latent-mean / --latent-std (name: checked
    after loading from the latent channels).
    """
    if source == "identity":
        return {"name": "identity", "source": None}, None
    if source in VAES:
        raise UCGMError(f"--vae {source}: names a kind of VAE, not its weights; pass a file, a diffusers folder or "
                        "a Hugging Face repo id (e.g. stabilityai/sd-vae-ft-ema), or --from RECIPE")
    path = Path(source).expanduser()
    local: Path | None = None
    if path.exists():
        local = path
    else:
        from .loading import _HUB_ID

        if not (_HUB_ID.match(source) and not source.startswith((".", "/", "~"))):
            raise UCGMError(f"--vae {source}: unknown VAE: no such file or folder, not a Hugging Face repo id "
                            f"(user/name) and not 'identity'")
        if source in KNOWN_VAES:
            return {**KNOWN_VAES[source], "source": source}, None
        local = hub_folder(source)
    config = _diffusers_config(local) if local.is_dir() else None
    if config is None:
        return {"name": "sd-vae", "source": source}, str(local)  # statistics must come from the flags
    cls = config.get("_class_name")
    if cls == "AutoencoderDC":
        name = "dc-ae"
    elif cls == "AutoencoderKL":
        name = "sd-vae" if int(config.get("latent_channels", 4)) == 4 else "ldm-f16d32"
    else:
        raise UCGMError(f"--vae {source}: config.json has _class_name {cls!r}; expected a diffusers AutoencoderKL "
                        "or AutoencoderDC")
    scale = config.get("scaling_factor") or 1.0
    shift = config.get("shift_factor") or 0.0
    return {"name": name, "source": source, "latent_mean": float(shift), "latent_std": 1 / float(scale),
            "pixel_range": "-1,1"}, str(local)


def _spec_from_recipe(recipe: Any) -> dict[str, Any]:
    """The VAE spec a recipe implies (its family's published normalisation)."""
    if recipe.vae == "identity":
        return {"name": "identity", "source": None, "latent_mean": 0.0, "latent_std": 1.0, "pixel_range": "-1,1"}
    if recipe.family == "ddt":
        from .adapters.ddt import SD_VAE

        return {**SD_VAE, "source": recipe.vae}
    if recipe.family == "edm2":
        from .adapters.edm2 import vae_spec

        return {**vae_spec(None, 4), "source": recipe.vae}
    if recipe.family in STATS_WITH_CHECKPOINT:
        return {"name": "ldm-f16d32", "source": recipe.vae}  # statistics: the checkpoint's or the flags'
    return {"name": "sd-vae", "source": recipe.vae}


@dataclass
class _Resolved:
    spec: dict[str, Any]
    module: torch.nn.Module
    resolution: int
    latent_shape: tuple[int, int, int] | None  # what the model expects, when known
    origin: str


def resolve_vae(
    vae: str | None = None,
    recipe: str | None = None,
    checkpoint: str | None = None,
    resolution: int | None = None,
    latent_mean: Any = None,
    latent_std: Any = None,
    pixel_range: str | None = None,
    family: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> _Resolved:
    """The checked VAE spec, its network and the resolution, from the flags.

    Base spec: `checkpoint` (its config's VAE spec and stored VAE weights), else `recipe` (the
    family's published normalisation, the recipe's VAE and resolution), else `vae`. `vae` also
    names the weights to load when a recipe or checkpoint gives the spec (anything but
    "identity"). latent_mean / latent_std / pixel_range override the spec's fields.
    """
    from .recipe import load_recipe

    spec: dict[str, Any] | None = None
    name_from_weights = False  # bare VAE weights: sd-vae or ldm-f16d32 by the latent channels
    weights_path: str | None = None
    state = None
    model_shape = None
    origin = ""
    rec = load_recipe(recipe) if recipe is not None else None
    if checkpoint is not None:
        spec, state, model_shape, model_recipe = _checkpoint_vae(checkpoint, family)
        origin = f"checkpoint {checkpoint}"
        if rec is None and model_recipe:
            try:
                rec = load_recipe(model_recipe)
            except UCGMError:
                rec = None
    elif rec is not None:
        spec = _spec_from_recipe(rec)
        origin = f"recipe {rec.name}"
    if spec is not None:
        if vae == "identity":
            if spec["name"] != "identity":
                raise UCGMError(f"--vae identity: the {origin} works in {spec['name']!r} latents, not pixels")
        elif vae is not None:
            weights_path = vae
            spec = {**spec, "source": vae}  # record the weights actually used
    elif vae is not None:
        spec, weights_path = _spec_from_vae_source(vae)
        origin = f"--vae {vae}"
        name_from_weights = "latent_mean" not in spec and spec["name"] != "identity"
    else:
        raise UCGMError("no VAE: pass --vae NAME_OR_PATH ('identity' for pixel-space models, a VAE file, diffusers "
                        "folder or Hub repo id), --from RECIPE or --checkpoint MODEL")
    overrides = {"latent_mean": _parse_stat(latent_mean, "--latent-mean"),
                 "latent_std": _parse_stat(latent_std, "--latent-std"), "pixel_range": pixel_range}
    spec = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    missing = [f for f in ("latent_mean", "latent_std") if f not in spec and spec["name"] != "identity"]
    if missing and rec is not None:
        raise UCGMError(f"{origin}: the latent statistics of {rec.family} models are stored with the model "
                        "checkpoint: pass --checkpoint MODEL (the model you will tune), or --latent-mean and "
                        "--latent-std")
    if missing:
        raise UCGMError(f"{origin}: bare VAE weights carry no latent statistics: pass --latent-mean and --latent-std "
                        "(numbers or one per channel), --from RECIPE, or a diffusers folder / Hub repo with "
                        "config.json")
    spec.setdefault("pixel_range", "-1,1")
    checked = check_spec(spec)
    spec = {k: checked[k] for k in SPEC_FIELDS if k in checked}

    if resolution is None:
        if rec is not None:
            resolution = rec.resolution
        elif spec["name"] == "identity" and model_shape is not None:
            resolution = model_shape[1]
        else:
            raise UCGMError(f"{origin}: --resolution is required (image side in pixels, e.g. 256)")
    if resolution < 1:
        raise UCGMError(f"--resolution: expected a positive number of pixels, got {resolution}")
    module = load_vae(spec, path=weights_path, state=state, device=device, dtype=dtype)
    if name_from_weights and hasattr(module, "config"):
        channels = int(module.config.latent_channels)
        spec["name"] = "sd-vae" if channels == 4 else "ldm-f16d32"
    return _Resolved(spec, module, int(resolution), model_shape, origin)


def _checkpoint_vae(
    checkpoint: str, family: str | None
) -> tuple[dict[str, Any], Any, tuple[int, int, int], str | None]:
    """(VAE spec, stored VAE weights or None, latent shape, recipe name) of a model checkpoint."""
    from .checkpoint import VAE_WEIGHTS_NAME, is_checkpoint_dir, read_config, read_safetensors
    from .loading import load, resolve_source

    path = resolve_source(checkpoint)
    if is_checkpoint_dir(path):  # our format: config.json is enough
        cfg = read_config(path)
        stored = path / VAE_WEIGHTS_NAME
        state = read_safetensors(stored) if stored.is_file() else None
        return dict(cfg.vae), state, cfg.latent_shape, cfg.recipe
    model = load(checkpoint, family=family)
    return dict(model.cfg.vae), model.vae_state, model.cfg.latent_shape, model.cfg.recipe


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

def _fingerprint(settings: Mapping[str, Any], files: Sequence[str], labels: Sequence[int]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f, y in zip(files, labels):
        h.update(f"{f}\t{y}\n".encode())
    return h.hexdigest()


def _shard_info(path: Path) -> dict[str, Any] | None:
    """The `ucgm` metadata of a finished shard, or None when unreadable / not ours."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None
    try:
        info = json.loads(meta.get(META_KEY, ""))
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not {"latents", "labels"} <= keys:
        return None
    return info


def _remove_temps(out: Path, name: str) -> None:
    for leftover in out.glob(f".{name}.tmp-*"):
        leftover.unlink(missing_ok=True)


class _Pipeline:
    """Images decoded by threads ahead of the encoder, in order; (index, array or error) pairs."""

    def __init__(self, root: Path, files: Sequence[str], resolution: int, workers: int, ahead: int) -> None:
        self.root, self.files, self.resolution, self.ahead = root, files, resolution, max(ahead, 1)
        self.pool = ThreadPoolExecutor(max_workers=max(workers, 1)) if workers > 0 else None

    def _load(self, rel: str) -> np.ndarray | str:
        try:
            return load_image(self.root / rel, self.resolution)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped
            return f"{type(err).__name__}: {err}".replace("\n", " ").replace("\t", " ")

    def __iter__(self) -> Iterator[np.ndarray | str]:
        if self.pool is None:
            for rel in self.files:
                yield self._load(rel)
            return
        pending: deque[Future] = deque()
        it = iter(self.files)
        for rel in it:
            pending.append(self.pool.submit(self._load, rel))
            if len(pending) >= self.ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self.pool.submit(self._load, nxt))
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _encode_shard(
    index: int, files: Sequence[str], labels: Sequence[int], pipeline: _Pipeline, resolved: _Resolved,
    settings: Mapping[str, Any], latent_shape: tuple[int, int, int], batch_size: int, device: torch.device,
    advance: Callable[[int], None],
) -> bytes:
    """The bytes of shard `index` (safetensors with the `ucgm` metadata)."""
    spec = resolved.spec
    generator = None
    if settings["sample_posterior"]:
        seed = int(np.random.SeedSequence([settings["seed"], index, 0x5EED]).generate_state(1)[0])
        generator = torch.Generator(device=device).manual_seed(seed)
    chunks: list[Tensor] = []
    kept_labels: list[int] = []
    skipped: list[list[str]] = []
    batch: list[np.ndarray] = []
    batch_labels: list[int] = []

    def flush() -> None:
        if not batch:
            return
        x = to_pixel_range(np.stack(batch), spec["pixel_range"])
        if settings["flip"]:
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # image, mirror, image, mirror, ...
        m = encode(x.to(device), spec, resolved.module, sample=settings["sample_posterior"], generator=generator)
        chunks.append(m.float().cpu())
        for y in batch_labels:
            kept_labels.extend([y, y] if settings["flip"] else [y])
        advance(len(batch))
        batch.clear()
        batch_labels.clear()

    for rel, y, image in zip(files, labels, pipeline):
        if isinstance(image, str):
            skipped.append([rel, image])
            advance(1)
            continue
        batch.append(image)
        batch_labels.append(y)
        if len(batch) >= batch_size:
            flush()
    flush()
    latents = torch.cat(chunks) if chunks else torch.zeros(0, *latent_shape)
    if tuple(latents.shape[1:]) != latent_shape:
        raise UCGMError(f"shard {index}: latents of shape {list(latents.shape[1:])}, expected {list(latent_shape)}")
    raw = latents.double() * _channel_stat(spec["latent_std"], latent_shape[0]) \
        + _channel_stat(spec["latent_mean"], latent_shape[0])
    info = {
        "format": FORMAT,
        "fingerprint": settings["fingerprints"][index],
        "shard": index,
        "num_images": len(files),
        "num_samples": int(latents.shape[0]),
        "skipped": skipped,
        "raw_sum": raw.sum(dim=(0, 2, 3)).tolist(),
        "raw_sumsq": raw.square().sum(dim=(0, 2, 3)).tolist(),
        "raw_count": int(raw.shape[0] * raw.shape[2] * raw.shape[3]),
    }
    tensors = {"latents": latents.contiguous(), "labels": torch.tensor(kept_labels, dtype=torch.int64)}
    return safetensors_bytes(tensors, metadata={META_KEY: json.dumps(info)})


def _channel_stat(value: Any, channels: int) -> Tensor:
    values = value if isinstance(value, list) else [value] * channels
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def measured_statistics(infos: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents over shards' `raw_sum` / `raw_sumsq` / `raw_count`."""
    count = sum(int(i["raw_count"]) for i in infos)
    if count == 0:
        return [], []
    total = np.sum([i["raw_sum"] for i in infos if i["raw_count"]], axis=0)
    total_sq = np.sum([i["raw_sumsq"] for i in infos if i["raw_count"]], axis=0)
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return [float(v) for v in mean], [float(v) for v in np.sqrt(var)]


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    """What `prepare_data` did (on this process; `num_samples` etc. are of the whole folder)."""

    out: Path
    num_images: int  # images listed (after the extension filter)
    num_samples: int  # rows written (x2 with flip)
    num_shards: int
    encoded_shards: list[int]  # encoded by this process in this run
    reused_shards: list[int]  # finished earlier and kept (all processes)
    skipped: list[tuple[str, str]]  # every file not encoded, with the reason
    latent_shape: tuple[int, int, int]
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def _check_out(out: Path, where: str = "--out") -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UCGMError(f"{where} {out}: cannot write here ({err.strerror or err})") from None


def _default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def prepare_data(
    images: str | Path,
    out: str | Path,
    *,
    vae: str | None = None,
    resolution: int | None = None,
    recipe: str | None = None,
    checkpoint: str | None = None,
    family: str | None = None,
    labels: str | Path | None = None,
    flip: bool = False,
    sample_posterior: bool = False,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    workers: int | None = None,
    latent_mean: Any = None,
    latent_std: Any = None,
    pixel_range: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> PrepareResult:
    """Encode the images of `images` into the prepared latent folder `out` (see the module doc).

    Under torchrun every process calls this; the unfinished shards go round-robin over the ranks.
    Bad input raises one UCGMError (on every process) before anything is encoded.
    """
    import torch.distributed as dist

    if device is not None:
        try:
            wanted = torch.device(device)
        except RuntimeError:
            raise UCGMError(f"--device: not a torch device: {device!r}") from None
        if wanted.type == "cuda" and not torch.cuda.is_available():
            raise UCGMError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    was_initialized = dist.is_available() and dist.is_initialized()
    ctx = distributed.setup(device)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # a resumed shard must be bit-identical to the first run's
    try:
        return _prepare(ctx, Path(images), Path(out), vae=vae, resolution=resolution, recipe=recipe,
                        checkpoint=checkpoint, family=family, labels=labels, flip=flip,
                        sample_posterior=sample_posterior, seed=seed, shard_size=shard_size,
                        batch_size=batch_size, workers=workers, latent_mean=latent_mean, latent_std=latent_std,
                        pixel_range=pixel_range, dtype=dtype, overwrite=overwrite,
                        progress=progress and ctx.is_main, log=log or _default_log)
    finally:
        torch.backends.cudnn.deterministic = deterministic
        if not was_initialized:
            distributed.teardown(ctx)


def _prepare(ctx: distributed.Context, images: Path, out: Path, *, vae: str | None, resolution: int | None,
             recipe: str | None, checkpoint: str | None, family: str | None, labels: str | Path | None,
             flip: bool, sample_posterior: bool, seed: int, shard_size: int, batch_size: int,
             workers: int | None, latent_mean: Any, latent_std: Any, pixel_range: str | None, dtype: str,
             overwrite: bool, progress: bool, log: Log) -> PrepareResult:
    t0 = time.perf_counter()
    say = log if ctx.is_main else (lambda _m: None)
    if shard_size < 1:
        raise UCGMError(f"--shard-size: expected an integer >= 1, got {shard_size}")
    if batch_size < 1:
        raise UCGMError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise UCGMError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if pixel_range is not None and pixel_range not in ("-1,1", "0,1"):
        raise UCGMError(f"--pixel-range: expected '-1,1' or '0,1', got {pixel_range!r}")
    listing = list_images(images, labels, exclude=out)
    _check_out(out)
    resolved = resolve_vae(vae, recipe, checkpoint, resolution, latent_mean, latent_std, pixel_range, family,
                           device=ctx.device, dtype=DTYPES[dtype])
    spec, res = resolved.spec, resolved.resolution
    # The latent shape, from one encoded blank image.
    probe = to_pixel_range(np.zeros((1, res, res, 3), dtype=np.uint8), spec["pixel_range"])
    latent_shape = tuple(int(v) for v in encode(probe.to(ctx.device), spec, resolved.module).shape[1:])
    if resolved.latent_shape is not None and tuple(resolved.latent_shape) != latent_shape:
        raise UCGMError(f"{resolved.origin}: the model expects latents of shape {list(resolved.latent_shape)} but "
                        f"{res}x{res} images encode to {list(latent_shape)}; pass the model's --resolution")

    files, file_labels = listing.files, listing.labels
    num_shards = math.ceil(len(files) / shard_size)
    spec_key = {k: v for k, v in spec.items() if k != "source"}
    base = {"format": FORMAT, "vae": spec_key, "resolution": res, "flip": flip, "sample_posterior": sample_posterior,
            "seed": seed if sample_posterior else None, "shard_size": shard_size, "latent_shape": list(latent_shape)}
    fingerprints = []
    for s in range(num_shards):
        sl = slice(s * shard_size, (s + 1) * shard_size)
        fingerprints.append(_fingerprint({**base, "shard": s}, files[sl], file_labels[sl]))
    settings = {"flip": flip, "sample_posterior": sample_posterior, "seed": seed, "fingerprints": fingerprints}

    # Which shards are finished (every process checks all, so all agree on the error).
    finished: dict[int, dict[str, Any]] = {}
    stale: list[str] = []
    for s in range(num_shards):
        path = out / shard_name(s)
        if not path.exists():
            continue
        info = _shard_info(path)
        if info is not None and info.get("fingerprint") == fingerprints[s]:
            finished[s] = info
        elif info is not None:
            stale.append(path.name)
    if stale and not overwrite:
        raise UCGMError(f"--out {out}: {len(stale)} shard(s) were made from other images or settings "
                        f"({_shown(stale)}); "
                        "pass a new --out, or --overwrite to encode them again")

    # Everyone has looked before anyone writes; the unfinished shards go round-robin over the ranks
    # (which rank encodes a shard does not change its bytes).
    unfinished = [s for s in range(num_shards) if s not in finished]
    if unfinished and ctx.is_main:  # until every shard is there again, the folder is not a dataset
        (out / META_NAME).unlink(missing_ok=True)
    distributed.barrier(ctx)
    todo = unfinished[ctx.rank :: ctx.world_size]
    reused = sorted(finished)
    say(f"{len(files)} images in {listing.num_classes} classes from {images} -> {out} "
        f"({num_shards} shard(s) of {shard_size} images; VAE {spec['name']} from {resolved.origin}, {res}x{res} -> "
        f"latents {list(latent_shape)}{', + flips' if flip else ''}"
        f"{f'; {ctx.world_size} processes' if ctx.distributed else ''})")
    if finished:
        say(f"resuming: {len(finished)} finished shard(s) kept, {num_shards - len(finished)} to encode")

    total = sum(len(files[s * shard_size : (s + 1) * shard_size]) for s in todo)
    nworkers = min(8, os.cpu_count() or 1) if workers is None else workers
    with _progress(progress, total, ctx) as advance:
        for s in todo:
            sl = slice(s * shard_size, (s + 1) * shard_size)
            name = shard_name(s)
            _remove_temps(out, name)
            pipeline = _Pipeline(listing.root, files[sl], res, nworkers, ahead=max(2 * batch_size, 4 * nworkers))
            try:
                data = _encode_shard(s, files[sl], file_labels[sl], pipeline, resolved, settings, latent_shape,
                                     batch_size, ctx.device, advance)
            finally:
                pipeline.close()
            write_file_atomic(out / name, data)

    distributed.barrier(ctx)
    infos = []
    for s in range(num_shards):
        info = _shard_info(out / shard_name(s))
        if info is None or info.get("fingerprint") != fingerprints[s]:
            raise UCGMError(f"--out {out}: {shard_name(s)} is missing or unreadable after encoding")
        infos.append(info)
    skipped = sorted([*listing.skipped, *((f, r) for i in infos for f, r in i["skipped"])],
                     key=lambda x: _sort_key(x[0]))
    num_samples = sum(int(i["num_samples"]) for i in infos)
    if ctx.is_main:
        write_file_atomic(out / SKIPPED_NAME, "".join(f"{f}\t{r}\n" for f, r in skipped).encode())
    if num_samples == 0:
        raise UCGMError(f"image folder {images}: none of the {len(files)} image(s) could be read "
                        f"(first: {listing.files[0]}: {skipped[0][1] if skipped else '?'}); see {out / SKIPPED_NAME}")
    measured_mean, measured_std = measured_statistics(infos)
    used = [i for i in infos if i["num_samples"] > 0]
    meta = {
        "num_samples": num_samples,
        "latent_shape": list(latent_shape),
        "num_classes": listing.num_classes,
        "latent_mean": spec["latent_mean"],
        "latent_std": spec["latent_std"],
        "vae": spec,
        "shards": [shard_name(i["shard"]) for i in used],
        "shard_samples": [int(i["num_samples"]) for i in used],
        "class_names": listing.class_names,
        "resolution": res,
        "flip": flip,
        "sample_posterior": sample_posterior,
        "seed": seed if sample_posterior else None,
        "shard_size": shard_size,
        "num_images": len(files) - sum(len(i["skipped"]) for i in infos),
        "num_skipped": len(skipped),
        "measured_mean": measured_mean,
        "measured_std": measured_std,
        "labels_from": "labels file" if listing.mode == "labels" else "class folders",
        "format": FORMAT,
    }
    if ctx.is_main:
        write_file_atomic(out / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
        if skipped:
            say(f"[yellow]skipped {len(skipped)} file(s)[/]: {_shown([f for f, _ in skipped])} "
                f"(list with reasons: {out / SKIPPED_NAME})")
        say(f"wrote {num_samples} latents {list(latent_shape)} in {len(used)} shard(s) + {META_NAME} to {out} "
            f"({time.perf_counter() - t0:.1f} s)")
    distributed.barrier(ctx)
    return PrepareResult(out, len(files), num_samples, num_shards, todo, reused, skipped, latent_shape,
                         time.perf_counter() - t0, meta)


class _progress:
    """A rich progress bar (images, images/s, ETA) on the main process; `advance(n)` elsewhere a no-op."""

    def __init__(self, enabled: bool, total: int, ctx: distributed.Context) -> None:
        self.enabled, self.total, self.ctx = enabled, total, ctx

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _n: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("images"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True))
        self.progress.__enter__()
        what = f"encoding (rank 0 of {self.ctx.world_size})" if self.ctx.distributed else "encoding"
        self.task = self.progress.add_task(what, total=self.total, rate="")
        self.t0, self.done = time.perf_counter(), 0

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=n, rate=f"{rate:.1f} images/s")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)
