"""The images prepare-data encodes: the file list (class folders or a labels file) and the ADM / DiT centre crop.

Files are taken in sorted order of their relative paths; only torchvision's image extensions
count as images (the set DiT's ImageFolder reads). Each image is converted to RGB,
centre-cropped the ADM / DiT way (`center_crop_arr`) and mapped to the VAE's pixel range.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...errors import UCGMError
from ...foundation import IMAGE_EXTENSIONS, is_image_name, path_sort_key, walk_files

SHOWN = 5  # file names shown in messages


def shown(names: Sequence[str]) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:SHOWN]) + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")



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
        everything = sorted(walk_files(root, root, excluded), key=path_sort_key)
        if not everything:
            raise UCGMError(f"{where}: the folder is empty")
        files = [f for f in everything if is_image_name(f)]
        skipped += [(f, "not an image file (extension)") for f in everything if not is_image_name(f)]
        if not files:
            raise UCGMError(f"{where}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        missing = [f for f in files if f not in mapping]
        if missing:
            raise UCGMError(f"--labels {labels_file}: no label for {len(missing)} of {len(files)} image(s): "
                            f"{shown(missing)} (keys are paths relative to {root})")
        labels = [mapping[f] for f in files]
        num_classes = max(labels) + 1
        return ImageList(root, files, labels, [str(i) for i in range(num_classes)], num_classes, skipped, "labels")

    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and (excluded is None or Path(e.path).resolve() != excluded)]
    loose = [e.name for e in entries if not e.is_dir()]
    if not entries or (not classes and not loose):
        raise UCGMError(f"{where}: the folder is empty")
    if not classes:
        if any(is_image_name(n) for n in loose):
            raise UCGMError(f"{where}: no class sub-folders; a flat folder of images needs --labels FILE "
                            "(CSV `file,label` or JSON {file: label})")
        raise UCGMError(f"{where}: no images found (expected one sub-folder of images per class, "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    skipped += [(n, "not inside a class folder") for n in loose]
    files, labels = [], []
    for label, name in enumerate(classes):
        for rel in sorted(walk_files(root / name, root, excluded), key=path_sort_key):
            if is_image_name(rel):
                files.append(rel)
                labels.append(label)
            else:
                skipped.append((rel, "not an image file (extension)"))
    if not files:
        raise UCGMError(f"{where}: no images found in its {len(classes)} class folder(s) "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(root, files, labels, classes, len(classes), sorted(skipped, key=lambda s: path_sort_key(s[0])))


