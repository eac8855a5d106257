"""A local stand-in for the Hugging Face hub: the few endpoints a seed watcher and ``datasets.load_dataset`` call.

Usage:
    python -m distilled_plugins.devtools.hub_standin --repo demo/seed --data seed.jsonl --port 8090
    HF_ENDPOINT=http://127.0.0.1:8090 python -m distilled_plugins.seed demo/seed --state state.json

Tests and the demo must not touch the real hub, so they point ``HF_ENDPOINT`` (read by ``huggingface_hub`` when
it is imported: set it in the environment of the process) at this server. Each dataset repo is a list of commits;
:meth:`HubStandin.publish` adds one (its files, a new commit sha, ``main`` moves to it) and every older commit
stays readable by its sha, as on the hub. Served, with the hub's JSON shapes and error headers:

- ``GET /api/datasets/<repo>`` and ``/api/datasets/<repo>/revision/<rev>``: ``id``, ``sha``, ``siblings`` and
  ``cardData.dataset_info.splits`` (``num_examples`` of each ``<split>.jsonl``, as a dataset card declares it);
- ``GET /api/datasets/<repo>/tree/<rev>[/<path>]`` and ``POST /api/datasets/<repo>/paths-info/<rev>``: the
  file listing ``datasets`` resolves data files with;
- ``HEAD``/``GET /datasets/<repo>/resolve/<rev>/<path>``: a file, with ``ETag`` and ``X-Repo-Commit``.

An unknown repo is a 404 with ``X-Error-Code: RepoNotFound``, an unknown revision ``RevisionNotFound``; a repo
in ``tokens`` is private: without the token it is not found, with another one the answer is HTTP 401;
``failing = 500`` makes every API call answer HTTP 500 (a hub outage) until it is set back to ``None``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from distilled_plugins.devtools.teacher_server import ServerThread

logger = logging.getLogger(__name__)


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]

    def splits(self) -> list[dict]:
        """The dataset card's splits: one per top-level ``<split>.jsonl`` file, counted in lines."""
        return [
            {"name": Path(name).stem, "num_examples": sum(1 for line in data.splitlines() if line.strip())}
            for name, data in sorted(self.files.items())
            if "/" not in name and name.endswith(".jsonl")
        ]


@dataclass
class HubStandin:
    """Dataset repos by id, each a list of commits (the last is ``main``); ``requests`` counts API calls."""

    repos: dict[str, list[Commit]] = field(default_factory=dict)
    failing: int | None = None
    requests: int = 0
    tokens: dict[str, str] = field(default_factory=dict)  # private repos: the bearer token each one needs

    def publish(self, repo: str, files: dict[str, bytes | str]) -> str:
        """Commit ``files`` (the repo's whole content) to ``repo``'s ``main``; return the new commit sha."""
        data = {name: content.encode() if isinstance(content, str) else content for name, content in files.items()}
        commits = self.repos.setdefault(repo, [])
        digest = hashlib.sha1(repr((repo, len(commits), sorted(data.items()))).encode()).hexdigest()
        commits.append(Commit(digest, data))
        logger.info("hub stand-in: %s@%s published (%d files)", repo, digest[:12], len(data))
        return digest

    def _commit(self, request: web.Request) -> tuple[str, Commit]:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        commits = self.repos.get(repo)
        if repo in self.tokens and request.headers.get("Authorization") != f"Bearer {self.tokens[repo]}":
            if request.headers.get("Authorization"):  # the hub's answer to a wrong token
                raise web.HTTPUnauthorized(
                    headers={"X-Error-Message": "Invalid credentials in Authorization header"}, text="{}"
                )
            commits = None  # without a token, a private repo looks like no repo at all (as on the hub)
        if not commits:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound"}, text=json.dumps({"error": "Repository not found"})
            )
        rev = request.match_info.get("rev", "main")
        for commit in reversed(commits):
            if rev in ("main", commit.sha):
                return repo, commit
        raise web.HTTPNotFound(
            headers={"X-Error-Code": "RevisionNotFound"}, text=json.dumps({"error": f"Invalid rev id: {rev}"})
        )

    @web.middleware
    async def _count_and_fail(self, request: web.Request, handler):
        self.requests += 1
        if self.failing:
            raise web.HTTPInternalServerError(text=json.dumps({"error": "stand-in outage"}))
        return await handler(request)

    async def info(self, request: web.Request) -> web.Response:
        repo, commit = self._commit(request)
        return web.json_response(
            {
                "id": repo,
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
                "cardData": {"dataset_info": {"splits": commit.splits()}},
            }
        )

    def _entries(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for name, data in sorted(commit.files.items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1 :] if prefix else name
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            parts = name.split("/")
            for depth in range(1, len(parts)) if recursive else ():
                folder = "/".join(parts[:depth])
                if not prefix or folder.startswith(prefix + "/"):
                    folders.add(folder)
            entries.append(self._file_entry(name, data))
        return [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)] + entries

    @staticmethod
    def _file_entry(name: str, data: bytes) -> dict:
        return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    async def tree(self, request: web.Request) -> web.Response:
        _, commit = self._commit(request)
        prefix = request.match_info.get("path", "")
        if prefix.strip("/") in commit.files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="not a folder")
        return web.json_response(self._entries(commit, prefix, request.query.get("recursive") in ("1", "true")))

    async def paths_info(self, request: web.Request) -> web.Response:
        _, commit = self._commit(request)
        form = await request.post() if request.content_type != "application/json" else await request.json()
        paths = form.getall("paths") if hasattr(form, "getall") else form.get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                result.append(self._file_entry(path, commit.files[path]))
            elif any(name.startswith(path + "/") for name in commit.files) or not path:
                result.append({"type": "directory", "path": path, "oid": "0" * 40})
        return web.json_response(result)

    async def resolve(self, request: web.Request) -> web.Response:
        _, commit = self._commit(request)
        path = request.match_info["path"]
        if path not in commit.files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text=f"{path} not found")
        data = commit.files[path]
        headers = {
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "X-Repo-Commit": commit.sha,
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=data, headers=headers)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_and_fail])
        repo = "/{owner}/{name}"
        app.router.add_get("/api/datasets" + repo, self.info)
        app.router.add_get("/api/datasets" + repo + "/revision/{rev}", self.info)
        app.router.add_get("/api/datasets" + repo + "/tree/{rev}", self.tree)
        app.router.add_get("/api/datasets" + repo + "/tree/{rev}/{path:.*}", self.tree)
        app.router.add_post("/api/datasets" + repo + "/paths-info/{rev}", self.paths_info)
        app.router.add_route("*", "/datasets" + repo + "/resolve/{rev}/{path:.*}", self.resolve)
        return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.devtools.hub_standin", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repo", required=True, help="dataset repo id to serve, e.g. demo/seed")
    p.add_argument("--data", required=True, type=Path, help="jsonl file served as the repo's train.jsonl")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hub = HubStandin()
    hub.publish(args.repo, {"train.jsonl": args.data.read_bytes()})
    with ServerThread(hub.app(), port=args.port) as server:
        logger.info("hub stand-in at %s (HF_ENDPOINT=%s); Ctrl-C stops it", server.url, server.url)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
