"""One output-folder policy for every command: a new or empty folder is used; a previous run of the same
command is refused unless --overwrite (or continued with --resume where a command resumes); a folder
holding anything else is never touched."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.errors import UCGMError
from ucgm_convert.foundation import atomic_dir

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "run").mkdir()
    (folder / "run" / "model.safetensors").write_text("not yours either")
    return folder


def untouched(folder: Path) -> bool:
    return (folder / "notes.txt").read_text() == "my notes" and (folder / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["sample", "convert", "tune", "eval"])
def test_a_folder_that_is_not_ours_is_never_touched(tmp_path: Path, command: str) -> None:
    mine = user_folder(tmp_path)
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    args = {
        "sample": ["sample", "--checkpoint", str(ckpt), "--num", "2"],
        "convert": ["convert", str(ckpt)],
        "tune": ["tune", "--from", "demo", "--steps", "1", "--global-batch", "2", "--demo-size", "8"],
        "eval": ["eval", "fid", "--checkpoint", str(ckpt), "--ref", str(ref), "--num", "5"],
    }[command]
    for extra in ([], ["--overwrite"]):
        code, output = invoke(*args, "--out", str(mine), *extra)
        assert code == 2, output
        assert "not empty and not a" in output and "notes.txt" in output, output
        assert untouched(mine)


def test_sample_refuses_its_previous_run_without_overwrite(tmp_path: Path) -> None:
    ckpt = uc.save_checkpoint(tiny_model(), tmp_path / "tiny")
    out = tmp_path / "samples"
    assert invoke("sample", "--checkpoint", str(ckpt), "--num", "2", "--out", str(out))[0] == 0
    first = (out / "samples.npz").read_bytes()
    code, output = invoke("sample", "--checkpoint", str(ckpt), "--num", "2", "--seed", "1", "--out", str(out))
    assert code == 2 and "holds a previous sample run" in output and "--overwrite" in output
    assert (out / "samples.npz").read_bytes() == first
    assert invoke("sample", "--checkpoint", str(ckpt), "--num", "2", "--seed", "1", "--out", str(out),
                  "--overwrite")[0] == 0
    assert (out / "samples.npz").read_bytes() != first


def test_bad_input_creates_no_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper"
    code, _ = invoke("sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(out))
    assert code == 2 and not (tmp_path / "new").exists()


ROOT_WRITES_ANYWHERE = pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")


@pytest.mark.parametrize("blocker", ["a file", pytest.param("a read-only folder", marks=ROOT_WRITES_ANYWHERE)])
def test_an_unwritable_out_fails_before_any_sampling(tmp_path: Path, blocker: str) -> None:
    """The one error line comes before the settings table and the progress bar: nothing was sampled."""
    parent = tmp_path / "blocked"
    if blocker == "a file":
        parent.write_text("not a folder")
    else:
        parent.mkdir(mode=0o500)
    result = runner.invoke(app, ["sample", "--num", "2", "--out", str(parent / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "cannot write here" in lines[0], result.output


def test_convert_replaces_only_its_own_checkpoint_and_never_the_current_folder(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "converted"
    assert invoke("convert", "embedded:demo", "--out", str(out))[0] == 0
    code, output = invoke("convert", "embedded:demo", "--out", str(out))
    assert code == 2 and "holds a previous checkpoint" in output
    assert invoke("convert", "embedded:demo", "--out", str(out), "--overwrite")[0] == 0
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, output = invoke("convert", "embedded:demo", "--out", ".")
    assert code == 2 and "is the current folder" in output and empty.is_dir() and not any(empty.iterdir())
    with pytest.raises(UCGMError, match="current folder"), atomic_dir(tmp_path):
        pass


def test_eval_ref_refuses_to_replace_a_file_without_overwrite(tmp_path: Path) -> None:
    existing = tmp_path / "ref.npz"
    existing.write_bytes(b"keep me")
    code, output = invoke("eval", "ref", str(tmp_path), "--out", str(existing))
    assert code == 2 and "exists; pass --overwrite" in output and existing.read_bytes() == b"keep me"
