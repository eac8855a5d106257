"""The online request loop of a generate run: the shard's missing completions requested from the teacher, at most
``max_concurrent`` at once, each row's line written (and published to the store) once it is complete.

:class:`Run` also writes for batch mode (:class:`~distilled_plugins.generate.batch.BatchJob` subclasses it): the
output, the ``.parts`` journal, the store and the figures of a run are the same in both modes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from distilled_plugins.core.errors import EndpointUnreachable, FatalRequestError
from distilled_plugins.core.io import dumps_line
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import GENERATION_COLUMNS, PROMPT_COLUMN
from distilled_plugins.generate.config import GenerateConfig, prompt_text
from distilled_plugins.generate.journal import generated_json, output_line, spent_before
from distilled_plugins.generate.prepare import seed_rows
from distilled_plugins.generate.store import PUBLISH_BATCH, GenerationStore
from distilled_plugins.teacher.client import BudgetExhausted, ChatClient, Completion, RetryableError

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules

# endpoints that never answered and failed this many probes (or max_attempts, if fewer) are taken for wrong addresses
UNREACHABLE_AFTER = 4


class Row:
    """A seed row in flight: it holds its completions only until its line is written (then ``results`` is None)."""

    __slots__ = ("__weakref__", "example", "failed", "key", "messages", "missing", "prompt", "results")

    def __init__(
        self,
        example: dict,
        key: str,
        prompt: str,
        n: int,
        known: dict[int, Completion],
        system_prompt: str | None = None,
    ):
        self.example, self.key, self.prompt = example, key, prompt
        self.messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            self.messages.insert(0, {"role": "system", "content": system_prompt})
        self.results: list[Completion | None] | None = [known.get(i) for i in range(n)]
        self.missing = sum(r is None for r in self.results)
        self.failed = False

    def generated_json(self) -> bytes:
        columns = (
            [r.text for r in self.results],
            [r.finish_reason for r in self.results],
            [r.usage for r in self.results],
        )
        return generated_json({**dict(zip(GENERATION_COLUMNS, columns, strict=True)), PROMPT_COLUMN: self.prompt})


class Run:
    """One asynchronous pass over the pending requests.

    A failed request waits for its retry outside the queue (so the wait holds no concurrency slot) and then
    goes ahead of fresh requests, so that its row completes, and leaves memory, soon.
    """

    def __init__(
        self,
        cfg: GenerateConfig,
        keys: set[str],
        partial: dict[str, dict[int, Completion]],
        output: Path,
        parts: Path,
        store: GenerationStore | None = None,
        examples: dict[str, dict] | None = None,
    ):
        # the seed is read again as requests are taken: a row becomes a Row (prompt, messages, completions) when
        # its first request is, and once written it is referenced by nothing and freed: memory holds the rows in
        # flight, not the shard
        self.cfg, self.keys, self.partial, self.store, self.examples = cfg, keys, partial, store, examples
        self.to_publish: list[tuple[str, bytes]] = []
        self.output_fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.parts_fd = os.open(parts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.counts = Counter()
        self.retries = Counter()
        self.failures = Counter()
        self.fatal: BaseException | None = None
        self.pending: BaseException | None = None  # batch mode: the batches still running when it returned
        # the client's figures, read when the pass ends
        self.client: ChatClient | None = None
        self.endpoint_stats: dict = {}
        self.rate_limit_pauses = 0
        self.cost = 0.0
        self.budget_reached = False
        # the pass's queue: items (retry first?, order, row, generation index, failed attempts so far)
        self.queue: asyncio.PriorityQueue | None = None
        self.sequence = itertools.count()
        self.fresh_requests: Iterator[tuple[Row, int]] = iter(())
        self.unresolved = 0  # requests neither completed nor given up
        self.finished: asyncio.Event | None = None

    def spent_before(self, earlier_stats: dict | None) -> dict:
        """What earlier tries spent on this output (:func:`spent_before`); a batch run keeps it in its record."""
        return spent_before(earlier_stats)

    def close(self) -> None:
        try:
            self._publish()
        finally:
            os.close(self.output_fd)
            os.close(self.parts_fd)

    def _publish(self) -> None:
        if self.store is not None and self.to_publish:
            self.store.publish(self.to_publish)
        self.to_publish = []

    def _succeed(self, row: Row, index: int, completion: Completion) -> None:
        row.results[index] = completion
        row.missing -= 1
        usage = completion.usage
        self.counts["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.counts["completion_tokens"] += usage.get("completion_tokens") or 0
        if row.missing == 0 and not row.failed:
            # one write() per line: a SIGKILL leaves either the whole line or a cut-short tail that load_done drops
            generated = row.generated_json()
            row.results = None  # written: the completions leave memory with this row
            os.write(self.output_fd, output_line(row.example, generated))
            self.counts["rows_written"] += 1
            if self.store is not None:
                # published in batches after the write; a row a kill leaves unpublished is published on resume
                self.to_publish.append((row.key, generated))
                if len(self.to_publish) >= PUBLISH_BATCH:
                    self._publish()
        else:
            record = {
                "key": row.key,
                "i": index,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "usage": usage,
            }
            os.write(self.parts_fd, dumps_line(record))

    async def run(self) -> None:
        n = self.cfg.num_generations
        needed = sum(n - len(self.partial.get(key, ())) for key in self.keys)
        self.counts["requests_needed"] = needed
        if not needed:
            return
        progress = Progress(logger, "rows", len(self.keys), self.cfg.progress_interval)
        self.unresolved = needed
        self.queue = asyncio.PriorityQueue()
        self.finished = asyncio.Event()
        self.fresh_requests = self._fresh_requests()
        async with ChatClient(
            self.cfg.api_addr,
            self.cfg.model,
            self.cfg.api_key,
            self.cfg.retry,
            max_connections=self.cfg.max_concurrent,
            endpoints=self.cfg.endpoints,
        ) as client:
            self.client = client
            workers = [asyncio.create_task(self._worker(client)) for _ in range(min(self.cfg.max_concurrent, needed))]
            reporter = asyncio.create_task(self._report(progress))
            try:
                await self.finished.wait()
            finally:
                for task in (*workers, reporter):
                    task.cancel()
                await asyncio.gather(*workers, reporter, return_exceptions=True)
            self._read_client_figures(client)
            progress.finish(self.counts["rows_written"], self._progress_extra())

    def _fresh_requests(self) -> Iterator[tuple[Row, int]]:
        """``(row, generation index)`` of each missing completion, row by row in seed order."""
        # the examples kept by the first pass over the seed, else the seed streamed again
        rows = self.examples.items() if self.examples is not None else seed_rows(self.cfg, self.keys)
        for key, example in rows:
            known = self.partial.pop(key, {})
            prompt = self.cfg.prompt_template.format(prompt=prompt_text(example[self.cfg.prompt_column]))
            row = Row(example, key, prompt, self.cfg.num_generations, known, self.cfg.system_prompt)
            for index, result in enumerate(row.results):
                if result is None:
                    yield row, index

    def _take(self):
        # fresh requests are put in one at a time when the queue is empty, so waiting retries (put back when due)
        # go first
        if self.queue.empty() and (request := next(self.fresh_requests, None)) is not None:
            self.queue.put_nowait((1, next(self.sequence), *request, 0))
        return self.queue.get()

    def _resolve(self) -> None:
        self.unresolved -= 1
        if not self.unresolved:
            self.finished.set()

    def _stop(self, fatal: BaseException) -> None:
        self.fatal = fatal
        self.finished.set()

    async def _worker(self, client: ChatClient) -> None:
        while True:
            _, order, row, index, failed_attempts = await self._take()
            try:
                completion = await client.attempt(row.messages, **self.cfg.sampling)
            except BudgetExhausted:
                self.counts["requests_not_sent_budget"] += 1
                self._resolve()
                continue
            except RetryableError as e:
                if self._unreachable(client, e):
                    return
                self._failed_attempt(e, (order, row, index, failed_attempts + 1))
                continue
            except FatalRequestError as e:
                self._stop(e)
                return
            self.counts["responses_ok"] += 1
            self._succeed(row, index, completion)
            self._resolve()

    def _unreachable(self, client: ChatClient, e: RetryableError) -> bool:
        """Stop the pass (True) when no endpoint ever answered: an address or a server down, not a passing error."""
        unreachable_after = min(self.cfg.retry.max_attempts, UNREACHABLE_AFTER)
        if (
            e.cause in ("connect_failed", "connection")
            and not self.counts["responses_ok"]
            and client.fleet.unreachable(unreachable_after)
        ):
            self._stop(
                EndpointUnreachable(
                    f"cannot reach the teacher endpoint {client.url} after "
                    f"{unreachable_after} tries each: {e}. Is the server running and the address right?"
                )
            )
            return True
        return False

    def _failed_attempt(self, e: RetryableError, request: tuple[int, Row, int, int]) -> None:
        """Give the request up after ``max_attempts`` (its row fails), else put it back in the queue when due."""
        _, row, _, failed_attempts = request
        if failed_attempts >= self.cfg.retry.max_attempts:
            self.failures[e.cause] += 1
            if not row.failed:
                row.failed = True
                self.counts["rows_failed"] += 1
            self._resolve()
        else:
            self.retries[e.cause] += 1
            delay = self.cfg.retry.delay(failed_attempts, e.retry_after)
            asyncio.get_running_loop().call_later(delay, self.queue.put_nowait, (0, *request))

    async def _report(self, progress: Progress) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            progress.maybe_log(self.counts["rows_written"] + self.counts["rows_failed"], self._progress_extra())

    def _read_client_figures(self, client: ChatClient) -> None:
        self.counts["requests_sent"] = client.requests_sent
        self.endpoint_stats = client.fleet.stats()
        self.rate_limit_pauses = client.fleet.rate_limit_pauses
        self.cost = client.cost
        self.budget_reached = client.budget_exhausted and bool(self.counts["requests_not_sent_budget"])

    def extra_stats(self) -> dict:
        return {"teacher_mode": "online"}

    def _progress_extra(self) -> str:
        retries = sum(self.retries.values())
        failed = sum(self.failures.values())
        extra = f"| {self.counts['responses_ok']} completions, {retries} retries, {failed} failed requests"
        client = self.client
        if client is not None and client.settings.priced:
            extra += f", cost {client.cost:.4f}"
            if client.settings.max_cost:
                extra += f" of {client.settings.max_cost:g}"
        return extra
