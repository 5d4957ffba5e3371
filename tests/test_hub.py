"""`ucgm push` and Hub load-back, against a fake Hub at the HTTP boundary (tests/fake_hub.py).

Everything of ours and of huggingface_hub runs for real: create_repo, list_repo_files,
create_commit (YAML validation, preupload, LFS batch + PUT, ndjson commit), snapshot_download
and its cache. huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE / HF_TOKEN_PATH at import
time, so in-process tests patch those module constants (monkeypatch undoes it), and one test
runs the `ucgm` command in a subprocess with the environment variables set, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from fake_hub import FakeHub, populate_cache
from huggingface_hub import ModelCard, constants
from typer.testing import CliRunner

import ucgm_convert as uc
from ucgm_convert.cli import app
from ucgm_convert.hub import CARD_MARKER, inspect_checkpoint, make_model_card, push_to_hub
from ucgm_convert.recipe import load_recipe

TOKEN = "hf_test_token"
MANAGED = {".gitattributes", "model.safetensors", "config.json", "recipe.yaml", "results.json", "README.md"}
RESULTS = {"results": [
    {"fid": 1.42, "inception_score": 296.5, "num_samples": 50000, "nfe": 2,
     "settings": {"steps": 2, "order": 1, "cfg_scale": 1.0, "stochasticity": 1.0}, "reference": "VIRTUAL_imagenet256"},
    {"fid": 2.11, "num_samples": 50000, "settings": {"steps": 8, "order": 1, "cfg_scale": 1.0}},
    {"note": "an entry without fid is skipped"},
]}
runner = CliRunner()
# huggingface_hub's classic LFS upload passes the file as data=; httpx2 deprecates that spelling.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HF home: no token, empty cache, online, classic LFS uploads (see fake_hub)."""
    home = tmp_path / "hf"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return home


