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
from urllib.parse import unquote

import httpx2
import yaml

GOOD_TOKEN = "hf_standin_token"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def card_metadata_errors(text: str) -> str | None:
    """What the Hub would reject in a card's YAML front matter (None when it is valid)."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not match:
        return None  # no metadata is allowed
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return f"Invalid YAML: {exc}"
    if not isinstance(meta, dict):
        return "metadata must be a mapping"
    if "base_model" in meta and not all(HUB_ID.fullmatch(b) for b in ([meta["base_model"]] if isinstance(meta["base_model"], str) else meta["base_model"])):
        return f"base_model is not a model id: {meta['base_model']!r}"
    if not isinstance(meta.get("tags", []), list):
        return "tags must be a list"
    if "model-index" in meta:
        try:
            model_index_to_eval_results(meta["model-index"])
        except Exception as exc:  # noqa: BLE001 - any parse failure is a rejection
            return f"Invalid model-index: {exc}"
    return None


class HubStandIn:
    """Repos held in memory: ``repos[repo_id] = {"files": {path: bytes}, "sha": str, "private": bool}``."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.fail_on: set[str] = set()  # "preupload" / "commit": the connection drops on that request
        self.requests: list[tuple[str, str]] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        auth = request.headers.get("authorization", "")
        if request.method == "POST" and auth and auth != f"Bearer {GOOD_TOKEN}":
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/validate-yaml":
            error = card_metadata_errors(json.loads(request.content)["content"])
            return httpx2.Response(400, json={"errors": [{"message": error}]}) if error else httpx2.Response(200, json={})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": f"https://huggingface.co/{repo_id}"})
            self.repos[repo_id] = {"files": {}, "sha": "0" * 40, "private": bool(body.get("private")), "branches": {},
                                   "prs": []}
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path)
        if m and request.method == "POST":
            repo = self.repos.get(m.group(1))
            if repo is None:
                return _not_found("RepoNotFound")
            if m.group(2) in repo["branches"]:
                return httpx2.Response(409, json={"error": "Reference already exists"})
            repo["branches"][m.group(2)] = {"files": dict(repo["files"]), "sha": repo["sha"]}
            return httpx2.Response(200, json={})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m:
            if "preupload" in self.fail_on:
                raise httpx2.ConnectError("connection reset by peer (stand-in)", request=request)
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m:
            if "commit" in self.fail_on:
                raise httpx2.ConnectError("connection reset by peer (stand-in)", request=request)
            return self._commit(m.group(1), unquote(m.group(2)), request)
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

    def _commit(self, repo_id, revision, request) -> httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return _not_found("RepoNotFound")
        pr = request.url.params.get("create_pr") in ("1", "true", "True")
        if pr:
            repo["prs"].append({"files": dict(repo["files"]), "sha": repo["sha"]})
            target = repo["prs"][-1]
        elif revision == "main":
            target = repo
        elif revision in repo["branches"]:
            target = repo["branches"][revision]
        else:
            return _not_found("RevisionNotFound")
        staged = dict(target["files"])
        for line in request.content.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                staged.pop(item["value"]["path"], None)
        if "README.md" in staged:
            error = card_metadata_errors(staged["README.md"].decode())
            if error:
                return httpx2.Response(400, json={"error": f"Invalid metadata in README.md. {error}"})
        target["files"] = staged  # applied whole, like the Hub
        target["sha"] = hashlib.sha1(json.dumps(sorted((k, len(v)) for k, v in staged.items())).encode()
                                     + target["sha"].encode()).hexdigest()
        pr_url = f"https://huggingface.co/{repo_id}/discussions/{len(repo['prs'])}" if pr else None
        return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{target['sha']}",
                                          "commitOid": target["sha"], "pullRequestUrl": pr_url})


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
