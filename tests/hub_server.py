"""A loopback Hugging Face Hub for tests.

`HubServer` implements, on 127.0.0.1, the part of the Hub HTTP API that `huggingface_hub` (2.x) uses to create
repos, commit files (inline "regular" uploads and the Git LFS batch + PUT path), list and describe repos, and
download files (``/resolve`` with the ``X-Repo-Commit`` / ``ETag`` / ``X-Linked-*`` headers). LFS objects are
served by a second loopback server on another port, like the Hub's CDN: the client then treats it as a foreign
host (no auth forwarded, metadata read from the redirect response).

`hub_env` points an already imported `huggingface_hub` (and `transformers`, `datasets`) at the server: the client
reads ``HF_ENDPOINT`` and friends into module constants at import time, so setting environment variables alone is
not enough. Xet is disabled inside `hub_env` so that uploads go through the plain LFS protocol.

Example::

    with start_hub_server(tmp_path / "hub") as hub, hub_env(hub.endpoint, tmp_path / "cache", token="hf_x"):
        HfApi().create_repo("me/model")
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_USERNAME = "test-user"
#: Files at least this large are stored with LFS (the real Hub uses 10 MB).
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
#: Suffixes tracked by LFS in the default `.gitattributes` of a new Hub repo.
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COMMIT_RE = re.compile(r"[0-9a-f]{7,40}")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = r"^/api/(?P<type>models|datasets|spaces)/" + _REPO


def _now() -> str:
    """Current UTC time in the Hub's ISO format."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """Git SHA-1 of a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the Git LFS pointer file of an object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An HTTP error answered by the server, with the Hub's ``X-Error-Code`` when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.payload = payload or {}
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