@pytest.fixture
def hub(hf_env: Path):
    fake = FakeHub()
    fake.install()
    yield fake
    fake.uninstall()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A tuned-looking checkpoint: tiny weights, REPA-E recipe, results.json, and a stray file."""
    path = uc.save_checkpoint(tiny_model(), tmp_path / "tuned", recipe_yaml=load_recipe("repa-e").to_yaml())
    (path / "results.json").write_text(json.dumps(RESULTS))
    (path / "samples.npz").write_bytes(b"not uploaded")
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)

    return result.exit_code, result.output


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# --------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------


def test_push_uploads_folder_in_one_commit_with_card(hub: FakeHub, folder: Path) -> None:
    result = push_to_hub(folder, "alice/sit-ucgm", token=TOKEN, base_model="REPA-E/sit-repae-vavae")

    repo = hub.repos["alice/sit-ucgm"]
    assert len(hub.commit_requests) == 1 and len(repo.commits) == 2  # the Hub's initial commit + ours
    assert result.commit_oid == repo.head.oid and result.commit_url.endswith(repo.head.oid)
    assert set(repo.head.files) == MANAGED  # samples.npz stays local
    for name in MANAGED - {".gitattributes"}:
        assert repo.head.files[name] == (folder / name).read_bytes(), name
    assert repo.head.lfs_paths == {"model.safetensors"}  # weights went through LFS (batch + PUT)
    assert any(method == "PUT" for method, _ in hub.requests)

    card = ModelCard.load("alice/sit-ucgm")  # downloaded back through the fake Hub
    data = card.data
    assert data.license == "mit" and data.library_name == "ucgm-convert"
    assert data.pipeline_tag is None  # class-conditional: the Hub has no such task, and unconditional would be wrong
    assert {r.task_type for r in data.eval_results} == {"class-conditional-image-generation"}
    assert data.base_model == "REPA-E/sit-repae-vavae" and data.datasets == ["ILSVRC/imagenet-1k"]
    assert {"diffusion", "flow-matching", "few-step", "ucgm", "class-conditional", "repa-e", "imagenet"} <= set(data.tags)
    fids = {r.metric_config: r.metric_value for r in data.eval_results if r.metric_type == "fid"}
    assert fids == {"nfe=2": 1.42, "nfe=8": 2.11}
    assert [r.metric_value for r in data.eval_results if r.metric_type == "inception_score"] == [296.5]
    assert {r.dataset_type for r in data.eval_results} == {"ILSVRC/imagenet-1k"}
    assert CARD_MARKER in card.text
    for text in ("ucgm sample --checkpoint alice/sit-ucgm", 'uc.load("alice/sit-ucgm")', "| 2 | 1.42 | 296.5 |",
                 "huber_eps: 5.0", "enhanced_style: fc-vs-fe", "MIT license"):
        assert text in card.text, text


def test_cli_push_default_transfer_config_and_env_token(hf_env: Path, folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # huggingface_hub's default configuration
    fake = FakeHub(lfs=False)  # the server asks for inline ("regular") files: no Xet/LFS transfer to fake
    fake.install()
    try:
        code, output = cli("push", str(folder), "--repo", "alice/tiny", "--private", env={"HF_TOKEN": TOKEN})
    finally:
        fake.uninstall()
    assert code == 0, output
    repo = fake.repos["alice/tiny"]
    assert repo.private and len(fake.commit_requests) == 1 and set(repo.head.files) == MANAGED
    assert repo.head.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert "one commit" in output and "alice/tiny" in output


def test_repush_regenerates_card_and_removes_stale_files(hub: FakeHub, folder: Path) -> None:
    push_to_hub(folder, "alice/tiny", token=TOKEN)
    (folder / "results.json").unlink()
    result = push_to_hub(folder, "alice/tiny", token=TOKEN)  # repo exists (409 -> exist_ok)

    repo = hub.repos["alice/tiny"]
    assert len(repo.commits) == 3 and len(hub.commit_requests) == 2
    assert result.deleted == ["results.json"] and "results.json" not in repo.head.files
    card = (folder / "README.md").read_text()
    assert repo.head.files["README.md"].decode() == card
    assert "model-index" not in card and "## Results" in card  # paper numbers from the recipe remain


def test_hand_written_card_is_never_silently_replaced(hub: FakeHub, folder: Path) -> None:
    mine = "---\nlicense: mit\n---\n# My own card\n"
    (folder / "README.md").write_text(mine)
    code, output = cli("push", str(folder), "--repo", "alice/tiny", "--token", TOKEN)
    assert code == 2 and "--overwrite-card" in error_line(output)
    assert hub.requests == [] and (folder / "README.md").read_text() == mine

    assert cli("push", str(folder), "--repo", "alice/kept", "--token", TOKEN, "--keep-card")[0] == 0
    assert hub.repos["alice/kept"].head.files["README.md"].decode() == mine

    assert cli("push", str(folder), "--repo", "alice/over", "--token", TOKEN, "--overwrite-card")[0] == 0
    assert CARD_MARKER in (folder / "README.md").read_text()
    assert hub.repos["alice/over"].head.files["README.md"] == (folder / "README.md").read_bytes()


def test_dry_run_writes_card_without_token_or_network(hub: FakeHub, folder: Path) -> None:
    code, output = cli("push", str(folder), "--repo", "alice/tiny", "--dry-run")
    assert code == 0, output
    assert hub.requests == [] and CARD_MARKER in (folder / "README.md").read_text()
    assert not list(folder.parent.glob(".README.md.tmp-*")) and not list(folder.glob(".README.md.tmp-*"))


@pytest.mark.parametrize("family, license", [
    ("edm2", "cc-by-nc-sa-4.0"), ("repa-e", "mit"), ("lightningdit", "mit"), ("ddt", "other"),
    ("ucgm", "apache-2.0"), ("somebody-else", "other"),
])
def test_license_follows_the_source_family(tiny_checkpoint: Path, family: str, license: str) -> None:
    (tiny_checkpoint / "recipe.yaml").write_text(f"family: {family}\nmodel: X\n")
    data = make_model_card(tiny_checkpoint, "alice/x").data
    assert data.license == license
    assert ("imagenet" in data.tags) == (family in ("edm2", "repa-e", "lightningdit", "ddt"))
    if license == "other":
        assert data.license_name  # the Hub asks for a name (and link) with "other"
    assert make_model_card(tiny_checkpoint, "alice/x", license="mit").data.license == "mit"


def test_card_without_recipe_or_results(tiny_checkpoint: Path) -> None:
    card = make_model_card(tiny_checkpoint, "alice/x")
    assert card.data.license == "apache-2.0" and card.data.eval_results is None
    assert card.data.base_model is None and "## Results" not in card.text and "## Recipe" not in card.text
    assert inspect_checkpoint(tiny_checkpoint).results == []


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors, exit 2, nothing sent
# --------------------------------------------------------------------------------------------


def test_missing_token_says_how_to_provide_one(hub: FakeHub, folder: Path) -> None:
    code, output = cli("push", str(folder), "--repo", "alice/tiny")
    line = error_line(output)
    assert code == 2 and "--token" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert hub.requests == [] and not (folder / "README.md").exists()


@pytest.mark.parametrize("repo", ["alice", "alice/x/y", "alice/bad..name", "alice/with space", "-alice/x", ""])
def test_malformed_repo_id(hub: FakeHub, folder: Path, repo: str) -> None:
    code, output = cli("push", str(folder), "--repo", repo, "--token", TOKEN)
    assert code == 2 and "--repo" in error_line(output) and "USER/NAME" in output
    assert hub.requests == []


def test_not_our_format(hub: FakeHub, tmp_path: Path, tiny_checkpoint: Path) -> None:
    def err(path: Path) -> str:
        code, output = cli("push", str(path), "--repo", "alice/x", "--token", TOKEN)
        assert code == 2
        return error_line(output)

    assert "no such folder" in err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "missing config.json and model.safetensors" in err(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    assert "missing model.safetensors" in err(broken)
    (broken / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:500])
    assert "not a readable safetensors file" in err(broken)
    (broken / "config.json").write_text("{not json")
    assert "config.json: invalid JSON" in err(broken)
    assert hub.requests == []


def test_rejected_token_and_foreign_namespace(hub: FakeHub, folder: Path) -> None:
    code, output = cli("push", str(folder), "--repo", "alice/x", "--token", "hf_wrong")
    assert code == 2 and "rejected the token" in error_line(output)
    code, output = cli("push", str(folder), "--repo", "bob/x", "--token", TOKEN)
    assert code == 2 and "403" in error_line(output)
    assert hub.commit_requests == []


# --------------------------------------------------------------------------------------------
# Load back through the cache, offline
# --------------------------------------------------------------------------------------------


def outputs(model: uc.GenerativeModel) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *model.latent_shape, generator=g)
    y = torch.tensor([0, 1, 2, 5])
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    return model(x, t, y), uc.sample(model, x, transport=model.transport, steps=3, y=y)


def test_load_offline_from_populated_cache_is_bit_identical(hub: FakeHub, hf_env: Path, folder: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    push_to_hub(folder, "alice/tiny", token=TOKEN)
    head = hub.repos["alice/tiny"].head
    snapshot = populate_cache(hf_env / "hub", "alice/tiny", head.oid, head.files, head.lfs_paths)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)

    loaded = uc.load("alice/tiny")
    assert len(hub.requests) == before  # nothing went to the network
    original = uc.load_checkpoint(folder)
    for a, b in zip(outputs(loaded), outputs(original)):
        assert torch.equal(a, b)
    assert loaded.config == original.config
    assert Path(os.path.realpath(snapshot / "model.safetensors")).parent.name == "blobs"

    snippet = (snapshot / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(snippet, scope)  # the card's usage example runs as printed, offline, from the cache
    assert scope["latents"].shape == (4, *original.latent_shape)
    assert len(hub.requests) == before


def test_download_through_hub_then_offline(hub: FakeHub, hf_env: Path, folder: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    push_to_hub(folder, "alice/tiny", token=TOKEN)
    online = uc.load("alice/tiny")  # huggingface_hub downloads into its own cache layout
    assert any("/resolve/" in url for _, url in hub.requests)
    hub.uninstall()  # no Hub at all any more
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = uc.load("alice/tiny")
    for a, b in zip(outputs(offline), outputs(online)):
        assert torch.equal(a, b)


def test_not_cached_offline_is_a_clear_error(hf_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, output = cli("sample", "--checkpoint", "alice/never-pushed", "--out", str(tmp_path / "o"))
    line = error_line(output)
    assert code == 2 and "alice/never-pushed" in line and "not in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE" in line
    with pytest.raises(uc.UCGMError, match="not in the local Hugging Face cache"):
        uc.load("alice/never-pushed")


@pytest.mark.slow
def test_cli_sample_offline_subprocess_matches_local_folder(hub: FakeHub, hf_env: Path, folder: Path,
                                                            tmp_path: Path) -> None:
    push_to_hub(folder, "alice/tiny", token=TOKEN)
    head = hub.repos["alice/tiny"].head
    populate_cache(hf_env / "hub", "alice/tiny", head.oid, head.files, head.lfs_paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env |= {"HF_HOME": str(hf_env), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = ["sample", "--num", "5", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "ucgm_convert", *args, "--checkpoint", "alice/tiny",
                           "--out", str(tmp_path / "hubout")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, output = cli(*args, "--checkpoint", str(folder), "--out", str(tmp_path / "local"))
    assert code == 0, output
    with np.load(tmp_path / "hubout" / "samples.npz") as a, np.load(tmp_path / "local" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_license_the_hub_refuses(hub: FakeHub, folder: Path) -> None:
    code, output = cli("push", str(folder), "--repo", "alice/x", "--token", TOKEN, "--license", "not-a-license")
    assert code == 2 and "refused" in error_line(output) and "license" in output
    code, output = cli("push", str(folder), "--repo", "alice/x", "--token", TOKEN, "--license", "MIT License")
    assert code == 2 and "--license" in error_line(output)
    assert hub.commit_requests == []


def eval_results(fid: float, sha: str, nfe: str, steps: int) -> dict:
    """results.json as `ucgm eval fid` writes it (ucgm_convert/evaluate.py finalize)."""
    return {"fid": fid, "inception_score": {"mean": 250.0, "std": 3.0, "splits": 10}, "num_samples": 50000,
            "reference": {"path": "/refs/VIRTUAL_imagenet256_labeled.npz", "sha256": "ab", "format": "adm-npz"},
            "sampling": {"settings": {"steps": steps, "order": 1, "cfg_scale": 1.0}, "nfe_per_sample": nfe},
            "model": {"family": "ucgm", "state_sha256": sha}}


def test_eval_results_schema_extra_files_and_weight_check(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from ucgm_convert.formats.statedict import state_sha256

    model = uc.load_checkpoint(tiny_checkpoint)
    sha = state_sha256(model, model.vae_state)
    (tiny_checkpoint / "results.json").write_text(json.dumps(eval_results(3.5, sha, "2", 2)))
    other = tmp_path / "eval1" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps(eval_results(5.25, sha, "1", 1)))
    card = make_model_card(inspect_checkpoint(tiny_checkpoint, [other]), "alice/x")
    fids = {r.metric_config: r.metric_value for r in card.data.eval_results if r.metric_type == "fid"}
    assert fids == {"nfe=2": 3.5, "nfe=1": 5.25}
    assert "| 2 | 3.50 | 250.0 | 50000 | 2 | 1 | 1.0 | - | VIRTUAL_imagenet256_labeled.npz |" in card.text

    other.write_text(json.dumps(eval_results(5.25, "0" * 64, "1", 1)))  # measured on other weights
    code, output = cli("push", str(tiny_checkpoint), "--repo", "alice/x", "--dry-run", "--results", str(other))
    assert code == 2 and "measured other weights" in error_line(output)


def test_tune_card_counts_as_generated(hub: FakeHub, folder: Path) -> None:
    (folder / "README.md").write_text("---\nlibrary_name: ucgm-convert\n---\n# X tuned\n\n"
                                      "Few-step generator made by `ucgm tune --from repa-e` from `x`.\n")
    assert cli("push", str(folder), "--repo", "alice/x", "--dry-run")[0] == 0
    assert CARD_MARKER in (folder / "README.md").read_text()
