"""A restricted unpickler for NVIDIA `torch_utils.persistence` pickles (EDM2's released snapshots).

Those files are plain `pickle.dump`s of live objects whose classes are rebuilt at load time by
`exec`-ing Python source stored in the file. Here no stored code is imported or run: the only
globals resolved are an explicit allow-list of plain-data constructors (tensors, storages,
numpy arrays, ordered dicts), and every persistent object becomes a `PersistentRecord` that just
holds its pickled metadata. Anything else is refused with a UCGMError naming the file and global.
"""

from __future__ import annotations

import functools
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UCGMError


@dataclass
class PersistentRecord:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` received, as data.

    `module_src` is the pickled module's source text; it is kept for inspection and never executed.
    """

    type: str
    version: int
    module_src: str
    class_name: str
    state: dict[str, Any]


@dataclass
class ModuleRecord:
    """A pickled non-persistent torch container (e.g. `nn.ModuleDict`): its `__dict__` as data."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.class_name} state is {type(state).__name__}, expected a dict")
        self.state = state


def _record_class(class_name: str) -> type:
    """A ModuleRecord subclass that pickle's NEWOBJ/BUILD opcodes can instantiate for `class_name`."""

    def new(cls: type, *args: Any) -> ModuleRecord:
        if args:
            raise pickle.UnpicklingError(f"{class_name} takes no constructor arguments in a snapshot")
        return ModuleRecord(class_name)

    return type(class_name, (ModuleRecord,), {"__new__": new})


class RefusedContent(pickle.UnpicklingError):
    """A nested blob (tensor storage) holds something the allow-list refuses."""


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Stand-in for the persistence reconstructor: validates `meta` and returns it as a record."""
    if not isinstance(meta, Mapping):
        raise pickle.UnpicklingError(f"persistent object metadata is {type(meta).__name__}, expected a dict")
    missing = {"type", "version", "module_src", "class_name", "state"} - set(meta)
    if missing:
        raise pickle.UnpicklingError(f"persistent object metadata lacks {', '.join(sorted(missing))}")
    state = meta["state"]
    if not isinstance(state, Mapping) or not isinstance(meta["class_name"], str):
        raise pickle.UnpicklingError("persistent object metadata has a malformed class_name or state")
    return PersistentRecord(str(meta["type"]), int(meta["version"]), str(meta["module_src"]),
                            meta["class_name"], dict(state))


def _load_storage_from_bytes(data: Any) -> Any:
    """`torch.storage._load_from_bytes` with weights_only=True (the original allows arbitrary code)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"a tensor storage blob is {type(data).__name__}, expected bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notice
        try:
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise RefusedContent("a tensor storage blob pickles objects other than tensors "
                                 "(refused by torch.load(weights_only=True); it could run code)") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor storage blob holds {type(storage).__name__}, expected a storage")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    """`torch._utils._rebuild_tensor_v2` for a checked storage; hooks and autograd state are dropped."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor is built on {type(storage).__name__}, expected a storage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None,
                       state: Any = None) -> Tensor:
    """`torch._utils._rebuild_parameter(_with_state)` returning the plain tensor (no Parameter)."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError(f"a parameter wraps {type(data).__name__}, expected a tensor")
    return data


def _numpy_global(name: str) -> Any:
    """numpy's `_core.multiarray.<name>` (numpy 2.x) or `core.multiarray.<name>` (numpy 1.x)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The complete allow-list: (module, name) -> the object it resolves to."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,  # nn.Module._non_persistent_buffers_set in pickle protocols < 4
        ("dnnlib.util", "EasyDict"): dict,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("torch.nn.modules.container", "ModuleDict"): _record_class("ModuleDict"),
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # numpy 1.x and 2.x names; `scalar` rebuilds numpy scalars (e.g. an np.float32 attribute).
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _numpy_global("_reconstruct")
        allowed[(module, "scalar")] = _numpy_global("scalar")
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_allowed_globals()`; `source` names the file in errors."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UCGMError(f"{self.source}: refused to unpickle global {module}.{name}: only tensors, numpy "
                            f"arrays, plain containers and persistence records are allowed (the file could "
                            f"otherwise run code)")
        return self.allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise UCGMError(f"{self.source}: refused persistent id {pid!r}: not a plain pickle of objects")


def _looks_like_pickle(head: bytes) -> bool:
    """A pickle of protocol 2..5 starts with the PROTO opcode."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


@functools.lru_cache(maxsize=2)
def _read_pickle_cached(path: str, mtime_ns: int, size: int) -> Any:
    with open(path, "rb") as f:
        if not _looks_like_pickle(f.read(2)):
            raise UCGMError(f"{path}: not a Python pickle (protocol 2-5)")
        f.seek(0)
        try:
            return RestrictedUnpickler(f, path).load()
        except UCGMError:
            raise
        except RefusedContent as err:
            raise UCGMError(f"{path}: refused to load: {err}") from None
        except EOFError:
            raise UCGMError(f"{path}: the pickle ends early (truncated download?)") from None
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                RuntimeError, OverflowError, MemoryError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UCGMError(f"{path}: not a readable snapshot pickle (truncated or corrupted?): {detail}") from None


def read_pickle(path: str | Path) -> Any:
    """Unpickle `path` with RestrictedUnpickler, cached by (path, mtime, size) like readers.read_torch."""
    path = Path(path)
    if not path.is_file():
        raise UCGMError(f"{path}: no such file")
    stat = path.stat()
    return _read_pickle_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def clear_pickle_cache() -> None:
    """Drop cached unpickled files (a snapshot's tensors live in RAM, unlike mmap-ed torch files)."""
    _read_pickle_cached.cache_clear()


def module_tensors(record: Any, source: str, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled nn.Module record: its `_parameters` and persistent `_buffers`,
    recursively through `_modules`, keyed like `nn.Module.state_dict()`."""
    if not isinstance(record, (PersistentRecord, ModuleRecord)):
        raise UCGMError(f"{source}: expected a pickled module at {prefix.rstrip('.') or 'top level'}, "
                        f"got {type(record).__name__}")
    state = record.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, Tensor] = {}
    groups: list[tuple[str, Callable[[str], bool]]] = [("_parameters", lambda n: True),
                                                       ("_buffers", lambda n: n not in skipped)]
    for group, keep in groups:
        entries = state.get(group, {})
        if not isinstance(entries, Mapping):
            raise UCGMError(f"{source}: {prefix}{group} is {type(entries).__name__}, expected a dict")
        for name, value in entries.items():
            if value is None or not keep(name):
                continue
            if not isinstance(value, Tensor):
                raise UCGMError(f"{source}: {prefix}{name} is {type(value).__name__}, expected a tensor")
            out[prefix + name] = value
    children = state.get("_modules", {})
    if not isinstance(children, Mapping):
        raise UCGMError(f"{source}: {prefix}_modules is {type(children).__name__}, expected a dict")
    for name, child in children.items():
        if child is not None:
            out.update(module_tensors(child, source, f"{prefix}{name}."))
    return out