@dataclass
class RecordedRequest:
    """One request seen by the server (hub or CDN)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    token: str | None
    server: str
    status: int = 0


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    files: dict[str, dict[str, Any]]  # path -> {"sha256", "size", "lfs", "oid"}


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "branches": self.branches,
            "commits": {oid: vars(commit) for oid, commit in self.commits.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Repo:
        commits = {oid: _Commit(**commit) for oid, commit in data.pop("commits").items()}
        return cls(**data, commits=commits)


class HubStorage:
    """Repos, commits and content-addressed objects, persisted as JSON + blobs under ``root``."""

    def __init__(self, root: Path, lfs_threshold: int = DEFAULT_LFS_THRESHOLD) -> None:
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.repos_dir = self.root / "repos"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.lock = threading.RLock()
        self._counter = 0
        self.repos: dict[tuple[str, str], _Repo] = {}
        for path in self.repos_dir.glob("*/*/*.json"):
            repo = _Repo.from_json(json.loads(path.read_text(encoding="utf-8")))
            self.repos[(repo.repo_type, repo.repo_id)] = repo

    # -- objects
    def object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    def has_object(self, sha256: str) -> bool:
        return bool(_SHA256_RE.fullmatch(sha256)) and self.object_path(sha256).is_file()

    def put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            tmp = path.with_name(f"{sha}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    # -- repos
    def _repo_file(self, repo: _Repo) -> Path:
        return self.repos_dir / f"{repo.repo_type}s" / f"{repo.repo_id}.json"

    def save(self, repo: _Repo) -> None:
        path = self._repo_file(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(repo.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def get(self, repo_type: str, repo_id: str) -> _Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            self.commit(
                repo,
                "main",
                [("file", {"path": ".gitattributes", "content": GITATTRIBUTES.encode()})],
                title="initial commit",
                author=author,
                create_branch=True,
            )
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            repo = self.repos.pop((repo_type, repo_id), None)
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            self._repo_file(repo).unlink(missing_ok=True)

    def resolve(self, repo: _Repo, revision: str) -> str:
        """Commit oid of a branch name, a full sha or a (>= 7 chars) sha prefix."""
        with self.lock:
            if revision in repo.branches:
                return repo.branches[revision]
            if _COMMIT_RE.fullmatch(revision):
                matches = [oid for oid in repo.commits if oid.startswith(revision)]
                if len(matches) == 1:
                    return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """The upload mode the Hub would pick: LFS for tracked suffixes, large or binary files."""
        if size == 0:
            return False
        return path.lower().endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in sample

    def commit(
        self,
        repo: _Repo,
        branch: str,
        operations: list[tuple[str, dict[str, Any]]],
        *,
        title: str,
        message: str = "",
        author: str = DEFAULT_USERNAME,
        parent_commit: str | None = None,
        create_branch: bool = False,
    ) -> str:
        """Apply ``(key, value)`` operations of the ndjson commit payload to ``branch`` and return the new oid."""
        with self.lock:
            if branch not in repo.branches and not create_branch:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches.get(branch)
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412, f"A commit has happened since. Please refresh and try again. (head is {head})"
                )
            files = dict(repo.commits[head].files) if head else {}
            for key, value in operations:
                path = str(value.get("path", "")).strip("/")
                if key == "file":
                    data = value["content"]
                    if isinstance(data, str):
                        data = base64.b64decode(data) if value.get("encoding") == "base64" else data.encode()
                    sha = self.put_object(data)
                    files[path] = {"sha256": sha, "size": len(data), "lfs": False, "oid": _git_blob_oid(data)}
                elif key == "lfsFile":
                    sha = str(value.get("oid", ""))
                    if not self.has_object(sha):
                        raise HubError(422, f"LFS object {sha} for '{path}' was not uploaded")
                    size = self.object_path(sha).stat().st_size
                    pointer = _lfs_pointer(sha, size)
                    files[path] = {"sha256": sha, "size": size, "lfs": True, "oid": _git_blob_oid(pointer)}
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation '{key}'")
            self._counter += 1
            date = _now()
            seed = json.dumps(
                [head, files, title, message, date, self._counter, time.time_ns()], sort_keys=True
            )
            oid = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[oid] = _Commit(oid, head, title, message, date, author, files)
            repo.branches[branch] = oid
            self.save(repo)
            return oid


class _Handler(BaseHTTPRequestHandler):
    """Request handler shared by the hub and the CDN server (``self.server.role``)."""

    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _LoopbackHTTPServer

    # -- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.server.role, format % args)

    def _hub(self) -> HubServer:
        return self.server.hub

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return auth[7:].strip() or None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        length: int | None = None,
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self) -> None:
        self._status = 0
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        hub = self._hub()
        token = self._token()
        record = RecordedRequest(
            method=self.command,
            path=split.path,
            query=query,
            headers=dict(self.headers.items()),
            token=token,
            server=self.server.role,
        )
        try:
            body = self._read_body() if self.command in ("POST", "PUT", "DELETE", "PATCH") else b""
            self._route(split.path, query, body, token)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            self._json(err.status, {"error": err.message, **err.payload}, headers)
        except Exception as err:  # keep the server alive, report as a 500
            logger.exception("loopback hub: error while handling %s %s", self.command, self.path)
            self._json(500, {"error": f"{type(err).__name__}: {err}"})
        finally:
            record.status = self._status
            hub._record(record)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing
    def _route(self, path: str, query: dict[str, list[str]], body: bytes, token: str | None) -> None:
        hub = self._hub()
        method = self.command
        if self.server.role == "cdn":
            m = re.fullmatch(r"/_cdn/(?P<oid>[0-9a-f]{64})", path)
            if m and method in ("GET", "HEAD"):
                return self._serve_object(m["oid"], {})
            raise HubError(404, "Not found")

        if method == "GET" and path == "/api/whoami-v2":
            hub._check_token(token, required=True)
            return self._json(200, hub._whoami())
        if method == "GET" and path == "/api/agent-harnesses":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(body, token)
        if method == "DELETE" and path == "/api/repos/delete":
            return self._delete_repo(body, token)
        if method == "PUT" and (m := re.fullmatch(r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", path)):
            return self._lfs_put(m["oid"], body)
        if method == "POST" and path == "/_lfs/verify":
            return self._lfs_verify(body)

        m = re.fullmatch(
            r"/(?:(?P<prefix>datasets|spaces)/)?" + _REPO + r"\.git/info/lfs/objects/batch", path
        )
        if m and method == "POST":
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(m["prefix"] or "", "model")
            return self._lfs_batch(repo_type, unquote(m["repo"]), body, token)

        m = re.fullmatch(
            r"/(?:(?P<prefix>datasets|spaces)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path
        )
        if m and method in ("GET", "HEAD"):
            repo_type = {"datasets": "dataset", "spaces": "space"}.get(m["prefix"] or "", "model")
            return self._resolve(repo_type, unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), token)

        m = re.fullmatch(_API + r"(?:/revision/(?P<rev>[^/]+))?", path)
        if m and method == "GET":
            rev = unquote(m["rev"]) if m["rev"] else "main"
            return self._repo_info(REPO_TYPES[m["type"]], unquote(m["repo"]), rev, query, token)
        m = re.fullmatch(
            _API + r"/(?P<op>tree|paths-info|preupload|commit|commits)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path
        )
        if m:
            repo_type, repo_id, rev, op = (
                REPO_TYPES[m["type"]],
                unquote(m["repo"]),
                unquote(m["rev"]),
                m["op"],
            )
            if op == "tree" and method == "GET":
                return self._tree(repo_type, repo_id, rev, unquote(m["sub"] or ""), query, token)
            if op == "paths-info" and method == "POST" and not m["sub"]:
                return self._paths_info(repo_type, repo_id, rev, body, token)
            if op == "preupload" and method == "POST" and not m["sub"]:
                return self._preupload(repo_type, repo_id, rev, body, token)
            if op == "commit" and method == "POST" and not m["sub"]:
                return self._commit(repo_type, repo_id, rev, query, body, token)
            if op == "commits" and method == "GET" and not m["sub"]:
                return self._commits(repo_type, repo_id, rev, token)
        m = re.fullmatch(_API + r"/refs", path)
        if m and method == "GET":
            return self._refs(REPO_TYPES[m["type"]], unquote(m["repo"]), token)
        m = re.fullmatch(_API + r"/branch/(?P<branch>[^/]+)", path)
        if m and method == "POST":
            return self._create_branch(
                REPO_TYPES[m["type"]], unquote(m["repo"]), unquote(m["branch"]), body, token
            )
        raise HubError(404, f"Not implemented by the loopback hub: {method} {path}")

    # -- repo endpoints
    def _create_repo(self, body: bytes, token: str | None) -> None:
        hub = self._hub()
        hub._check_token(token, required=True)
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        namespace = payload.get("organization") or hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo_id = f"{namespace}/{name}"
        url = f"{hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        try:
            hub.storage.create_repo(repo_type, repo_id, private=private, author=hub.username)
        except HubError as err:
            err.payload["url"] = url  # the Hub answers the existing repo's url with its 409
            raise
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes, token: str | None) -> None:
        hub = self._hub()
        hub._check_token(token, required=True)
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or hub.username
        hub.storage.delete_repo(payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
        self._json(200, {})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            import yaml

            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
            if meta is not None and not isinstance(meta, dict):
                return self._json(
                    400, {"errors": [{"message": "Metadata must be a mapping"}], "warnings": []}
                )
        self._json(200, {"errors": [], "warnings": []})

    def _repo_info(
        self, repo_type: str, repo_id: str, rev: str, query: dict[str, list[str]], token: str | None
    ) -> None:
        hub = self._hub()
        repo = hub._read_repo(repo_type, repo_id, token)
        oid = hub.storage.resolve(repo, rev)
        commit = repo.commits[oid]
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    sibling["lfs"] = {
                        "sha256": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(entry["size"] for entry in commit.files.values()),
        }
        card = hub._card_data(commit)
        if card:
            info["cardData"] = card
            info["tags"] = list(card.get("tags") or [])
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
        self._json(200, info)

    def _refs(self, repo_type: str, repo_id: str, token: str | None) -> None:
        repo = self._hub()._read_repo(repo_type, repo_id, token)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in repo.branches.items()
        ]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def _create_branch(
        self, repo_type: str, repo_id: str, branch: str, body: bytes, token: str | None
    ) -> None:
        """A new branch at ``startingPoint`` (default: main's head); 409 when it exists."""
        hub = self._hub()
        repo = hub._write_repo(repo_type, repo_id, token)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with hub.storage.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = hub.storage.resolve(repo, start)
            hub.storage.save(repo)
        self._json(200, {})

    def _commits(self, repo_type: str, repo_id: str, rev: str, token: str | None) -> None:
        hub = self._hub()
        repo = hub._read_repo(repo_type, repo_id, token)
        oid: str | None = hub.storage.resolve(repo, rev)
        history = []
        while oid is not None:
            commit = repo.commits[oid]
            history.append(
                {
                    "id": oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": commit.author}],
                }
            )
            oid = commit.parent
        self._json(200, history)

    def _tree_entries(self, repo: _Repo, oid: str, expand: bool) -> dict[str, dict[str, Any]]:
        """All files and folders of a commit, as Hub tree entries keyed by path."""
        files = repo.commits[oid].files
        entries: dict[str, dict[str, Any]] = {}
        children: dict[str, list[str]] = {}
        for path, entry in files.items():
            item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
            if expand:
                item["lastCommit"] = self._last_commit(repo, oid, path)
            entries[path] = item
            parts = path.split("/")
            for i in range(1, len(parts)):
                children.setdefault("/".join(parts[:i]), []).append(entry["oid"])
        for folder, oids in children.items():
            tree_oid = hashlib.sha1(("tree" + "".join(sorted(oids))).encode()).hexdigest()
            entries[folder] = {"type": "directory", "oid": tree_oid, "size": 0, "path": folder}
        return entries

    @staticmethod
    def _last_commit(repo: _Repo, oid: str, path: str) -> dict[str, str]:
        commit = repo.commits[oid]
        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if parent.files.get(path) != commit.files.get(path):
                break
            commit = parent
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _tree(
        self, repo_type: str, repo_id: str, rev: str, sub: str, query: dict[str, list[str]], token: str | None
    ) -> None:
        hub = self._hub()
        repo = hub._read_repo(repo_type, repo_id, token)
        oid = hub.storage.resolve(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = self._tree_entries(repo, oid, expand)
        sub = sub.strip("/")
        if sub and entries.get(sub, {}).get("type") != "directory":
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": oid})
        prefix = f"{sub}/" if sub else ""
        listing = [
            entry
            for path, entry in sorted(entries.items())
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
        ]
        self._json(200, listing, {"X-Repo-Commit": oid})

    def _paths_info(self, repo_type: str, repo_id: str, rev: str, body: bytes, token: str | None) -> None:
        hub = self._hub()
        repo = hub._read_repo(repo_type, repo_id, token)
        oid = hub.storage.resolve(repo, rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = self._tree_entries(repo, oid, expand)
        self._json(200, [entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    # -- upload endpoints
    def _preupload(self, repo_type: str, repo_id: str, rev: str, body: bytes, token: str | None) -> None:
        hub = self._hub()
        repo = hub._write_repo(repo_type, repo_id, token)
        oid = hub.storage.resolve(repo, rev)
        files = repo.commits[oid].files
        answer = []
        for item in json.loads(body or b"{}").get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample", ""))
            lfs = hub.storage.is_lfs(path, int(item.get("size", 0)), sample)
            remote = files.get(path)
            remote_oid = None
            if remote is not None:
                remote_oid = remote["sha256"] if remote["lfs"] else remote["oid"]
            answer.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid,
                }
            )
        self._json(200, {"files": answer, "commitOid": oid})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes, token: str | None) -> None:
        hub = self._hub()
        payload = json.loads(body or b"{}")
        operation = payload.get("operation", "upload")
        if operation == "upload":
            hub._write_repo(repo_type, repo_id, token)
        else:
            hub._read_repo(repo_type, repo_id, token)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", 0))
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            stored = hub.storage.has_object(oid)
            if operation == "upload" and not stored:
                item["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/_lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{hub.endpoint}/_lfs/verify", "header": {}},
                }
            elif operation == "download":
                if stored:
                    item["actions"] = {"download": {"href": f"{hub.cdn_endpoint}/_cdn/{oid}", "header": {}}}
                else:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(item)
        body_out = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        self._send(200, body_out, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        sha = hashlib.sha256(body).hexdigest()
        if sha != oid:
            raise HubError(400, f"sha256 mismatch: expected {oid}, got {sha}")
        self._hub().storage.put_object(body)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        storage = self._hub().storage
        oid = str(payload.get("oid", ""))
        if not storage.has_object(oid) or storage.object_path(oid).stat().st_size != int(
            payload.get("size", -1)
        ):
            raise HubError(404, f"Object {oid} not found or wrong size")
        self._json(200, {"oid": oid})

    def _commit(
        self,
        repo_type: str,
        repo_id: str,
        rev: str,
        query: dict[str, list[str]],
        body: bytes,
        token: str | None,
    ) -> None:
        hub = self._hub()
        repo = hub._write_repo(repo_type, repo_id, token)
        if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
            raise HubError(400, "Pull requests are not supported by the loopback hub")
        header: dict[str, Any] = {}
        operations = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("key") == "header":
                header = item.get("value", {})
            else:
                operations.append((item.get("key"), item.get("value", {})))
        _check_card_metadata(operations)
        oid = hub.storage.commit(
            repo,
            rev,
            operations,
            title=header.get("summary", ""),
            message=header.get("description", ""),
            author=hub.username,
            parent_commit=header.get("parentCommit"),
        )
        url = f"{hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{oid}"
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

    # -- downloads
    def _resolve(self, repo_type: str, repo_id: str, rev: str, filename: str, token: str | None) -> None:
        hub = self._hub()
        repo = hub._read_repo(repo_type, repo_id, token)
        oid = hub.storage.resolve(repo, rev)
        entry = repo.commits[oid].files.get(filename)
        if entry is None:
            raise HubError(
                404, f"{filename} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": oid}
            )
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry["oid"]}"'}
        if entry["lfs"]:
            headers.update(
                {
                    "Location": f"{hub.cdn_endpoint}/_cdn/{entry['sha256']}",
                    "X-Linked-Etag": f'"{entry["sha256"]}"',
                    "X-Linked-Size": str(entry["size"]),
                }
            )
            return self._send(302, b"", headers, content_type="text/plain")
        self._serve_object(entry["sha256"], headers, filename=filename)

    def _serve_object(self, sha256: str, headers: dict[str, str], filename: str = "") -> None:
        storage = self._hub().storage
        if not storage.has_object(sha256):
            raise HubError(404, "Object not found")
        data = storage.object_path(sha256).read_bytes()
        headers = {"Accept-Ranges": "bytes", **headers}
        if "ETag" not in headers:
            headers["ETag"] = f'"{sha256}"'
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        range_header = self.headers.get("Range")
        if range_header:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if m is None or (not m[1] and not m[2]):
                raise HubError(416, f"Unsupported range {range_header}")
            total = len(data)
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else total - 1, total - 1)
            else:
                start, end = max(total - int(m[2]), 0), total - 1
            if start >= total or start > end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            return self._send(206, data[start : end + 1], headers, content_type=content_type)
        self._send(200, data, headers, content_type=content_type)


