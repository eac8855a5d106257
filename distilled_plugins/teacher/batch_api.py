"""The teacher's Batch API (OpenAI-compatible ``/v1/files`` + ``/v1/batches``): settings, client and the record of a
shard's batches. Light on purpose: Airflow's triggerer imports it to poll a batch (no generation code, no
aiohttp); the engine that builds the batches and reads their results is :mod:`distilled_plugins.generate.batch`.

The record (``<shard stem>.batches/state.json`` beside the shard's output, see :func:`batch_folder`) lists
every batch of the shard with its input file, its uploaded file id and its batch id, each written before the
next call to the provider. A killed process, a task retry or a rerun reads it and re-attaches to the batches it
names; a batch created but not yet recorded (a kill between the reply and the write) is found again by its
input file id in the provider's batch list.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core.errors import BatchError
from distilled_plugins.core.io import write_json
from distilled_plugins.core.schema import sibling_path
from distilled_plugins.core.settings import TEACHER, add_arguments, from_args, setting

logger = logging.getLogger(__name__)

TEACHER_MODES = ("online", "batch")
TERMINAL = ("completed", "failed", "expired", "cancelled")
COMPLETION_WINDOW = "24h"
BATCHES_SUFFIX = ".batches"
STATE_FILE = "state.json"
# the batches a user cancelled (the task marked failed or succeeded): written by the on_kill of the trigger or of
# the operator, read by the engine (which alone writes the state file)
CANCELLED_FILE = "cancelled_by_user.json"


@dataclass
class BatchSettings:
    """How the teacher is asked: one request at a time (online) or by the provider's Batch API (batch)."""

    teacher_mode: str = setting(
        "online",
        help="online: requests sent one by one; batch: the shard's requests submitted to the first endpoint's "
        "Batch API (/v1/files + /v1/batches, results within 24 h, about half the price)",
        choices=TEACHER_MODES,
        title="Teacher mode",
        section=TEACHER,
    )
    batch_poll_seconds: float = setting(
        60.0,
        help="batch mode: seconds between looks at a running batch",
        minimum=0.01,
        title="Batch poll interval (s)",
        section=TEACHER,
    )
    batch_max_requests: int = setting(
        50_000, help="batch mode: requests per batch (the provider's limit); more are split", minimum=1
    )
    batch_max_bytes: int = setting(
        200_000_000, help="batch mode: bytes per batch input file (the provider's limit); more are split", minimum=1
    )
    batch_price_factor: float = setting(
        0.5, help="batch mode: the price flags times this (batch tokens cost about half)", minimum=0, maximum=1
    )

    def __post_init__(self):
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"Invalid teacher mode {self.teacher_mode!r}, must be one of {TEACHER_MODES}")
        for name in ("batch_poll_seconds", "batch_max_requests", "batch_max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.batch_price_factor <= 1:
            raise ValueError(f"batch_price_factor must be in [0, 1], got {self.batch_price_factor}")

    @property
    def batch(self) -> bool:
        return self.teacher_mode == "batch"

    @classmethod
    def of(cls, value) -> BatchSettings:
        return value if isinstance(value, cls) else cls(**(value or {}))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("teacher batch mode")
        add_arguments(group, cls)
        group.add_argument("--batch", dest="batch_shortcut", action="store_true", help="same as --teacher-mode batch")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BatchSettings:
        settings = from_args(cls, args)
        if getattr(args, "batch_shortcut", False):
            settings.teacher_mode = "batch"
        return settings


_HINTS = {
    401: " -- the API key was refused; set a valid key (CLI: $OPENAI_API_KEY; Airflow: the connection's password)",
    404: " -- no Batch API (/v1/files, /v1/batches) at this address, or an unknown id; use teacher mode online",
}


class BatchesRunning(Exception):
    """Batches of the shard are still running: come back later (the CLI waits; the operator defers)."""

    def __init__(self, folder: Path, batch_ids: list[str]):
        super().__init__(f"{len(batch_ids)} batch(es) running: {', '.join(batch_ids)} (record: {folder})")
        self.folder, self.batch_ids = Path(folder), batch_ids


def batch_folder(output: str | Path) -> Path:
    """Where a shard's batches are recorded: ``shard-0.jsonl`` -> ``shard-0.batches/``."""
    return sibling_path(output, BATCHES_SUFFIX)


class BatchAPI:
    """A small synchronous client of ``{url}/v1/files`` and ``{url}/v1/batches`` (urllib: nothing to install).

    Connection failures, 429 and 5xx are retried ``attempts`` times with a growing delay; other refusals raise
    :class:`BatchError` naming the call.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0, attempts: int = 5):
        self.url, self.api_key, self.timeout, self.attempts = url.rstrip("/"), api_key, timeout, attempts

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> bytes:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in (408, 429) and e.code < 500:  # a conflict (409) is no passing state
                    hint = _HINTS.get(e.code, "")
                    raise BatchError(
                        f"{method} {self.url}{path}: HTTP {e.code}: {self._redact(detail)}{hint}"
                    ) from None
                error = f"HTTP {e.code}: {self._redact(detail)}"
            except (urllib.error.URLError, OSError) as e:
                error = self._redact(str(e))
            if attempt == self.attempts:
                raise ConnectionError(
                    f"{method} {self.url}{path}: {error} (after {attempt} attempts); is the teacher's server "
                    "running at this address? Its recorded batches go on: run again to re-attach"
                )
            time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        return json.loads(self._call(method, path, data, "application/json" if data is not None else None))

    def upload(self, path: Path) -> dict:
        """``POST /v1/files`` (purpose ``batch``), multipart as the OpenAI API takes it."""
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        body = head + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return json.loads(self._call("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}"))

    def create(self, input_file_id: str, metadata: dict | None = None) -> dict:
        body = {
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": COMPLETION_WINDOW,
        }
        if metadata:
            body["metadata"] = metadata
        return self._json("POST", "/v1/batches", body)

    def retrieve(self, batch_id: str) -> dict:
        return self._json("GET", f"/v1/batches/{urllib.parse.quote(batch_id)}")

    def cancel(self, batch_id: str) -> dict:
        return self._json("POST", f"/v1/batches/{urllib.parse.quote(batch_id)}/cancel")

    def find(self, input_file_id: str) -> dict | None:
        """The batch made from ``input_file_id``, from the provider's list (newest first, paged)."""
        after = None
        while True:
            query = "?limit=100" + (f"&after={urllib.parse.quote(after)}" if after else "")
            page = self._json("GET", f"/v1/batches{query}")
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]

    def download(self, file_id: str, dest: Path) -> Path:
        dest.write_bytes(self._call("GET", f"/v1/files/{urllib.parse.quote(file_id)}/content"))
        return dest


