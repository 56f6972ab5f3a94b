"""An in-process stand-in for the Hub's HTTP API, installed at huggingface_hub's transport level.

huggingface_hub 2.x sends every request through one ``httpx2.Client`` built by a replaceable factory; giving it a
``MockTransport`` routes real requests (real URLs, headers, NDJSON commit bodies) to this object instead of the
network. Nothing of hf-compress or huggingface_hub is patched, so a test exercises the same code a user runs.
Covered: repo creation, pre-upload, commits, YAML validation, repo info and file downloads (HEAD and GET).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from contextlib import contextmanager

import httpx2

GOOD_TOKEN = "hf_standin_token"


class HubStandIn:
    """Repos held in memory: ``repos[repo_id] = {"files": {path: bytes}, "sha": str, "private": bool}``."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.fail_commit = False  # simulate the connection dropping while the commit body is sent
        self.requests: list[tuple[str, str]] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        auth = request.headers.get("authorization", "")
        if request.method == "POST" and auth and auth != f"Bearer {GOOD_TOKEN}":
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": f"https://huggingface.co/{repo_id}"})
            self.repos[repo_id] = {"files": {}, "sha": "0" * 40, "private": bool(body.get("private"))}
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            if self.fail_commit:
                raise httpx2.ConnectError("connection reset by peer (stand-in)", request=request)
            return self._commit(m.group(1), request)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m and request.method == "GET":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return _not_found("RepoNotFound")
            under = (m.group(3) or "").strip("/")
            return httpx2.Response(200, json=[
                {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for f, d in sorted(repo["files"].items()) if not under or f.startswith(under + "/")])
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and request.method == "GET":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return _not_found("RepoNotFound")
            return httpx2.Response(200, json={"id": m.group(1), "modelId": m.group(1), "sha": repo["sha"],
                                              "private": repo["private"],
                                              "siblings": [{"rfilename": f} for f in sorted(repo["files"])]})
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return _not_found("RepoNotFound")
            data = repo["files"].get(m.group(3))
            if data is None:
                return _not_found("EntryNotFound")
            headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404, json={"error": f"stand-in has no route for {request.method} {path}"})

    def _commit(self, repo_id, request) -> httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _not_found("RepoNotFound")
        staged = dict(repo["files"])
        for line in request.content.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                staged.pop(item["value"]["path"], None)
        repo["files"] = staged  # applied whole, like the Hub
        repo["sha"] = hashlib.sha1(json.dumps(sorted((k, len(v)) for k, v in staged.items())).encode()
                                   + repo["sha"].encode()).hexdigest()
        return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{repo['sha']}",
                                          "commitOid": repo["sha"], "pullRequestUrl": None})


def _not_found(code: str) -> httpx2.Response:
    return httpx2.Response(404, headers={"X-Error-Code": code}, json={"error": code})


@contextmanager
def installed(hub: HubStandIn):
    """Route huggingface_hub's HTTP client to ``hub`` for the duration of the block."""
    from huggingface_hub import close_session, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handler), follow_redirects=True))
    try:
        yield hub
    finally:
        close_session()
        set_client_factory(default_client_factory)
