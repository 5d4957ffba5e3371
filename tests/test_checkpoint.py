"""Our checkpoint format: exact round trip, atomic writes, and one clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import ucgm_convert as uc
from ucgm_convert.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def _outputs(model: uc.GenerativeModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    return model(x, torch.rand(4, generator=g), torch.tensor([0, 1, 4, 5]))


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_model()
    uc.save_checkpoint(model, tmp_path / "ck")
    loaded = uc.load(tmp_path / "ck")
    assert loaded.family == "ucgm" and loaded.num_classes == 5 and loaded.null_class == 5
    assert loaded.latent_shape == (3, 8, 8) and loaded.transport.name == "Linear"
    assert torch.equal(_outputs(model), _outputs(loaded))
    assert json.loads((tmp_path / "ck" / CONFIG_NAME).read_text()) == loaded.config


def test_loading_through_a_file_inside_the_folder_and_explicit_family(tiny_checkpoint: Path) -> None:
    a = uc.load(tiny_checkpoint / WEIGHTS_NAME)
    b = uc.load(tiny_checkpoint, family="ucgm")
    assert torch.equal(_outputs(a), _outputs(b))


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    uc.save_checkpoint(tiny_model(seed=0), tmp_path / "ck")
    uc.save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(_outputs(uc.load(tmp_path / "ck")), _outputs(tiny_model(seed=1)))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uc.save_checkpoint(tiny_model(seed=0), tmp_path / "ck")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("ucgm_convert.checkpoint.save_file", broken)
    with pytest.raises(OSError):
        uc.save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(_outputs(uc.load(tmp_path / "ck")), _outputs(tiny_model(seed=0)))


def test_truncated_weights_name_the_file(tiny_checkpoint: Path) -> None:
    weights = tiny_checkpoint / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(uc.UCGMError, match=r"model\.safetensors.*truncated or corrupted"):
        uc.load(tiny_checkpoint)


def test_invalid_json_and_bad_fields_name_the_field(tiny_checkpoint: Path) -> None:
    config = tiny_checkpoint / CONFIG_NAME
    good = json.loads(config.read_text())
    config.write_text("{not json")
    with pytest.raises(uc.UCGMError, match="config.json: invalid JSON"):
        uc.load(tiny_checkpoint, family="ucgm")
    config.write_text(json.dumps({**good, "colour": "blue"}))
    with pytest.raises(uc.UCGMError, match="config.json: colour: unknown key; allowed keys: family, arch"):
        uc.load(tiny_checkpoint)
    config.write_text(json.dumps({k: v for k, v in good.items() if k != "transport"}))
    with pytest.raises(uc.UCGMError, match="config.json: transport: missing required key"):
        uc.load(tiny_checkpoint)
    config.write_text(json.dumps({**good, "transport": "Curvy"}))
    with pytest.raises(uc.UCGMError, match="config.json: transport: expected a transport name, one of 'Linear', .*, got 'Curvy'"):
        uc.load(tiny_checkpoint)
    config.write_text(json.dumps({**good, "arch_kwargs": {**good["arch_kwargs"], "depth": 3}}))
    with pytest.raises(uc.UCGMError, match=r"missing keys: blocks\.2\."):
        uc.load(tiny_checkpoint)
    config.write_text(json.dumps({**good, "arch_kwargs": {**good["arch_kwargs"], "hidden_size": 48}}))
    with pytest.raises(uc.UCGMError, match=r"shape mismatch: .*\(model expects"):
        uc.load(tiny_checkpoint)


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = uc.save_checkpoint(tiny_model(), tmp_path / "ck")
    state = load_file(str(path / WEIGHTS_NAME))
    state["projectors.0.weight"] = torch.zeros(2)
    save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(uc.UCGMError, match=r"unexpected keys: projectors\.0\.weight"):
        uc.load(path)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(uc.UCGMError, match="no such file or folder"):
        uc.load(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(uc.UCGMError, match="not a checkpoint of any known family"):
        uc.load(tmp_path / "empty")
    with pytest.raises(uc.UCGMError, match="unknown family 'stylegan'"):
        uc.load(tmp_path / "empty", family="stylegan")
    with pytest.raises(uc.UCGMError, match="no embedded model 'nope'"):
        uc.load("embedded:nope")


def test_overrides_are_refused_for_our_format(tiny_checkpoint: Path) -> None:
    with pytest.raises(uc.UCGMError, match="num_heads"):
        uc.load(tiny_checkpoint, num_heads=4)


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from ucgm_convert.foundation import write_file_atomic

    mask = os.umask(0o022)
    try:
        path = uc.save_checkpoint(tiny_model(), tmp_path / "ck")
        write_file_atomic(tmp_path / "f.bin", b"x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
