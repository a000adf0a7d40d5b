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

    def handler(self, request):
        import httpx2
        path = request.url.path
        self.requests.append((request.method, path))
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
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
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/[^/]+/?(?P<dir>.*)$", path)
        if m and m["repo"] in self.repos:
            folder = self.repos[m["repo"]] / m["dir"]
            if not folder.is_dir():
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            entries = [{"type": "directory" if p.is_dir() else "file", "oid": COMMIT,
                        "size": p.stat().st_size if p.is_file() else 0,
                        "path": str(p.relative_to(self.repos[m["repo"]]))} for p in sorted(folder.iterdir())]
            return httpx2.Response(200, json=entries)
        m = re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
        if m and m["repo"] in self.repos:
            root = self.repos[m["repo"]]
            siblings = [{"rfilename": str(p.relative_to(root))} for p in sorted(root.rglob("*")) if p.is_file()]
            return httpx2.Response(200, json={"id": m["repo"], "sha": COMMIT, "siblings": siblings})
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})

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

