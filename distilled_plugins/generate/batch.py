"""Stage 1 through the teacher's Batch API: the shard's missing requests as batches, their results as rows.

Usage:
    OPENAI_API_KEY=... python -m distilled_plugins.generate --batch --batch-poll-seconds 60 \\
        --model deepseek-ai/DeepSeek-R1 --dataset-name seed.jsonl --output-file shard-0.jsonl --api-addr HOST:PORT

:class:`BatchJob` replaces the online request loop of :func:`distilled_plugins.generate.stage.run` (and writes
through the same :class:`~distilled_plugins.generate.scheduler.Run` methods: the output, the ``.parts`` journal,
the generation store and the stats are those of online mode). One step (:meth:`BatchJob.step`):

1. looks at the recorded batches (``<stem>.batches/state.json``, :class:`~distilled_plugins.teacher.batch_api.BatchState`);
2. collects each ended one (completed, expired, cancelled): its output file's completions are written like
   online replies; a request in its error file (an ``error`` or a non-200 ``response``), or in neither file, has
   failed once;
3. submits the requests still missing that no running batch holds and that have attempts left (``max_attempts``),
   split at ``batch_max_requests`` / ``batch_max_bytes`` with a row's requests kept together, each input file and
   its ids recorded before the provider is called.

The CLI steps until nothing runs, sleeping ``batch_poll_seconds`` between looks; the operator defers between
steps (``operators.triggers.teacher_batch.TeacherBatchTrigger``). A request is in at most one running batch, and only a request
that has no result is sent again: the provider completes each at most once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from distilled_plugins.core.errors import BudgetReached, DataError, FatalRequestError
from distilled_plugins.core.io import dumps_line
from distilled_plugins.generate.config import GenerateConfig, prompt_text
from distilled_plugins.generate.prepare import seed_rows
from distilled_plugins.generate.scheduler import Row, Run
from distilled_plugins.teacher.batch_api import (
    TERMINAL,
    BatchAPI,
    BatchesRunning,
    BatchState,
    batch_folder,
    describe,
)
from distilled_plugins.teacher.client import Completion, RetryableError, completion_of
from distilled_plugins.teacher.endpoints import parse_endpoints

logger = logging.getLogger(__name__)

# the rate-limit charge of a prompt until the usage is known: about four characters a token (as client.py)
CHARS_PER_TOKEN = 4
# counts of a run kept in the record, so that a run resumed after a deferral or a kill reports all of its batches
TOTALS = ("requests_sent", "responses_ok", "prompt_tokens", "completion_tokens")


def custom_id(key: str, index: int) -> str:
    """A request's id in the batch files: the row key and the completion's index.

    >>> custom_id("0f3a", 2), request_of("0f3a-2")
    ('0f3a-2', ('0f3a', 2))
    """
    return f"{key}-{index}"


def request_of(cid: str) -> tuple[str, int]:
    key, _, index = cid.rpartition("-")
    return key, int(index)


class BatchJob(Run):
    """Generation of one shard through the Batch API; ``wait=False`` returns after one step, leaving
    :attr:`pending` (a :class:`BatchesRunning`) when batches still run."""

    def __init__(self, cfg: GenerateConfig, keys, partial, output: Path, parts: Path, store=None, examples=None, *,
                 wait: bool = True):  # fmt: skip
        super().__init__(cfg, keys, partial, output, parts, store, examples)
        self.settings, self.wait = cfg.batch, wait
        self.output = Path(output)
        self.folder = batch_folder(output)
        self.state = BatchState.load(self.folder)
        endpoint = (cfg.endpoints or parse_endpoints(cfg.api_addr, cfg.api_key, None))[0]
        recorded = self.state.data.setdefault("url", endpoint.url)
        if recorded != endpoint.url:
            raise DataError(
                f"{self.folder}: its batches were submitted to {recorded}, this run's first endpoint is "
                f"{endpoint.url}; give that address again, or move the folder away to submit anew"
            )
        self.api = BatchAPI(endpoint.url, endpoint.api_key, timeout=min(600.0, cfg.retry.request_timeout))
        # batches still to collect: this process goes on with the run (and the figures) of the one that submitted
        # them; else a new run: every missing request has its attempts again
        if not self.state.active():
            self.state.data.update(attempts={}, totals={})
            self.state.data.pop("spent_before", None)
        self.counts.update(self.state.data.get("totals", {}))
        self.open_rows: dict[str, Row] = {}
        self.failed_keys: set[str] = set()
        self.seen: dict[str, str] = {}  # batch id -> last description logged
        self.pending: BatchesRunning | None = None
        self.refused: str | None = None  # why the budget refused a submission
        self.cost = self.price(self.counts["prompt_tokens"], self.counts["completion_tokens"])
        self.budget_reached = False

    # ---- the loop ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        n = self.cfg.num_generations
        self.counts["requests_needed"] = sum(n - len(self.partial.get(key, ())) for key in self.keys)
        while True:
            self.step()
            running = self.state.active()
            if self.fatal is not None or not running:
                break
            if not self.wait:
                self.pending = BatchesRunning(self.folder, [b.get("batch_id") or f"#{b['n']}" for b in running])
                break
            await self._wait_for_an_end()
        if self.refused and self.fatal is None and not self.state.active():
            self.budget_reached = True
            self.fatal = BudgetReached(self.refused)

    def step(self) -> None:
        """Look at the running batches, collect those that ended, submit what is missing."""
        self._refresh()
        for batch in self.state.active():
            if batch.get("status") in TERMINAL:
                self._collect(batch)
                if self.fatal is not None:
                    return
        self._submit()
        self._log_progress()

    async def _wait_for_an_end(self) -> None:
        while True:
            await asyncio.sleep(self.settings.batch_poll_seconds)
            try:
                await asyncio.to_thread(self._refresh)
            except ConnectionError as e:  # the provider is away for a while: the batches go on
                logger.warning("could not look at the batches: %s; trying again", e)
                continue
            if any(b.get("status") in TERMINAL for b in self.state.active()):
                return

    # ---- looking and collecting --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        changed = False
        for batch in self.state.active():
            if batch.get("batch_id") and batch.get("status") not in TERMINAL:
                changed |= self._update(batch, self.api.retrieve(batch["batch_id"]))
        if changed:
            self.state.save()

    def _update(self, record: dict, batch: dict) -> bool:
        before = dict(record)
        record.update(
            status=batch.get("status"),
            counts=batch.get("request_counts") or {},
            output_file_id=batch.get("output_file_id"),
            error_file_id=batch.get("error_file_id"),
        )
        if batch.get("errors"):
            record["errors"] = batch["errors"]
        line = describe(batch)
        if self.seen.get(record["batch_id"]) != line:
            self.seen[record["batch_id"]] = line
            logger.info("%s", line)
        return record != before

    def _custom_ids(self, record: dict) -> list[str]:
        with open(self.folder / record["input"], "rb") as f:
            return [json.loads(line)["custom_id"] for line in f]

    def _collect(self, record: dict) -> None:
        """Read an ended batch's results into the output/journal/store; count its failed requests."""
        ids = set(self._custom_ids(record))
        if record["status"] == "failed":  # the provider refused the input file itself: no retry fixes that
            errors = json.dumps(record.get("errors") or {})[:500]
            self.fatal = FatalRequestError(
                f"batch {record['batch_id']} failed validation at {self.api.url}: {errors}; check the model name "
                f"and that the endpoint serves the Batch API (its {len(ids)} requests are sent again on a rerun)"
            )
        examples = self._examples({request_of(cid)[0] for cid in ids})
        outcomes: dict[str, str | None] = {}  # custom id -> None (completed) or the failure's cause
        for kind in ("output_file_id", "error_file_id"):
            if not record.get(kind):
                continue
            path = self.api.download(record[kind], self.folder / f"{kind.split('_')[0]}-{record['n']}.jsonl")
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        self._result(json.loads(line), ids, examples, outcomes)
            path.unlink()
        for cid in ids - outcomes.keys():  # in neither file: the batch ended before it (expired, cancelled)
            outcomes[cid] = f"batch_{record['status']}"
        # the requests a user's cancel cut short (the task marked failed) are no failures: no attempt is spent
        by_user = record["status"] == "cancelled" and record.get("batch_id") in self.state.cancelled_by_user()
        if self.fatal is None:
            for cid, cause in outcomes.items():
                if cause is not None:
                    self._failed(cid, cause, spent=not (by_user and cause == "batch_cancelled"))
        record["collected"] = True
        record["completed"] = sum(cause is None for cause in outcomes.values())
        self._save_totals()
        self._publish()
        (self.folder / record["input"]).unlink(missing_ok=True)
        logger.info(
            "collected batch %s (%s): %d of %d requests completed, %d to send again",
            record["batch_id"],
            record["status"],
            record["completed"],
            len(ids),
            sum(1 for cid, cause in outcomes.items() if cause is not None and cid not in self._exhausted()),
        )

    def _result(self, line: dict, ids: set[str], examples: dict, outcomes: dict) -> None:
        cid = line.get("custom_id")
        if cid not in ids or cid in outcomes:
            return  # not a request of this batch, or said twice
        response = line.get("response") or {}
        if line.get("error"):
            outcomes[cid] = str((line["error"] or {}).get("code") or "batch_error")
            return
        if response.get("status_code") != 200:
            outcomes[cid] = f"http_{response.get('status_code')}"
            return
        try:
            completion = completion_of(response.get("body") or {})
        except RetryableError as e:
            outcomes[cid] = e.cause
            return
        outcomes[cid] = None
        self._accept(cid, completion, examples)

    def _accept(self, cid: str, completion: Completion, examples: dict) -> None:
        key, index = request_of(cid)
        if key not in self.keys:
            return  # its row is already written
        row = self.open_rows.get(key)
        if row is None:
            prompt = self.cfg.prompt_template.format(prompt=prompt_text(examples[key][self.cfg.prompt_column]))
            known = self.partial.pop(key, {})
            row = Row(examples[key], key, prompt, self.cfg.num_generations, known, self.cfg.system_prompt)
            row.failed = key in self.failed_keys
            self.open_rows[key] = row
        if row.results[index] is not None:
            return  # journalled by an earlier collection of the same batch
        self.counts["responses_ok"] += 1
        self._succeed(row, index, completion)
        if row.results is None:  # written
            del self.open_rows[key]
            self.keys.discard(key)
        self.cost = self.price(self.counts["prompt_tokens"], self.counts["completion_tokens"])

    def _failed(self, cid: str, cause: str, spent: bool = True) -> None:
        if not spent:
            self.retries["batch_cancelled_by_user"] += 1
            return
        attempts = self.state.attempts[cid] = self.state.attempts.get(cid, 0) + 1
        if attempts < self.cfg.retry.max_attempts:
            self.retries[cause] += 1
            return
        self.failures[cause] += 1
        self._row_failed(request_of(cid)[0])

    def _row_failed(self, key: str) -> None:
        if key not in self.failed_keys:
            self.failed_keys.add(key)
            self.counts["rows_failed"] += 1
            if key in self.open_rows:
                self.open_rows[key].failed = True

    def _exhausted(self) -> set[str]:
        return {cid for cid, n in self.state.attempts.items() if n >= self.cfg.retry.max_attempts}

    def _examples(self, keys: set[str]) -> dict[str, dict]:
        keys = keys & self.keys
        if self.examples is not None:
            return {key: self.examples[key] for key in keys}
        return dict(seed_rows(self.cfg, set(keys)))

    # ---- submitting --------------------------------------------------------------------------------------------

    def price(self, prompt_tokens: float, completion_tokens: float) -> float:
        return self.cfg.retry.cost(prompt_tokens, completion_tokens) * self.settings.batch_price_factor

    def _submit(self) -> None:
        for record in self.state.active():  # submissions a killed process left half done
            if not record.get("batch_id"):
                self._send(record)
        covered = {cid for record in self.state.active() for cid in self._custom_ids(record)}
        exhausted = self._exhausted()
        written = self._write_inputs(covered, exhausted)
        if not written:
            return
        worst = sum(record["worst_cost"] for record in written)
        committed = sum(r.get("worst_cost", 0.0) for r in self.state.active()) + self.cost
        budget = self.cfg.retry.max_cost
        if budget is not None and committed + worst > budget:
            requests = sum(record["requests"] for record in written)
            for record in written:
                (self.folder / record["input"]).unlink()
            self.counts["requests_not_sent_budget"] += requests
            self.refused = (
                f"budget: a batch of {requests} requests could cost up to {worst:.4f} (each at max_tokens "
                f"{self.cfg.max_tokens}, batch price x{self.settings.batch_price_factor:g}), which with "
                f"{committed:.4f} already spent or running passes max_cost {budget:g}; nothing was submitted. "
                "Give a larger --max-cost (or fewer rows, or a smaller --max-tokens) and run again"
            )
            logger.error("%s", self.refused)
            return
        for record in written:
            self.state.batches.append(record)
            self.state.save()  # recorded before the provider hears of it
        for record in written:
            self._send(record)

    def _write_inputs(self, covered: set[str], exhausted: set[str]) -> list[dict]:
        """Write the missing requests as batch input files (a row's requests in one file); their records."""
        settings, n = self.settings, self.cfg.num_generations
        sampling = self.cfg.sampling
        rows = self.examples.items() if self.examples is not None else seed_rows(self.cfg, set(self.keys))
        records: list[dict] = []
        out, record = None, None
        number = max((b["n"] for b in self.state.batches), default=0)

        def start() -> None:
            nonlocal out, record, number
            number += 1
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"n": number, "input": f"input-{number}.jsonl", "requests": 0, "bytes": 0, "worst_cost": 0.0}
            out = open(self.folder / record["input"], "wb")
            records.append(record)

        try:
            for key, example in rows:
                if key not in self.keys:
                    continue
                row = self.open_rows.get(key)
                known = row.results if row is not None else [None] * n
                journalled = self.partial.get(key, {})
                lines, prompt_chars = [], 0
                for index in range(n):
                    cid = custom_id(key, index)
                    if known[index] is not None or index in journalled or cid in covered:
                        continue
                    if cid in exhausted:
                        self._row_failed(key)
                        continue
                    prompt = self.cfg.prompt_template.format(prompt=prompt_text(example[self.cfg.prompt_column]))
                    messages = [{"role": "user", "content": prompt}]
                    if self.cfg.system_prompt:
                        messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
                    body = {"model": self.cfg.model, "messages": messages, **sampling}
                    lines.append(
                        dumps_line({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
                    )
                    prompt_chars += sum(len(m["content"]) for m in messages)
                if not lines:
                    continue
                size = sum(map(len, lines))
                if size > settings.batch_max_bytes:
                    raise DataError(
                        f"row {key}: its {len(lines)} requests take {size} bytes, over batch_max_bytes "
                        f"{settings.batch_max_bytes}; raise the limit or shorten the problem"
                    )
                if (
                    record is None
                    or record["requests"] + len(lines) > settings.batch_max_requests
                    or record["bytes"] + size > settings.batch_max_bytes
                ):
                    if out is not None:
                        out.close()
                    start()
                for line in lines:
                    out.write(line)
                record["requests"] += len(lines)
                record["bytes"] += size
                record["worst_cost"] += self.price(
                    prompt_chars / CHARS_PER_TOKEN + 8 * len(lines), self.cfg.max_tokens * len(lines)
                )
        finally:
            if out is not None:
                out.close()
        return records

    def _send(self, record: dict) -> None:
        """Upload a recorded input file and create its batch, recording each id as soon as it is known."""
        if not record.get("file_id"):
            record["file_id"] = self.api.upload(self.folder / record["input"])["id"]
            self.state.save()
        batch = self.api.find(record["file_id"]) if record.get("creating") else None  # created, reply lost?
        if batch is None:
            record["creating"] = True
            self.state.save()
            batch = self.api.create(record["file_id"], {"shard_output": self.output.name, "n": str(record["n"])})
        record["batch_id"] = batch["id"]
        self._update(record, batch)
        self.counts["requests_sent"] += record["requests"]
        self._save_totals()
        logger.info(
            "submitted batch %s: %d requests (input file %s, %d bytes) to %s",
            batch["id"],
            record["requests"],
            record["file_id"],
            record["bytes"],
            self.api.url,
        )

    # ---- reporting ---------------------------------------------------------------------------------------------

    def _save_totals(self) -> None:
        self.state.data["totals"] = {name: self.counts[name] for name in TOTALS}
        self.state.save()

    def _log_progress(self) -> None:
        running = [b for b in self.state.active() if b.get("batch_id")]
        cost = f", estimated cost {self.cost:.4f}" if self.cfg.retry.priced else ""
        if cost and self.cfg.retry.max_cost:
            cost += f" of {self.cfg.retry.max_cost:g}"
        logger.info(
            "batch mode: %d row(s) written, %d left, %d failed; %d batch(es) running%s%s",
            self.counts["rows_written"],
            len(self.keys) - len(self.failed_keys & self.keys),
            self.counts["rows_failed"],
            len(running),
            f" ({', '.join(b['batch_id'] for b in running)})" if running else "",
            cost,
        )

    def spent_before(self, earlier_stats: dict | None) -> dict:
        """Fixed when the batch run begins, kept in its record: a step after a deferral, or after a kill that
        wrote no stats, must neither add the run's own figures twice nor lose what the tries before it spent."""
        if "spent_before" not in self.state.data:
            self.state.data["spent_before"] = super().spent_before(earlier_stats)
            self.state.save()
        return self.state.data["spent_before"]

    def extra_stats(self) -> dict:
        return {
            "teacher_mode": "batch",
            "batch_price_factor": self.settings.batch_price_factor,
            "batch_folder": str(self.folder),
            "batches": [
                {
                    "batch_id": b.get("batch_id"),
                    "input_file_id": b.get("file_id"),
                    "status": b.get("status"),
                    "requests": b["requests"],
                    "completed": b.get("completed"),
                }
                for b in self.state.batches
            ],
        }
