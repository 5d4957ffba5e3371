"""Small utilities every layer uses: atomic writes, output folders, dtype and device parsing, image files.

Nothing here knows about models or families; it imports only torch and the error type, so any
module may import it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from .errors import UCGMError

# torchvision's IMG_EXTENSIONS: the files DiT / ADM's ImageFolder reads (and what we list everywhere).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An exception's text on one line (whitespace collapsed), cut to `limit` characters."""
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def looks_like_hub_id(text: str) -> bool:
    """True for `user/name` (a Hugging Face repo id) that is not a relative or absolute path."""
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool) -> None:
    """Give a temp file/folder the permissions a plain open()/mkdir() would (mkstemp uses 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        _default_mode(Path(tmp), directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_file_atomic` for UTF-8 text."""
    write_file_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `out_dir` when the block succeeds.

    A reader never sees a half-written folder; on an error the temporary folder is removed
    and `out_dir` is untouched.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir == Path.cwd().resolve() or out_dir in Path.cwd().resolve().parents:
        raise UCGMError(f"{out_dir}: is the current folder (or holds it); a folder written atomically replaces "
                        "its target: choose a new subfolder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        _default_mode(tmp, directory=True)
    except OSError as err:
        raise UCGMError(f"{out_dir}: cannot write here ({err.strerror or err})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for item in tmp.rglob("*"):  # some writers (safetensors) create files 0600
        _default_mode(item, directory=item.is_dir())
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(folder: str | Path, flag: str = "--out") -> Path:
    """Prove `folder` can be written (created if missing) without creating it yet; UCGMError naming `flag`.

    An existing folder gets a probe file written and removed; a missing one needs its nearest
    existing ancestor to be a writable folder, so that a bad input never leaves an empty folder behind.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UCGMError(f"{flag} {folder}: exists and is not a folder")
    if folder.is_dir():
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise UCGMError(f"{flag} {folder}: cannot write here ({err.strerror or err})") from None
        return folder
    ancestor = folder.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UCGMError(f"{flag} {folder}: cannot write here ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UCGMError(f"{flag} {folder}: cannot write here ({ancestor} is not writable)")
    return folder


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def output_folder(out: str | Path, owned: tuple[str, ...], what: str, *, overwrite: bool = False,
                  resume: bool | None = None, flag: str = "--out") -> Path:
    """The one output-folder policy of every command; returns `out`, checked writable (created when written).

    A new or empty folder is used. A folder holding only entries this command writes (`owned`:
    names or glob patterns; hidden entries are ignored) is a previous run: it is continued with
    `resume` (None: the command cannot resume), replaced with `overwrite`, and otherwise refused. A
    folder holding anything else is never touched: the error names what it holds.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UCGMError(f"{flag} {out}: exists and is not a folder")
    entries = sorted(e.name for e in out.iterdir() if not e.name.startswith(".")) if out.is_dir() else []
    foreign = [e for e in entries if not _matches(e, owned)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise UCGMError(f"{flag} {out}: not empty and not a {what} folder (it holds {shown}); nothing was "
                        "changed: choose a new or empty folder")
    if entries and not (overwrite or resume):
        how = "--resume to continue it, --overwrite to replace it" if resume is not None else \
            "--overwrite to replace it"
        raise UCGMError(f"{flag} {out}: holds a previous {what} ({', '.join(entries[:5])}); pass {how}, or choose "
                        "another folder")
    return check_writable_dir(out, flag)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def available_memory() -> int:
    """Bytes of memory this process may still allocate: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread: multi-threaded BLAS sums in an order that depends on the thread count,
    which would change the last bits of float64 statistics from one machine to the next."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def gib(n: float) -> str:
    """A byte count as GiB, for messages."""
    return f"{n / 2**30:.1f} GiB"


# --------------------------------------------------------------------------------------------
# dtype and device
# --------------------------------------------------------------------------------------------


def parse_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES), flag: str = "--dtype",
                hint: str = "") -> torch.dtype:
    """The torch dtype called `name` (one of `allowed`); UCGMError naming `flag` otherwise."""
    if name not in allowed:
        raise UCGMError(f"{flag}: expected one of {', '.join(allowed)}, got {name!r}{hint}")
    return DTYPES[name]


SAMPLE_DTYPES = ("auto", "float32", "tf32", "bfloat16", "float16")


def sampling_dtype(name: str, device_type: str) -> str:
    """The sampling precision `name` resolved for a device: auto is tf32 on CUDA (the reference samples
    with torch.backends.cuda.matmul.allow_tf32 = True), float32 elsewhere; tf32 means float32 off CUDA."""
    if name == "auto":
        return "tf32" if device_type == "cuda" else "float32"
    return "float32" if name == "tf32" and device_type != "cuda" else name


def precision_label(resolved: str, requested: str) -> str:
    """How a settings table names a sampling precision (and, for auto, why)."""
    names = {"tf32": "float32 weights, TF32 matmuls", "float32": "float32",
             "bfloat16": "bfloat16 autocast", "float16": "float16 autocast"}
    why = {"tf32": " (auto: the reference samples with TF32)", "float32": " (auto: float32 off CUDA)"}
    return names[resolved] + (why.get(resolved, "") if requested == "auto" else "")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Within the block CUDA float32 matmuls and convolutions may use TF32 (restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def default_device() -> str:
    """"cuda" when a GPU is usable, else "cpu" (decided when asked, never at import time)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """A usable torch device for `name` (None: `default_device()`); UCGMError if it is not on this machine."""
    text = default_device() if name is None else str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UCGMError(f"{flag}: not a torch device: {text!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UCGMError(f"{flag} {text}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UCGMError(f"{flag} {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    raise UCGMError(f"{flag} {text}: not supported (expected cpu, cuda or cuda:N)")


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------


def is_image_name(name: str) -> bool:
    """True for a file name with one of IMAGE_EXTENSIONS (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def walk_files(folder: Path, root: Path | None = None, exclude: Path | None = None) -> Iterator[str]:
    """Relative posix paths (to `root`, default `folder`) of every non-hidden file under `folder`.

    Hidden files and folders (names starting with ".") are skipped, and so is the folder `exclude`
    (e.g. an output folder inside the input).
    """
    root = folder if root is None else root
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and (exclude is None or (here / d).resolve() != exclude)]
        for name in filenames:
            if not name.startswith("."):
                yield (here / name).relative_to(root).as_posix()


def path_sort_key(rel: str) -> tuple[str, ...]:
    """Sort key of a relative posix path: by its parts, so "a/b" sorts before "a.b"."""
    return tuple(rel.split("/"))


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursive, hidden skipped), sorted by relative path."""
    folder = Path(folder)
    rels = sorted((r for r in walk_files(folder) if is_image_name(r)), key=path_sort_key)
    if not rels:
        raise UCGMError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return [folder / r for r in rels]