class BatchState:
    """The record of a shard's batches (``state.json`` in its batch folder), rewritten atomically at each change.

    Each batch: ``n`` (1, 2, ...), ``input`` (file name in the folder), ``requests``, ``file_id`` and
    ``batch_id`` once known, ``status`` and ``counts`` as last seen, ``collected`` once its results are read.
    ``attempts`` counts the failed tries of each request (by ``custom_id``) over all batches.
    """

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = Path(folder), data

    @classmethod
    def load(cls, folder: str | Path) -> BatchState:
        path = Path(folder) / STATE_FILE
        data = json.loads(path.read_text()) if path.exists() else {"batches": [], "attempts": {}}
        return cls(Path(folder), data)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / STATE_FILE, self.data)

    @property
    def batches(self) -> list[dict]:
        return self.data["batches"]

    @property
    def attempts(self) -> dict[str, int]:
        return self.data["attempts"]

    def active(self) -> list[dict]:
        """Batches not yet collected (being submitted, running, or ended and not yet read)."""
        return [b for b in self.batches if not b.get("collected")]

    def running_ids(self) -> list[str]:
        return [b["batch_id"] for b in self.active() if b.get("batch_id") and b.get("status") not in TERMINAL]

    def cancelled_by_user(self) -> set[str]:
        """Ids of the batches :func:`cancel_running` cancelled: their requests are sent again on a rerun without
        spending an attempt (a user's stop is no failure of theirs)."""
        path = self.folder / CANCELLED_FILE
        return set(json.loads(path.read_text())) if path.exists() else set()


def describe(batch: dict) -> str:
    """``batch_1 in_progress: 3/12 completed, 0 failed`` from a batch object."""
    counts = batch.get("request_counts") or {}
    return (
        f"batch {batch.get('id')} {batch.get('status')}: {counts.get('completed', 0)}/{counts.get('total', 0)} "
        f"completed, {counts.get('failed', 0)} failed"
    )


def poll(folder: str | Path, api: BatchAPI, seen: dict[str, str]) -> tuple[list[str], bool]:
    """Look at the shard's running batches once: ``(lines describing what changed since seen, any ended)``.

    ``seen`` maps batch id -> last description and is updated. Reads the record, never writes it (the engine
    does, when it collects): the triggerer and the task never write the same file.
    """
    state = BatchState.load(folder)
    # ended: a batch to collect, or one whose submission was interrupted (the engine has work either way)
    changes, ended = [], len(state.running_ids()) < len(state.active())
    for batch_id in state.running_ids():
        batch = api.retrieve(batch_id)
        line = describe(batch)
        if seen.get(batch_id) != line:
            seen[batch_id] = line
            changes.append(line)
        ended |= batch.get("status") in TERMINAL
    return changes, ended


def cancel_running(folder: str | Path, api: BatchAPI) -> list[str]:
    """Cancel the shard's running batches (a user stopped the task); returns what the provider said of each.

    The ids are recorded first, in their own file (the task alone writes the state file), so that a rerun sends
    their requests again without counting the cancel as a failed attempt.
    """
    state = BatchState.load(folder)
    running = state.running_ids()
    try:
        write_json(state.folder / CANCELLED_FILE, sorted(state.cancelled_by_user() | set(running)))
    except OSError as e:  # cancelling matters more: a rerun then counts the cancel as one failed attempt
        logger.warning("could not record the cancelled batches in %s: %s", state.folder, e)
    said = []
    for batch_id in running:
        try:
            said.append(describe(api.cancel(batch_id)))
        except (BatchError, ConnectionError) as e:  # ended meanwhile, or unreachable: say so, cancel the others
            said.append(f"batch {batch_id}: cancel failed: {e}")
    return said
