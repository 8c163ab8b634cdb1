"""A tiny Hugging Face Hub look-alike on 127.0.0.1 for tests (no internet involved).

Serves what huggingface_hub's download paths call: `HEAD|GET /{repo}/resolve/{rev}/{file}`
(with `Range` support unless `refuse_ranges`), `GET /api/models/{repo}/revision/{rev}` and
`GET /api/models/{repo}/tree/{rev}`; and what its upload paths call (`upload_folder` ->
`create_commit`): `POST /api/repos/create`, `/api/models/{repo}/branch/{branch}`,
`/api/validate-yaml`, `/api/models/{repo}/preupload/{rev}` (every file "regular", so its bytes
come inline) and `/api/models/{repo}/commit/{rev}`, recorded in `commits`. Every request is logged with the bytes of body sent,
so tests can assert exactly what was downloaded. Point huggingface_hub at it with
`HF_ENDPOINT=<server.url>` (a subprocess) or `huggingface_hub.constants.ENDPOINT` (in process).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class Repo:
    files: dict[str, Path]
    commit: str
    branches: tuple[str, ...] = ("main",)


@dataclass
class Commit:
    repo: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    created: dict[str, dict] = field(default_factory=dict)     # repo id -> create_repo payload
    branches: list[tuple[str, str]] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    refuse_ranges: bool = False
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def add(self, repo_id: str, files: dict[str, Path], commit: str | None = None) -> str:
        commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = Repo(dict(files), commit)
        return commit

    # --- what tests look at
    def body_bytes(self, file: str | None = None) -> int:
        return sum(r.sent for r in self.log if r.method == "GET" and (file is None or r.path.endswith("/" + file)))

    def downloaded(self) -> list[str]:
        """Files whose bytes were sent (resolve GETs), in order, without duplicates."""
        out = []
        for r in self.log:
            m = re.match(r"/.+?/.+?/resolve/[^/]+/(.+)", r.path)
            if r.method == "GET" and m and r.sent and m.group(1) not in out:
                out.append(m.group(1))
        return out

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _record(self, status: int, sent: int = 0) -> None:
            with hub.lock:
                hub.log.append(Request(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"),
                                       status, sent))

        def _send_json(self, obj, status=200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self._record(status, len(body))

        def _not_found(self, what: str) -> None:
            body = json.dumps({"error": f"{what} not found"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "EntryNotFound" if "file" in what else "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self._record(404, len(body))

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (rev != repo.commit and rev not in repo.branches):
                return None
            return repo

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self):
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                with hub.lock:
                    hub.created[repo_id] = payload
                return self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._send_json({"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
            if m is None or m.group(1) not in hub.created:
                return self._not_found("repo")
            repo_id, kind, rev = m.groups()
            if kind == "branch":
                with hub.lock:
                    hub.branches.append((repo_id, rev))
                return self._send_json({})
            if kind == "preupload":
                files = json.loads(body)["files"]
                return self._send_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            with hub.lock:
                hub.commits.append(Commit(repo_id, rev, header["summary"], header.get("description") or "", files))
            oid = hashlib.sha1(body).hexdigest()
            return self._send_json({"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": None})

        def do_HEAD(self):
            self._resolve(head=True)

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
            if m:
                repo = self._repo(m.group(1), m.group(3))
                if repo is None:
                    return self._not_found("repo")
                if m.group(2) == "revision":
                    return self._send_json({"id": m.group(1), "modelId": m.group(1), "sha": repo.commit,
                                            "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
                return self._send_json([{"type": "file", "oid": _git_sha1(p), "size": p.stat().st_size, "path": f}
                                        for f, p in sorted(repo.files.items())])
            self._resolve(head=False)

        def _resolve(self, head: bool):
            path = unquote(urlsplit(self.path).path)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            repo = self._repo(m.group(1), m.group(2)) if m else None
            if repo is None:
                return self._not_found("repo")
            file = repo.files.get(m.group(3))
            if file is None:
                return self._not_found("file")
            size = file.stat().st_size
            start, end, status = 0, size, 200
            rng = self.headers.get("Range")
            if rng and not head and not hub.refuse_ranges:
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if r:
                    start = int(r.group(1))
                    end = min(size, int(r.group(2)) + 1) if r.group(2) else size
                    status = 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{_sha256(file)}"')
            self.send_header("Accept-Ranges", "none" if hub.refuse_ranges else "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            sent = 0
            if not head:
                try:
                    with open(file, "rb") as f:
                        f.seek(start)
                        while sent < end - start:
                            chunk = f.read(min(1 << 20, end - start - sent))
                            self.wfile.write(chunk)
                            sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
            self._record(status, sent)

    return Handler


class serve:
    """Context manager: `with serve(hub) as url: ...` runs the fake hub on 127.0.0.1."""

    def __init__(self, hub: FakeHub):
        self.hub = hub

    def __enter__(self) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.hub))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self.hub.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
