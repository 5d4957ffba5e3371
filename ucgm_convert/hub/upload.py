"""`ucgm push`: validate a checkpoint folder, write its model card, upload it to the Hub in ONE commit.

`uc.load("user/name")` reads it back through huggingface_hub's cache (offline too, once cached).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from pydantic import Field

from .._version import __version__
from ..checkpoint import CARD_NAME, CONFIG_NAME, RECIPE_NAME, RESULTS_NAME, VAE_WEIGHTS_NAME, WEIGHTS_NAME
from ..errors import UCGMError
from ..foundation import one_line
from ..settings.base import Bool, Settings
from .card import (
    LIBRARY_NAME,
    CardPolicy,
    card_needs_writing,
    inspect_checkpoint,
    make_model_card,
    validate_repo_id,
    write_model_card,
)

# Files of our format that a push uploads; anything else in the folder stays local.
UPLOAD_FILES = (WEIGHTS_NAME, VAE_WEIGHTS_NAME, CONFIG_NAME, RECIPE_NAME, RESULTS_NAME, CARD_NAME)


class PushConfig(Settings):
    """What `ucgm push` needs; `push_to_hub(**config.arguments())` does it."""

    folder: Path = Field(description="Checkpoint folder in the ucgm-convert format (model.safetensors + "
                         "config.json), as `ucgm tune` / `ucgm convert` write it.")
    repo: str = Field(description="Hub model repo id USER/NAME (created if missing).")
    private: Bool = Field(default=False, description="Create the repo private (an existing repo keeps its "
                          "visibility).")
    token: str | None = Field(default=None, description="Hub token with write access. Default: $HF_TOKEN, else "
                              "the `hf auth login` token.")
    base_model: str | None = Field(default=None, description="Hub id of the source model (card metadata "
                                   "base_model). Default: config.json's, if recorded.")
    license: str | None = Field(default=None, description="Hub license id for the card (e.g. mit, "
                                "cc-by-nc-sa-4.0). Default: the source family's.")
    overwrite_card: Bool = Field(default=False, description="Replace a hand-written README.md with the "
                                 "generated card.")
    keep_card: Bool = Field(default=False, description="Upload an existing README.md unchanged.")
    results: list[Path] = Field(default_factory=list, description="More results.json files (e.g. from `ucgm eval "
                                "fid --out ELSEWHERE`) for the card; repeatable. FOLDER/results.json is always used.")
    message: str | None = Field(default=None, description="Commit message.")
    dry_run: Bool = Field(default=False, description="Validate and write README.md only; upload nothing (no token "
                          "needed).")

    def arguments(self) -> dict[str, object]:
        """Keyword arguments of `push_to_hub`."""
        if self.overwrite_card and self.keep_card:
            raise UCGMError("--overwrite-card and --keep-card exclude each other")
        policy = "overwrite" if self.overwrite_card else "keep" if self.keep_card else "auto"
        return {"folder": self.folder, "repo_id": self.repo, "token": self.token, "private": self.private,
                "base_model": self.base_model, "license": self.license, "card": policy,
                "commit_message": self.message, "dry_run": self.dry_run, "results": tuple(self.results)}




@dataclass
class PushResult:
    repo_id: str
    repo_url: str | None
    commit_url: str | None
    commit_oid: str | None
    files: list[str]
    deleted: list[str]
    card_path: Path
    card_written: bool


def resolve_token(token: str | None) -> str:
    """`token`, else HF_TOKEN, else the cached `hf auth login` token; UCGMError if none."""
    if token is not None and token.strip():
        return token.strip()
    found = get_token()
    if not found:
        raise UCGMError("no Hugging Face token: pass --token hf_..., set the HF_TOKEN environment variable, or run "
                        "`hf auth login` once (a token with write access: https://huggingface.co/settings/tokens)")
    return found


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    card: CardPolicy = "auto",
    commit_message: str | None = None,
    dry_run: bool = False,
    results: list[str | Path] | tuple[str | Path, ...] = (),
) -> PushResult:
    """Validate `folder`, write its model card, and upload it to `repo_id` in one commit.

    Creates the repo if needed (`private` applies to a new repo only). Uploads the files of our
    format present in the folder (UPLOAD_FILES) and deletes those files from the repo that the
    folder no longer has (e.g. a stale vae.safetensors), in the same commit. `dry_run` writes
    the card and uploads nothing (no token needed). `results`: more results files for the
    card (FOLDER/results.json is always used and uploaded; these are only summarised).
    """
    repo_id = validate_repo_id(repo_id)
    if base_model is not None:
        base_model = validate_repo_id(base_model, flag="--base-model")
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise UCGMError(f"--license {license!r}: expected a Hub license id such as mit, apache-2.0, "
                        "cc-by-nc-sa-4.0 or other")
    if card not in ("auto", "overwrite", "keep"):
        raise UCGMError(f"card policy must be 'auto', 'overwrite' or 'keep', got {card!r}")
    info = inspect_checkpoint(folder, results)
    path = info.path
    card_path = path / CARD_NAME
    card_needs_writing(card_path, card)  # a hand-written card conflict fails before anything happens
    files = [name for name in UPLOAD_FILES if (path / name).is_file() or name == CARD_NAME]
    if dry_run:
        written = write_model_card(path, make_model_card(info, repo_id, base_model, license), card)
        return PushResult(repo_id, None, None, None, files, [], card_path, written)
    token = resolve_token(token)
    model_card = make_model_card(info, repo_id, base_model, license)
    written = write_model_card(path, model_card, card)
    return _upload(path, repo_id, files, token=token, private=private, card_path=card_path, written=written,
                   commit_message=commit_message or f"Upload {info.config.arch} ({info.source_family}) with ucgm push")


def _upload(path: Path, repo_id: str, files: list[str], *, token: str, private: bool, card_path: Path,
            written: bool, commit_message: str) -> PushResult:
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        remote = set(api.list_repo_files(repo_id, repo_type="model"))
        deleted = [name for name in UPLOAD_FILES if name in remote and name not in files]
        operations = [CommitOperationDelete(path_in_repo=name) for name in deleted]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path / name)) for name in files]
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    except OfflineModeIsEnabled:
        raise UCGMError("cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hub)") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise UCGMError(f"{repo_id}: the Hub rejected the token (401 Unauthorized); check it is valid "
                            "and has write access") from None
        if status == 403:
            raise UCGMError(f"{repo_id}: the token may not write to this repo (403 Forbidden): "
                            f"{one_line(err)}") from None
        raise UCGMError(f"{repo_id}: Hugging Face Hub error: {one_line(err)}") from None
    except ValueError as err:  # e.g. the Hub's YAML validation of README.md (huggingface_hub raises ValueError)
        raise UCGMError(f"{repo_id}: the Hub refused the upload: {one_line(err)}") from None
    except (httpx2.TransportError, OSError) as err:
        raise UCGMError(f"{repo_id}: cannot reach the Hugging Face Hub ({one_line(err)})") from None
    return PushResult(repo_id, str(repo_url), commit.commit_url, commit.oid, files, deleted, card_path, written)
