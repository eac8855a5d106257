"""Seed fingerprints: notice that a seed file or folder really changed, cheaply.

Usage:
    python -m distilled_plugins.seed ../shared/data/math_train/math12k_train.parquet --state seed-state.json

A fingerprint lists every data file of the seed with its size, mtime and SHA-256. Checking again stats every
file (cheap) and hashes only the files whose size or mtime moved; the seed changed when a file appeared,
disappeared or hashes differently. So ``touch`` alone changes nothing, and an appended row does. The event
trigger ``operators.triggers.seed_change.SeedChangeTrigger`` polls with these functions; the CLI does the same once,
for a scheduled job (cron, a ``watch_seed`` DAG) where no triggerer runs: it prints the new fingerprint as JSON
and exits 0 when the seed changed since ``--state``, 3 when it did not, 4 when the hub could not be asked.

A hub dataset (``owner/name``, ``hf://datasets/owner/name``, either with ``@branch`` to watch another branch
than ``main``) is fingerprinted by its revision: the commit sha the hub reports for it (``HfApi.dataset_info``, one
small API call, no file download), so a new commit is a change and nothing else is. Its event names the pinned
revision (``owner/name@<sha>``), which the generate stage loads with ``revision=<sha>``. ``HF_ENDPOINT`` points the
client at another hub (a mirror, or the tests' stand-in ``distilled_plugins.devtools.hub_standin``); ``HF_TOKEN``
reaches private and gated datasets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distilled_plugins.core.io import HUB_PREFIX, ROW_FILE_SUFFIXES, HubSeed, count_rows, hub_seed, write_json

logger = logging.getLogger(__name__)

UNCHANGED = 3  # the CLI's exit code when the seed did not change
UNAVAILABLE = 4  # the CLI's exit code when the hub could not be asked (try again later)
_CHUNK = 1 << 20
HUB_TIMEOUT = 30.0  # seconds for one dataset_info call


class SeedNotFound(FileNotFoundError):
    """The seed does not exist, or the hub refuses it (unknown dataset or revision, no access): a user must act."""


class HubUnavailable(ConnectionError):
    """The hub could not be asked now (no network, timeout, HTTP 5xx or 429): try again later."""


@dataclass(frozen=True)
class Fingerprint:
    """What a seed held when it was last looked at: per data file ``[size, mtime_ns, sha256]``, or for a hub
    dataset its commit ``revision`` (and the ``rows`` its card declares for ``train``, None when it declares none)."""

    path: str
    files: dict[str, list] = field(default_factory=dict)
    revision: str | None = None
    rows: int | None = None

    @property
    def digest(self) -> str:
        """One hash of the seed's content: file names and content hashes, never sizes or times; a hub
        dataset's is its commit sha."""
        if self.revision:
            return self.revision
        content = json.dumps(sorted((name, entry[2]) for name, entry in self.files.items()))
        return hashlib.sha256(content.encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        data = {"path": self.path, "files": self.files, "digest": self.digest}
        if self.revision:
            data.update(revision=self.revision, rows=self.rows)
        return data

    @classmethod
    def from_json(cls, data: dict | None) -> Fingerprint | None:
        if not data or "files" not in data:
            return None
        files = {k: list(v) for k, v in data["files"].items()}
        return cls(path=data["path"], files=files, revision=data.get("revision"), rows=data.get("rows"))


@dataclass(frozen=True)
class Check:
    """The outcome of comparing a seed with its previous fingerprint."""

    fingerprint: Fingerprint
    changed: bool  # the content differs (a file added, removed or rewritten)
    stat_changed: bool  # some size or mtime moved (``touch`` moves it without changing the content)
    changed_files: list[str]


def data_files(path: str | Path) -> dict[str, Path]:
    """The seed's data files by name relative to the seed (a single file is named by its own name)."""
    root = Path(path)
    if root.is_file():
        return {root.name: root}
    if root.is_dir():
        return {
            str(p.relative_to(root)): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in ROW_FILE_SUFFIXES and not any(s.startswith(".") for s in p.parts)
        }
    raise SeedNotFound(f"seed {path}: no such file or folder -- create it or fix the seed path")


def stat_snapshot(path: str | Path) -> dict[str, tuple[int, int]]:
    """``(size, mtime_ns)`` of every data file: two equal snapshots a poll apart mean no writer is busy."""
    return {name: (st.st_size, st.st_mtime_ns) for name, file in data_files(path).items() for st in [file.stat()]}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _card_rows(info, split: str = "train") -> int | None:
    """``num_examples`` of ``split`` as the dataset card declares it (of the default or only config), else None."""
    card = getattr(info, "card_data", None)
    declared = card.get("dataset_info") if card is not None else None
    if isinstance(declared, list):  # one entry per config
        declared = next((c for c in declared if c.get("config_name") in (None, "default")), None) or (
            declared[0] if len(declared) == 1 else None
        )
    splits = declared.get("splits") if isinstance(declared, dict) else None
    for entry in splits if isinstance(splits, list) else []:
        if isinstance(entry, dict) and entry.get("name") == split and isinstance(entry.get("num_examples"), int):
            return entry["num_examples"]
    return None


def hub_revision(hub: HubSeed) -> tuple[str, int | None]:
    """The commit sha of ``hub`` now and the rows its card declares for ``train``: one hub API call.

    Raises :class:`SeedNotFound` (unknown dataset or revision, no access) or :class:`HubUnavailable` (no network,
    timeout, HTTP 5xx/429), each with a one-line message.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"  # read now, not at import
    where = f"seed {hub.uri} (hub {endpoint})"
    try:
        info = HfApi(endpoint=endpoint).dataset_info(hub.repo, revision=hub.revision, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise SeedNotFound(f"{where}: gated dataset -- accept its conditions on the hub and set HF_TOKEN") from None
    except (RepositoryNotFoundError, EntryNotFoundError):  # a mirror may answer a bare 404
        raise SeedNotFound(
            f"{where}: no such dataset, or it is private -- check the name, or set HF_TOKEN to a token that can read it"
        ) from None
    except RevisionNotFoundError:
        raise SeedNotFound(f"{where}: no revision {hub.revision!r} -- name an existing branch, tag or commit") from None
    except OfflineModeIsEnabled:
        raise HubUnavailable(f"{where}: HF_HUB_OFFLINE is set -- unset it where the seed is watched") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 404:
            raise SeedNotFound(f"{where}: HTTP 404, no such dataset -- check the name and HF_ENDPOINT") from None
        if status in (401, 403):
            raise SeedNotFound(f"{where}: HTTP {status}, access refused -- set HF_TOKEN to a valid token") from None
        raise HubUnavailable(f"{where}: HTTP {status} -- the hub is failing, trying again later") from None
    except (OSError, ValueError) as e:  # requests' connection errors and timeouts are OSErrors
        errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))  # "Connection refused", "Name or service not known"
        reason = f"{type(e).__name__}: {errno[1]}" if errno else type(e).__name__
        raise HubUnavailable(
            f"{where}: cannot be reached ({reason}) -- check the network or HF_ENDPOINT; trying again later"
        ) from None
    if not info.sha:
        raise HubUnavailable(f"{where}: the hub answered without a commit sha -- trying again later")
    return info.sha, _card_rows(info)


def check_hub(hub: HubSeed, previous: Fingerprint | None = None) -> Check:
    """Fingerprint a hub dataset by its commit sha: changed when the sha differs from ``previous``'s."""
    sha, rows_now = hub_revision(hub)
    fingerprint = Fingerprint(hub.uri, revision=sha, rows=rows_now)
    before = previous.revision if previous else None
    changed = before != sha
    return Check(fingerprint, changed, changed, [f"revision {before or 'none'} -> {sha}"] if changed else [])


def check(path: str | Path, previous: Fingerprint | None = None) -> Check:
    """Fingerprint ``path``, hashing only the files whose size or mtime differ from ``previous``.

    A hub dataset name is fingerprinted by its commit sha instead (:func:`check_hub`).

    >>> import tempfile, os; d = tempfile.mkdtemp(); p = os.path.join(d, "seed.jsonl")
    >>> _ = open(p, "w").write('{"problem": "1+1"}\\n')
    >>> first = check(p).fingerprint
    >>> os.utime(p, ns=(1, 1)); check(p, first).changed
    False
    >>> _ = open(p, "a").write('{"problem": "2+2"}\\n'); check(p, first).changed
    True
    """
    if (hub := hub_seed(path)) is not None:
        return check_hub(hub, previous)
    before = previous.files if previous else {}
    files: dict[str, list] = {}
    stat_changed = False
    for name, file in data_files(path).items():
        st = file.stat()
        old = before.get(name)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            files[name] = old
            continue
        stat_changed = True
        files[name] = [st.st_size, st.st_mtime_ns, file_hash(file)]
    if set(before) - set(files):
        stat_changed = True
    changed_files = sorted(
        name
        for name in set(before) | set(files)
        if (before.get(name) or [None] * 3)[2] != (files.get(name) or [None] * 3)[2]
    )
    return Check(Fingerprint(str(path), files), bool(changed_files), stat_changed, changed_files)


def rows(path: str | Path) -> int | None:
    """Rows in the seed (jsonl lines, parquet metadata); None when another format is among its files."""
    try:
        return count_rows(list(data_files(path).values()))
    except (OSError, ValueError) as e:
        logger.warning("could not count the rows of %s: %s", path, e)
        return None


def event_extra(path: str | Path, fingerprint: Fingerprint, changed_files: list[str]) -> dict:
    """What a seed event tells the runs it starts: where the seed is, which version, how many rows.

    For a hub dataset ``path`` is the pinned name ``owner/name@<sha>`` (a run loads exactly that commit), ``uri``
    ``hf://datasets/owner/name@<sha>``, and ``rows`` the card's ``train`` count (None when the card has none).
    """
    if fingerprint.revision and (hub := hub_seed(path)) is not None:
        if fingerprint.rows is None:
            logger.info("seed %s: its dataset card declares no train split size; rows: null", hub.uri)
        return {
            "uri": f"{HUB_PREFIX}{hub.pinned(fingerprint.revision)}",
            "path": hub.pinned(fingerprint.revision),
            "fingerprint": fingerprint.digest,
            "revision": fingerprint.revision,
            "rows": fingerprint.rows,
            "changed_files": changed_files,
        }
    return {
        "uri": f"file://{Path(path).resolve()}",
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint.digest,
        "rows": rows(path),
        "changed_files": changed_files,
    }


def uri(path: str | Path) -> str:
    """The seed's asset URI: ``hf://datasets/owner/name`` for a hub dataset, else ``file://<absolute path>``."""
    hub = hub_seed(path)
    return hub.uri if hub else f"file://{Path(path).resolve()}"


def canonical(path: str | Path) -> str:
    """The seed as a watcher names it: a hub dataset's ``hf://`` URI, or a local seed's absolute path."""
    hub = hub_seed(path)
    return hub.uri if hub else str(Path(path).resolve())


def pin(path: str | Path) -> dict:
    """What a run without an event generates from: a hub seed pinned to its commit now, or the local path.

    So every shard and every pass over the seed reads the same commit, even if the dataset changes mid-run.
    """
    hub = hub_seed(path)
    if hub is None:
        return {"seed": str(path), "fingerprint": None, "rows": None, "uri": None}
    sha, rows_now = hub_revision(hub)
    return {"seed": hub.pinned(sha), "fingerprint": sha, "rows": rows_now, "uri": f"{HUB_PREFIX}{hub.pinned(sha)}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.seed", description=__doc__.split("\n")[0])
    p.add_argument("seed", help="seed file or folder (jsonl/json/parquet/arrow), or hub dataset owner/name[@branch]")
    p.add_argument("--state", required=True, type=Path, help="JSON file holding the last fingerprint (updated)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = Fingerprint.from_json(json.loads(args.state.read_text())) if args.state.exists() else None
    try:
        result = check(args.seed, previous)
    except SeedNotFound as e:
        logger.error("%s", e)
        return 2
    except HubUnavailable as e:
        logger.error("%s", e)
        return UNAVAILABLE
    write_json(args.state, result.fingerprint.to_json())
    if previous is not None and not result.changed:
        logger.info("seed %s unchanged (fingerprint %s)", args.seed, result.fingerprint.digest)
        return UNCHANGED
    print(json.dumps(event_extra(args.seed, result.fingerprint, result.changed_files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
