"""A local stand-in for the Hugging Face Hub: enough of its HTTP API for huggingface_hub.

The real hub is unreachable from the test machines, so ``HubServer`` serves hub-shaped repos from
local files on ``127.0.0.1`` and huggingface_hub talks to it through ``HF_ENDPOINT`` (or its
``constants.ENDPOINT``), running its real download code end to end. What huggingface_hub 2.x
calls, and what is served (checked against its file_download.py, _snapshot_download.py, hf_api.py):

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``model_info``,
  ``repo_info``): ``id``, ``sha`` and ``siblings`` (``rfilename``, ``size``, ``blobId``, ``lfs``);
* ``GET /api/models/{repo}/tree/{rev}`` (``list_repo_tree``, recursive): every file with ``oid``,
  ``size`` and, for LFS files (weights), ``lfs.oid`` = sha256 — no ``xetHash``, so plain HTTP
  downloads are used;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` (``hf_hub_download``): ``X-Repo-Commit``,
  ``ETag`` (git blob sha1, or the sha256 for LFS files, which also get ``X-Linked-Etag`` and
  ``X-Linked-Size``), ``Content-Length``, and the body for GET;
* errors as the Hub reports them: 404 with ``X-Error-Code`` ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound`` (the last with ``X-Repo-Commit``).

Every request line is recorded in ``HubServer.requests`` (method, unquoted path) for assertions.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["HubFile", "HubRepo", "HubServer"]

#: Files stored with git LFS on the Hub (their ETag is the sha256).
_LFS_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".bin")


@dataclass(frozen=True)
class HubFile:
    """One file of a served repo, with the digests the Hub reports."""

    data: bytes | None
    path: Path | None
    size: int
    git_sha1: str
    sha256: str
    lfs: bool

    @classmethod
    def of(cls, name: str, source: Path | bytes) -> HubFile:
        if isinstance(source, bytes):
            data, path, size = source, None, len(source)
        else:
            data, path, size = None, source, source.stat().st_size
        digest = hashlib.sha256()
        blob = hashlib.sha1(f"blob {size}\0".encode())  # git's blob id
        for chunk in _chunks(source):
            digest.update(chunk)
            blob.update(chunk)
        lfs = name.endswith(_LFS_SUFFIXES)
        return cls(data, path, size, blob.hexdigest(), digest.hexdigest(), lfs)

    def write_to(self, out: io.BufferedIOBase) -> None:
        for chunk in _chunks(self.data if self.data is not None else self.path):
            out.write(chunk)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


def _chunks(source: Path | bytes | None) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    assert source is not None
    with source.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            yield chunk


@dataclass
class HubRepo:
    """A served model repo at one commit; ``refs`` are the other names of that commit."""

    repo_id: str
    files: dict[str, HubFile]
    sha: str = ""
    refs: tuple[str, ...] = ("main",)

    @classmethod
    def build(
        cls,
        repo_id: str,
        files: Mapping[str, Path | bytes],
        refs: tuple[str, ...] = ("main",),
        sha: str | None = None,
    ) -> HubRepo:
        """The repo; its commit ``sha`` defaults to a hash of its name and files."""
        hub_files = {name: HubFile.of(name, src) for name, src in sorted(files.items())}
        tree = "".join(f"{name} {f.etag}\n" for name, f in hub_files.items())
        commit = sha or hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        return cls(repo_id, hub_files, commit, refs)

    def commit_for(self, revision: str) -> str | None:
        return self.sha if revision == self.sha or revision in self.refs else None


@dataclass
class HubServer:
    """A threaded HTTP server on 127.0.0.1 serving ``repos``; ``start`` / ``stop``."""

    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def add(self, repo: HubRepo) -> None:
        self.repos[repo.repo_id] = repo

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p in list(self.requests) if method is None or m == method]


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    # --- routing -------------------------------------------------------------------------

    def _dispatch(self, *, body: bool) -> None:
        raw_path = urlsplit(self.path).path
        parts = [unquote(p) for p in raw_path.split("/") if p]
        self.server_state.requests.append((self.command, "/" + "/".join(parts)))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2:], body=body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body=body)
        else:
            self._send(404, b"not found", {}, body=body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> tuple[HubRepo, str] | None:
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", body=body)
            return None
        commit = repo.commit_for(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
            return None
        return repo, commit

    def _api(self, parts: list[str], *, body: bool) -> None:
        repo_id = f"{parts[0]}/{parts[1]}"
        rest = parts[2:]
        if not rest:
            revision = "main"
        elif rest[0] in ("revision", "tree") and len(rest) >= 2:
            revision = rest[1]
        else:
            self._send(404, b"not found", {}, body=body)
            return
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        if rest and rest[0] == "tree":
            prefix = "/".join(rest[2:])
            entries = [
                _tree_entry(name, f)
                for name, f in repo.files.items()
                if not prefix or name.startswith(prefix + "/")
            ]
            self._json(entries, body=body)
            return
        info = {
            "_id": commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": ["sentence-transformers", "onnx"],
            "library_name": "sentence-transformers",
            "siblings": [
                {
                    "rfilename": name,
                    "size": f.size,
                    "blobId": f.git_sha1,
                    **(
                        {"lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}}
                        if f.lfs
                        else {}
                    ),
                }
                for name, f in repo.files.items()
            ],
        }
        self._json(info, body=body)

    def _resolve(self, repo_id: str, revision: str, filename: str, *, body: bool) -> None:
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        entry = repo.files.get(filename)
        if entry is None:
            self._error(404, "EntryNotFound", "Entry not found", body=body, commit=commit)
            return
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{entry.etag}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        self._send(200, b"", headers, body=False, length=entry.size)
        if body:
            entry.write_to(self.wfile)

    # --- responses -----------------------------------------------------------------------

    def _error(
        self, status: int, code: str, message: str, *, body: bool, commit: str | None = None
    ) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, body=body)

    def _json(self, payload: Any, *, body: bool) -> None:
        data = json.dumps(payload).encode()
        self._send(200, data, {"Content-Type": "application/json"}, body=body)

    def _send(
        self,
        status: int,
        data: bytes,
        headers: dict[str, str],
        *,
        body: bool,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _tree_entry(name: str, f: HubFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": name, "size": f.size, "oid": f.git_sha1}
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry
