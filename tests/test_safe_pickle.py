"""The restricted unpickler: plain data and tensors load; anything that could run code is refused
before it runs, and the code stored in persistence pickles is kept as text, never executed."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ucgm_convert.errors import UCGMError
from ucgm_convert.formats.safe_pickle import ModuleRecord, PersistentRecord, module_tensors, read_pickle


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **members: object) -> types.ModuleType:
    """Register an importable module `name` (and its parents) holding `members`, for pickling only."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    module = types.ModuleType(name)
    for attr, value in members.items():
        value.__module__ = name
        value.__qualname__ = attr
        setattr(module, attr, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _write(path: Path, obj: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class _Call:
    """Pickles as a call of `fn(*args)` (what a hostile file does)."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def test_tensors_numpy_and_containers_round_trip(tmp_path: Path) -> None:
    half = torch.randn(3, 5).half()
    param = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    data = {"t": half, "view": half[1:, 2:], "p": param, "od": OrderedDict(a=1, b=[2.5, "x"]),
            "arr": np.arange(4, dtype=np.float32), "s": {1, 2}, "scalar": np.float32(0.5)}
    out = read_pickle(_write(tmp_path / "data.pkl", data))
    assert out["t"].dtype == torch.float16 and torch.equal(out["t"], half)
    assert torch.equal(out["view"], half[1:, 2:])
    assert type(out["p"]) is torch.Tensor and torch.equal(out["p"], param.detach())
    assert out["od"] == OrderedDict(a=1, b=[2.5, "x"]) and out["s"] == {1, 2}
    np.testing.assert_array_equal(out["arr"], np.arange(4, dtype=np.float32))
    assert out["scalar"] == np.float32(0.5)


def test_numpy_1x_module_name_is_accepted(tmp_path: Path) -> None:
    """Files written with numpy 1.x name `numpy.core.multiarray`, numpy 2.x `numpy._core.multiarray`."""
    raw = pickle.dumps(np.array([1.5, -2.0], dtype=np.float32), protocol=3)
    assert b"numpy._core.multiarray\n" in raw
    path = tmp_path / "np1.pkl"
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    np.testing.assert_array_equal(read_pickle(path), np.array([1.5, -2.0], dtype=np.float32))


def test_os_system_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pkl", {"ema": _Call(os.system, f"touch {marker}")})
    with pytest.raises(UCGMError, match=r"evil\.pkl.*refused to unpickle global (posix|nt)\.system"):
        read_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("fn, name", [(eval, "builtins.eval"), (exec, "builtins.exec"), (getattr, "builtins.getattr"),
                                      (__import__, "builtins.__import__"), (open, "io.open")])
def test_code_running_builtins_are_refused(tmp_path: Path, fn: object, name: str) -> None:
    path = _write(tmp_path / "evil.pkl", _Call(fn, "x"))
    with pytest.raises(UCGMError, match=f"refused to unpickle global {name}"):
        read_pickle(path)


def test_file_writing_class_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    path = _write(tmp_path / "evil.pkl", _Call(Path.write_text, marker, "x"))
    with pytest.raises(UCGMError, match=r"refused to unpickle global pathlib\.Path\.write_text"):
        read_pickle(path)
    assert not marker.exists()


def test_hostile_storage_blob_is_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own `_load_from_bytes` would torch.load the blob with weights_only=False."""
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
    load_from_bytes = _fake_module(monkeypatch, "torch.storage", _load_from_bytes=lambda b: b)._load_from_bytes
    path = _write(tmp_path / "evil.pkl", _Call(load_from_bytes, blob))
    monkeypatch.undo()
    with pytest.raises(UCGMError, match=r"evil\.pkl: refused to load: a tensor storage blob pickles objects"):
        read_pickle(path)
    assert not marker.exists()


def test_persistent_object_source_is_kept_as_text_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "executed"
    src = f"open({str(marker)!r}, 'w').write('ran')\nclass Net: pass\n"
    reconstruct = _fake_module(monkeypatch, "torch_utils.persistence",
                               _reconstruct_persistent_obj=lambda meta: meta)._reconstruct_persistent_obj
    easydict = _fake_module(monkeypatch, "dnnlib.util", EasyDict=type("EasyDict", (dict,), {})).EasyDict
    meta = dict(type="class", version=6, module_src=src, class_name="Net",
                state={"_parameters": OrderedDict(w=torch.ones(2)), "_buffers": OrderedDict(b=torch.zeros(1)),
                       "_modules": OrderedDict(), "_non_persistent_buffers_set": set()})
    path = _write(tmp_path / "net.pkl", easydict(ema=_Call(reconstruct, meta)))
    monkeypatch.undo()
    out = read_pickle(path)
    assert type(out) is dict
    record = out["ema"]
    assert isinstance(record, PersistentRecord) and record.class_name == "Net" and record.module_src == src
    assert set(module_tensors(record, "net.pkl")) == {"w", "b"}
    assert not marker.exists()


def test_module_dict_becomes_a_record(tmp_path: Path) -> None:
    container = torch.nn.ModuleDict({"a": torch.nn.Identity()})
    container._modules = OrderedDict()  # keep only the ModuleDict itself in the pickle
    out = read_pickle(_write(tmp_path / "md.pkl", container))
    assert isinstance(out, ModuleRecord) and out.class_name == "ModuleDict" and out.state["_modules"] == {}


def test_truncated_and_non_pickle_files(tmp_path: Path) -> None:
    raw = pickle.dumps({"x": torch.randn(64), "y": list(range(100))}, protocol=4)
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UCGMError, match=r"cut\.pkl.*(truncated|ends early)"):
        read_pickle(truncated)
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(UCGMError, match=r"notes\.pkl: not a Python pickle"):
        read_pickle(text)
    with pytest.raises(UCGMError, match="no such file"):
        read_pickle(tmp_path / "missing.pkl")


def test_non_storage_tensor_base_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rebuild = _fake_module(monkeypatch, "torch._utils", _rebuild_tensor_v2=lambda *a: a)._rebuild_tensor_v2
    path = _write(tmp_path / "bad.pkl", _Call(rebuild, "not a storage", 0, (1,), (1,), False, OrderedDict()))
    monkeypatch.undo()
    with pytest.raises(UCGMError, match=r"bad\.pkl.*expected a storage"):
        read_pickle(path)


def test_cached_per_file_version(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.pkl", {"v": 1})
    assert read_pickle(path) is read_pickle(path)
    _write(path, {"v": 22})
    assert read_pickle(path) == {"v": 22}


def test_allow_list_has_no_code_paths() -> None:
    """The allow-list holds no I/O or import machinery."""
    from ucgm_convert.formats.safe_pickle import _allowed_globals

    values = _allowed_globals().values()
    assert not any(v in values for v in (io.BytesIO, open, eval, exec, __import__, getattr, torch.load))


class _Exec:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("reader", ["checkpoint", "inception", "dinov2", "reference"])
def test_refusals_name_the_import_and_never_suggest_weights_only_false(tmp_path: Path, reader: str) -> None:
    from ucgm_convert.formats.torch_files import read_torch
    from ucgm_convert.metrics import dinov2, inception
    from ucgm_convert.metrics.fid import load_reference

    read = {"checkpoint": read_torch, "inception": inception.read_weights, "dinov2": dinov2.read_weights,
            "reference": load_reference}[reader]
    evil, noise = tmp_path / "evil.pt", tmp_path / "noise.pt"
    torch.save({"x": _Exec()}, evil)
    noise.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # starts like a zip, is not one
    with pytest.raises(UCGMError) as refused:
        read(evil)
    message = str(refused.value)
    assert "\n" not in message and "weights_only" not in message and "Re-running" not in message
    assert "evil.pt" in message and ("posix.system" in message or reader == "reference")
    with pytest.raises(UCGMError) as unreadable:
        read(noise)
    assert "could run code" not in str(unreadable.value) and "noise.pt" in str(unreadable.value)
