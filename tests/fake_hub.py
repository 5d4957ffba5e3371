"""A fake Hugging Face Hub at the HTTP boundary, for tests (the Hub cannot be reached here).

LFS uploads: with hf_xet installed, huggingface_hub uploads LFS files through the Xet protocol,
whose transfers run in hf_xet's own (Rust) HTTP stack, out of reach of an httpx transport. Tests
therefore either set huggingface_hub's documented switch HF_HUB_DISABLE_XET (classic LFS: batch
API + PUT, faked here) or run the fake with `lfs=False` (every file "regular", inline in the
commit), which exercises the default configuration.

`FakeHub` answers the few Hub endpoints huggingface_hub calls for create_repo, list_repo_files,
create_commit (preupload, validate-yaml, LFS batch + PUT, ndjson commit), repo_info and file
downloads (resolve), keeping repos as in-memory commits. It is plugged in through
huggingface_hub's own client factory hook (`set_client_factory`) with an httpx2 MockTransport,
so every line of ucgm-convert and of huggingface_hub runs for real; only the network is fake.
huggingface_hub's request hook is kept (offline mode, request ids).

`populate_cache(...)` writes a repo's commit into a Hugging Face cache folder in the layout
huggingface_hub uses (models--USER--NAME/{blobs, refs/main, snapshots/<commit>/...}).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx2
import yaml
from huggingface_hub.utils import _http as hf_http

LFS_HOST = "https://fake-lfs.example"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".npz")  # the Hub's default .gitattributes marks these LFS
# A few of the license ids the Hub accepts in card metadata (it rejects others in validate-yaml).
HUB_LICENSES = {"apache-2.0", "mit", "cc-by-nc-sa-4.0", "cc-by-nc-4.0", "cc-by-4.0", "openrail", "other"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git blob id (sha1 of 'blob <size>\\0' + data), the ETag of a regular file on the Hub."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    lfs_paths: set[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]


class FakeHub:
    """In-memory Hub; `tokens` maps valid tokens to user names (a user may write its namespace)."""

    def __init__(self, tokens: dict[str, str] | None = None, lfs: bool = True) -> None:
        self.lfs = lfs  # False: preupload says "regular" for every file (content inline in the commit)
        self.tokens = dict(tokens or {"hf_test_token": "alice"})
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []

    # -- plumbing ---------------------------------------------------------------------------
    def client(self) -> httpx2.Client:
        """What huggingface_hub's default factory builds, with the fake transport."""
        return httpx2.Client(transport=httpx2.MockTransport(self.handle),
                             event_hooks={"request": [hf_http.hf_request_event_hook]},
                             follow_redirects=True, timeout=None)

    def install(self) -> None:
        hf_http.set_client_factory(self.client)

    @staticmethod
    def uninstall() -> None:
        hf_http.set_client_factory(hf_http.default_client_factory)

    @property
    def commit_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] == "POST" and "/commit/" in r[1]]

    # -- routing ----------------------------------------------------------------------------
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, str(request.url)))
        if str(request.url).startswith(LFS_HOST):
            return self._lfs_put(request, path)
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)", self._repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self._repo_info),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and request.method == method:
                return fn(request, **{k: v for k, v in m.groupdict().items() if v is not None})
        return _error(404, f"fake hub: no route for {request.method} {path}")

    # -- auth -------------------------------------------------------------------------------
    def _user(self, request: httpx2.Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _readable(self, request: httpx2.Request, repo_id: str) -> Repo | httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self._user(request) != repo_id.split("/")[0]):
            return _error(404, "Repository not found", code="RepoNotFound")
        return repo

    def _writable(self, request: httpx2.Request, repo_id: str) -> Repo | httpx2.Response:
        user = self._user(request)
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if repo is None:
            return _error(404, "Repository not found", code="RepoNotFound")
        if repo_id.split("/")[0] != user:
            return _error(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- endpoints --------------------------------------------------------------------------
    def _create_repo(self, request: httpx2.Request) -> httpx2.Response:
        user = self._user(request)
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        body = json.loads(request.content)
        repo_id = f"{body.get('organization') or user}/{body['name']}"
        if repo_id.split("/")[0] != user:
            return _error(403, f"You don't have the rights to create a model under {repo_id.split('/')[0]}")
        url = f"https://huggingface.co/{repo_id}"
        if repo_id in self.repos:
            return _error(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.commits.append(Commit(_oid("initial", repo_id), "initial commit",
                                   {".gitattributes": GITATTRIBUTES}, set()))
        self.repos[repo_id] = repo
        return httpx2.Response(200, json={"url": url, "name": repo_id, "id": "fake"})

    def _validate_yaml(self, request: httpx2.Request) -> httpx2.Response:
        content = json.loads(request.content)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1) if match else "") or {}
        except yaml.YAMLError as err:
            return httpx2.Response(400, json={"errors": [{"message": str(err)}], "warnings": []})
        if "license" in meta and meta["license"] not in HUB_LICENSES:
            return httpx2.Response(400, json={"errors": [{"message": f'"license" must be one of [{", ".join(sorted(HUB_LICENSES))}, ...]'}], "warnings": []})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _preupload(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._writable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        files = json.loads(request.content)["files"]
        return httpx2.Response(200, json={"files": [
            {"path": f["path"], "uploadMode": "lfs" if self.lfs and f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False, "oid": None} for f in files]})

    def _lfs_batch(self, request: httpx2.Request, repo: str) -> httpx2.Response:
        found = self._writable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        body = json.loads(request.content)
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{LFS_HOST}/upload/{obj['oid']}"}}
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def _lfs_put(self, request: httpx2.Request, path: str) -> httpx2.Response:
        oid = path.rsplit("/", 1)[-1]
        data = request.read()
        if request.method != "PUT" or hashlib.sha256(data).hexdigest() != oid:
            return _error(400, "LFS upload: content does not match its oid")
        self.lfs_objects[oid] = data
        return httpx2.Response(200)

    def _commit(self, request: httpx2.Request, repo: str, rev: str) -> httpx2.Response:
        found = self._writable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        if rev != "main":
            return _error(400, f"fake hub: only main is supported, got {rev}")
        files = dict(found.head.files)
        lfs_paths = set(found.head.lfs_paths)
        message = ""
        for line in request.content.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return _error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.lfs_objects[value["oid"]]
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return _error(400, f"cannot delete {value['path']}: no such file")
                del files[value["path"]]
                lfs_paths.discard(value["path"])
            else:
                return _error(400, f"fake hub: unsupported commit operation {key}")
        oid = _oid(message, repo, len(found.commits), *sorted(files))
        found.commits.append(Commit(oid, message, files, lfs_paths))
        return httpx2.Response(200, json={"success": True, "commitOid": oid,
                                          "commitUrl": f"https://huggingface.co/{repo}/commit/{oid}"})

    def _commit_at(self, repo: Repo, rev: str) -> Commit | None:
        if rev == "main":
            return repo.head
        return next((c for c in repo.commits if c.oid == rev), None)

    def _tree(self, request: httpx2.Request, repo: str, rev: str, sub: str = "") -> httpx2.Response:
        found = self._readable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        commit = self._commit_at(found, rev)
        if commit is None:
            return _error(404, "Revision not found", code="RevisionNotFound")
        entries = []
        for path, data in sorted(commit.files.items()):
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
            if path in commit.lfs_paths:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return httpx2.Response(200, json=entries)

    def _repo_info(self, request: httpx2.Request, repo: str, rev: str = "main") -> httpx2.Response:
        found = self._readable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        commit = self._commit_at(found, rev)
        if commit is None:
            return _error(404, "Revision not found", code="RevisionNotFound")
        return httpx2.Response(200, json={
            "id": repo, "modelId": repo, "sha": commit.oid, "private": found.private,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _resolve(self, request: httpx2.Request, repo: str, rev: str, file: str) -> httpx2.Response:
        found = self._readable(request, repo)
        if isinstance(found, httpx2.Response):
            return found
        commit = self._commit_at(found, rev)
        if commit is None:
            return _error(404, "Revision not found", code="RevisionNotFound")
        if file not in commit.files:
            return _error(404, "Entry not found", code="EntryNotFound")
        data = commit.files[file]
        headers = {"X-Repo-Commit": commit.oid, "Content-Length": str(len(data))}
        if file in commit.lfs_paths:
            headers |= {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        else:
            headers["ETag"] = f'"{git_blob_oid(data)}"'
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)


def _oid(*parts: Any) -> str:
    return hashlib.sha1("\0".join(map(str, parts)).encode()).hexdigest()


def _error(status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None) -> httpx2.Response:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return httpx2.Response(status, headers=headers, json={"error": message, **(extra or {})})


def populate_cache(cache_dir: str | Path, repo_id: str, commit_oid: str, files: dict[str, bytes],
                   lfs_paths: set[str] = frozenset()) -> Path:
    """Write `files` as the snapshot of `repo_id` at `commit_oid` (refs/main) in a Hub cache folder.

    The layout is huggingface_hub's: blobs named by ETag (sha256 for LFS files, git blob id
    otherwise), snapshots/<commit>/<path> as relative symlinks into blobs, refs/main = commit.
    """
    storage = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    snapshot = storage / "snapshots" / commit_oid
    for path, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if path in lfs_paths else git_blob_oid(data)
        blob = storage / "blobs" / etag
        blob.write_bytes(data)
        target = snapshot / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, target.parent), target)
    (storage / "refs" / "main").write_text(commit_oid)
    return snapshot
