"""A fake Hugging Face Hub at the HTTP transport level (an httpx MockTransport).

huggingface_hub's own logic — URLs, metadata, ETags, the local cache — runs unchanged; only the
network is replaced by files from local folders. Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.pushed: dict[str, dict[str, bytes]] = {}

    def handler(self, request):
        import httpx2
        path = request.url.path
        self.requests.append((request.method, path))
        if request.method == "POST":
            return self._write(request, path)
        m = re.match(r"^/(?:datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
        if m:
            root = self.repos.get(m["repo"])
            if root is None:
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})
            file = root / m["file"]
            if not file.is_file():
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            body = file.read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                       "Content-Length": str(len(body))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)
        m = re.match(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/[^/]+/?(?P<dir>.*)$", path)
        if m and m["repo"] in self.repos:
            root = self.repos[m["repo"]]
            folder = root / m["dir"]
            if not folder.is_dir():
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            listed = folder.rglob("*") if request.url.params.get("recursive") in ("True", "true", "1") else folder.iterdir()
            return httpx2.Response(200, json=[self._entry(root, p) for p in sorted(listed)])
        m = re.match(r"^/api/(?:models|datasets)/(?P<repo>[^/]+/[^/]+)/paths-info/[^/]+$", path)
        if m and m["repo"] in self.repos:
            root = self.repos[m["repo"]]
            from urllib.parse import parse_qs
            wanted = parse_qs(request.content.decode()).get("paths", [])
            return httpx2.Response(200, json=[self._entry(root, root / w) for w in wanted if (root / w).exists()])
        m = re.match(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
        if m and m["repo"] in self.repos:
            root = self.repos[m["repo"]]
            siblings = [{"rfilename": str(p.relative_to(root))} for p in sorted(root.rglob("*")) if p.is_file()]
            info = {"id": m["repo"], "sha": COMMIT, "siblings": siblings, "private": False, "disabled": False,
                    "gated": False, "downloads": 0, "likes": 0, "tags": []}
            if m["kind"] == "datasets" and (root / "README.md").is_file():
                import yaml
                text = (root / "README.md").read_text()
                info["cardData"] = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
            return httpx2.Response(200, json=info)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})

    def _write(self, request, path):
        """The Hub's write API, as far as `create_repo` + `upload_folder` use it: every file "regular" (inline,
        base64 in the commit's NDJSON), committed into ``self.pushed[repo]``."""
        import base64
        import json

        import httpx2
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body.get('organization') or 'someone'}/{body['name']}" if "/" not in body["name"] else body["name"]
            self.created.append({**body, "repo": repo})
            self.pushed.setdefault(repo, {})
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo})
        if path == "/api/validate-yaml":   # the model card's metadata, checked before the upload
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/[^/]+$", path)
        if m:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False, "oid": None} for f in files]})
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/[^/]+$", path)
        if m:
            if m["repo"] not in self.pushed:
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})
            for line in request.content.splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    self.pushed[m["repo"]][value["path"]] = base64.b64decode(value["content"])
                elif item.get("key") == "lfsFile":
                    return httpx2.Response(400, json={"error": "this fake takes regular files only"})
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{m['repo']}/commit/{COMMIT}",
                                              "commitOid": COMMIT, "success": True})
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})

    @staticmethod
    def _entry(root: Path, p: Path) -> dict:
        entry = {"type": "directory" if p.is_dir() else "file", "oid": COMMIT, "path": str(p.relative_to(root)),
                 "size": p.stat().st_size if p.is_file() else 0}
        if p.is_file():
            entry["lastCommit"] = {"id": COMMIT, "title": "", "date": "2026-01-01T00:00:00.000Z"}
        return entry

    def install(self, monkeypatch, cache_dir: Path) -> None:
        """Route huggingface_hub through this fake, online, with a private cache."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.utils import _http
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handler),
                                                       follow_redirects=True))

    @staticmethod
    def uninstall() -> None:
        from huggingface_hub.utils import _http
        _http.set_client_factory(_http.default_client_factory)