def _check_card_metadata(operations: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse a commit whose README.md metadata names a ``base_model`` that is no repo id, as the Hub does ("Error:
    \"base_model\" ... is not valid. Use a model id from https://hf.co/models")."""
    for key, value in operations:
        if key != "file" or value.get("path") != "README.md":
            continue
        data = value.get("content", b"")
        if isinstance(data, str):
            data = base64.b64decode(data) if value.get("encoding") == "base64" else data.encode()
        text = data.decode("utf-8", "replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        if not match:
            continue
        import yaml

        meta = yaml.safe_load(match.group(1)) or {}
        bases = meta.get("base_model", []) if isinstance(meta, dict) else []
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):
                raise HubError(
                    400,
                    f'Error: "base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models',
                )


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, hub: HubServer, role: str, host: str) -> None:
        self.hub = hub
        self.role = role
        super().__init__((host, 0), _Handler)


class HubServer:
    """A loopback Hugging Face Hub storing its repos under ``root``.

    Use it as a context manager (or `start` / `stop`). ``endpoint`` is the value for ``HF_ENDPOINT``.
    Any bearer token is accepted unless ``tokens`` restricts them; write operations and private repos need one.
    Every request is recorded in `requests` (hub and CDN alike).
    """

    def __init__(
        self,
        root: Path,
        *,
        username: str = DEFAULT_USERNAME,
        tokens: Iterable[str] | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root)
        self.username = username
        self.valid_tokens = set(tokens) if tokens is not None else None
        self.host = host
        self.storage = HubStorage(self.root, lfs_threshold=lfs_threshold)
        self._requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()
        self._servers: list[_LoopbackHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle
    @property
    def running(self) -> bool:
        return bool(self._servers)

    def start(self) -> HubServer:
        """Start the hub and CDN servers in daemon threads (idempotent)."""
        if self.running:
            return self
        for role in ("hub", "cdn"):
            server = _LoopbackHTTPServer(self, role, self.host)
            thread = threading.Thread(target=server.serve_forever, name=f"loopback-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        logger.info("loopback hub on %s (cdn %s), storage %s", self.endpoint, self.cdn_endpoint, self.root)
        return self

    def stop(self) -> None:
        """Shut both servers down."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _url(self, index: int) -> str:
        if not self.running:
            raise RuntimeError("HubServer is not running")
        host, port = self._servers[index].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def endpoint(self) -> str:
        """Base URL of the hub, e.g. ``http://127.0.0.1:PORT``."""
        return self._url(0)

    @property
    def cdn_endpoint(self) -> str:
        """Base URL of the server that hosts LFS objects (a different origin than `endpoint`)."""
        return self._url(1)

    # -- recorded traffic
    def _record(self, request: RecordedRequest) -> None:
        with self._requests_lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of all requests seen so far, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    @property
    def tokens_seen(self) -> list[str]:
        """Bearer tokens sent so far (in request order, with repeats)."""
        return [r.token for r in self.requests if r.token is not None]

    def clear_requests(self) -> None:
        with self._requests_lock:
            self._requests.clear()

    # -- inspection helpers for tests
    def head(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> str:
        """Commit oid that ``branch`` points to."""
        repo = self.storage.get(repo_type, repo_id)
        if repo is None or branch not in repo.branches:
            raise KeyError(f"{repo_type} {repo_id}@{branch}")
        return repo.branches[branch]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file of a repo at ``revision``."""
        repo = self.storage.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"{repo_type} {repo_id}")
        commit = repo.commits[self.storage.resolve(repo, revision)]
        return {p: self.storage.object_path(e["sha256"]).read_bytes() for p, e in commit.files.items()}

    def is_lfs_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        """Whether ``path`` was committed through LFS."""
        repo = self.storage.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"{repo_type} {repo_id}")
        return bool(repo.commits[self.storage.resolve(repo, revision)].files[path]["lfs"])

    # -- access control
    def _check_token(self, token: str | None, required: bool) -> None:
        if token is None:
            if required:
                raise HubError(401, "Invalid username or password.")
            return
        if self.valid_tokens is not None and token not in self.valid_tokens:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _read_repo(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        self._check_token(token, required=False)
        repo = self.storage.get(repo_type, repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and token is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _write_repo(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        self._check_token(token, required=True)
        return self._read_repo(repo_type, repo_id, token)

    def _whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "id": hashlib.sha1(self.username.encode()).hexdigest()[:24],
            "name": self.username,
            "fullname": self.username,
            "email": None,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
        }

    def _card_data(self, commit: _Commit) -> dict[str, Any] | None:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        text = self.storage.object_path(entry["sha256"]).read_text(encoding="utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        if not match:
            return None
        import yaml

        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            return None
        return meta if isinstance(meta, dict) else None


def start_hub_server(tmp_path: Path, **kwargs: Any) -> HubServer:
    """Start a `HubServer` storing under ``tmp_path / "hub-storage"``; stop it (or use ``with``) when done.

    Fixture example::

        @pytest.fixture
        def hub(tmp_path):
            with start_hub_server(tmp_path) as server:
                yield server
    """
    return HubServer(Path(tmp_path) / "hub-storage", **kwargs).start()


_MISSING = object()


@contextmanager
def hub_env(
    endpoint: str,
    cache_dir: str | os.PathLike[str],
    token: str | None = None,
    *,
    offline: bool = False,
    disable_xet: bool = True,
) -> Iterator[None]:
    """Point `huggingface_hub` (and `transformers`/`datasets`) at ``endpoint`` with ``cache_dir`` as hub cache.

    Patches the environment and every import-time copy the client keeps (``constants.ENDPOINT``, the resolve URL
    template, the trusted hosts, the cache folders, offline mode, the token file, ``HfApi`` default instance...)
    and restores all of it on exit. ``token`` is exposed as ``HF_TOKEN`` (``None``: no token at all, the user's
    token file is hidden). ``offline=True`` sets ``HF_HUB_OFFLINE=1``. Xet is disabled by default so uploads use
    the regular/LFS protocol that `HubServer` implements.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http
    from huggingface_hub.utils._hf_uris import parse_hf_uri

    endpoint = endpoint.rstrip("/")
    cache_dir = str(Path(cache_dir))
    home = tempfile.mkdtemp(prefix="hf-home-")
    host = urlsplit(endpoint).hostname or ""

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": cache_dir,
        "HF_HOME": home,
        "HF_TOKEN": token,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_HUB_OFFLINE": "1" if offline else None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_DATASETS_OFFLINE": None,
        "HF_HUB_DISABLE_XET": "1" if disable_xet else None,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": None,
        "HUGGINGFACE_CO_STAGING": None,
    }
    patches: list[tuple[Any, str, Any]] = [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host}),
        (constants, "HF_HUB_CACHE", cache_dir),
        (constants, "HUGGINGFACE_HUB_CACHE", cache_dir),
        (constants, "HF_HOME", home),
        (constants, "HF_TOKEN_PATH", os.path.join(home, "token")),
        (constants, "HF_STORED_TOKENS_PATH", os.path.join(home, "stored_tokens")),
        (constants, "AGENT_HARNESSES_PATH", os.path.join(home, ".agent_harnesses.json")),
        (constants, "HF_HUB_OFFLINE", offline),
        (constants, "HF_HUB_DISABLE_XET", disable_xet),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False),
        (_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)}),
        (hf_api_module.api, "endpoint", endpoint),
    ]
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        # transformers keeps one shared HfApi, made on first use with the endpoint of that moment
        patches.append((transformers_hub, "_hf_api", None))
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        patches += [
            (datasets_config, "HF_ENDPOINT", endpoint),
            (datasets_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
            (datasets_config, "HF_HUB_OFFLINE", offline),
        ]

    saved_env = {key: os.environ.get(key) for key in env}
    saved_attrs = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in patches]
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for obj, name, value in patches:
            setattr(obj, name, value)
        parse_hf_uri.cache_clear()
        yield
    finally:
        for obj, name, value in reversed(saved_attrs):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        parse_hf_uri.cache_clear()
        _http.close_session()  # drop keep-alive connections to a server that is about to go away
        shutil.rmtree(home, ignore_errors=True)


def repo_url(endpoint: str, repo_id: str, repo_type: str = "model") -> str:
    """Web URL of a repo on the loopback hub."""
    return f"{endpoint.rstrip('/')}/{URL_PREFIXES[repo_type]}{quote(repo_id)}"
