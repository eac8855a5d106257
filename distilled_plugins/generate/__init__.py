"""Stage 1: generate chain-of-thought completions from an OpenAI-compatible teacher endpoint.

Usage:
    OPENAI_API_KEY=... python -m distilled_plugins.generate \\
        --model deepseek-ai/DeepSeek-R1 --dataset-name ../shared/data/math_train/math12k_train.parquet \\
        --output-file generations.jsonl --prompt-column problem --uuid-column problem \\
        --api-addr localhost:39876 --num-generations 4 --max-tokens 16384 --max-concurrent 100

    # join shard outputs (rows sorted by key, each seed row once):
    python -m distilled_plugins.generate --merge shard-0.jsonl shard-1.jsonl --output-file generations.jsonl

Each output line is ``{**example, "generations", "finish_reasons", "api_metadata", "prompt"}``, one per seed
row, keyed by ``md5(str(row[uuid_column]))``. Work is never lost: every successful completion whose row is
not yet complete is journalled in ``<output>.parts``, a resumed run requests only what is missing, and a
half-written last line left by a killed process is cut off before appending.

With a generation store (``--store-dir``), rows the store already holds are not copied into the output: the
seed rows of those keys are listed in ``<output stem>.reused.jsonl`` (see ``schema.REUSED_SUFFIX``) and
``--merge`` fills in their generated columns from the store, so a rerun's shard work is proportional to its new
rows (``--reused-rows copy`` writes them into the output instead, a complete file without ``--merge``).

With ``--batch`` the requests go to the teacher's Batch API instead, at about half the price (see
``distilled_plugins/generate/batch.py``): the same output, journal, store and stats.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import itertools
import json
import logging
import os
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import cli
from distilled_plugins.core.errors import (
    BudgetReached,
    DataError,
    EndpointUnreachable,
    FatalRequestError,
    GenerationIncomplete,
    MissingColumn,
)
from distilled_plugins.core.io import (
    atomic_path,
    dumps_line,
    iter_rows,
    require_columns,
    rewrite_jsonl_lines,
    scan_appended_jsonl,
    write_json,
)
from distilled_plugins.core.progress import Progress
from distilled_plugins.core.schema import (
    ADDED_BY_GENERATE,
    GENERATION_COLUMNS,
    GENERATIONS_COLUMN,
    PROMPT_COLUMN,
    REUSED_HEADER,
    REUSED_SUFFIX,
    STATS_SPEND,
    STATS_SPENT_TOTAL,
    parts_path,
    row_key,
    sibling_path,
    stats_path,
)
from distilled_plugins.core.settings import DATA, TEACHER, add_arguments, from_args, setting
from distilled_plugins.core.stats import Stats
from distilled_plugins.generate.store import LOOKUP_BATCH, PUBLISH_BATCH, STORE_FILE, GenerationStore
from distilled_plugins.teacher.batch_api import BatchSettings
from distilled_plugins.teacher.client import BudgetExhausted, ChatClient, Completion, RetryableError
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings, RetryPolicy

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "You will be given a problem. Please reason step by step, and put your final answer within \\boxed{{}}:\n{prompt}"
)


REUSED_MODES = ("reference", "copy")
# examples of the rows to generate kept from the first pass over the seed (else the seed is streamed again)
KEEP_EXAMPLES = 2_000
# rows of a shard's reused list that merge takes from the store per lookup (each row is held until written)
MERGE_LOOKUP_BATCH = 32
# why a seed row of the shard is not in its output: a repeated uuid, requests that failed for good, or a run that
# stopped early (budget, fatal error: what was received waits in .parts); and why merge leaves a row out
SHARD_DROP_REASONS = ("duplicate_uuid", "failed", "unfinished")
MERGE_DROP_REASONS = ("duplicate_key",)


@dataclass
class GenerateConfig:
    """Settings of one generation run (one shard of the seed)."""

    dataset_name: str = setting(
        help="hub dataset owner/name[@revision] (loaded at that commit), or a local jsonl/json/parquet/arrow file or "
        "folder",
        required=True,
    )
    output_file: str = setting(
        help="JSONL output; resumed if it exists", required=True, flag="--dst", aliases=("--output-file",)
    )
    model: str = setting(help="model name sent to the endpoint", required=True)
    prompt_column: str = setting(
        "problem",
        help="column holding the problem text (a string or chat messages)",
        title="Problem column",
        section=DATA,
    )
    uuid_column: str | None = setting(
        None,
        help="column identifying a row: generations are stored and reused by it (default: the prompt column)",
        title="Problem id column",
        section=DATA,
    )
    api_addr: str = setting(
        "localhost:39876", help="host:port or http(s):// base URL; several separated by commas share the requests"
    )
    api_key: str | None = setting(None, help="the endpoints' API key (CLI: from --api-key-env)", cli=False, repr=False)
    endpoints: list[Endpoint] | None = setting(
        None, help="instead of api_addr: endpoints with their own keys, weights and limits", cli=False
    )
    num_generations: int = setting(
        4, help="completions per problem", minimum=1, maximum=64, title="Completions per problem", section=TEACHER
    )
    max_tokens: int = setting(
        16384,
        help="longest completion, in tokens",
        minimum=1,
        maximum=131072,
        title="Longest completion (tokens)",
        section=TEACHER,
    )
    max_concurrent: int = setting(
        100, help="requests in flight at once", minimum=1, maximum=10000, title="Requests in flight", section=TEACHER
    )
    temperature: float = setting(0.6, help="sampling temperature", minimum=0)
    top_p: float = setting(0.95, help="nucleus sampling top_p", minimum=0, maximum=1)
    prompt_template: str = setting(DEFAULT_PROMPT_TEMPLATE, help="user turn; {prompt} is the problem")
    system_prompt: str | None = setting(None, help="system message sent before the prompt (evaluation uses one)")
    seed: int | None = setting(None, help="sampling seed sent with each request, where the endpoint supports it")
    split: str = setting("train", help="split of a hub or save_to_disk dataset")
    shard_index: int = setting(0, help="this run's shard of the seed (rows split by key hash)", minimum=0)
    num_shards: int = setting(1, help="number of shards the seed is split into", minimum=1)
    retry: RetryPolicy = setting(
        help="request, retry, rate-limit and cost settings (CLI: their own flags)", factory=RequestSettings, cli=False
    )
    progress_interval: float = setting(5.0, help="seconds between progress lines", minimum=0)
    batch: BatchSettings = setting(
        help="teacher mode (online or batch) and the Batch API's settings (CLI: their own flags)",
        factory=BatchSettings,
        cli=False,
    )
    # shared across runs: rows finished with the same settings are copied from here instead of requested again
    store_dir: str | None = setting(None, help="generation store folder shared across runs (default: none)")
    reused_rows: str = setting(
        "reference",
        help="rows found in the generation store: 'reference' lists them in <dst stem>.reused.jsonl and --merge "
        "fills them in from the store (a rerun's work follows its new rows); 'copy' writes them into --dst",
        choices=REUSED_MODES,
    )

    def __post_init__(self):
        self.retry = RequestSettings.of(self.retry)
        self.batch = BatchSettings.of(self.batch)
        self.uuid_column = self.uuid_column or self.prompt_column
        if self.uuid_column == PROMPT_COLUMN:
            raise ValueError(
                f"the uuid column cannot be {PROMPT_COLUMN!r}: output lines overwrite that field with the templated "
                "prompt, so it would not identify rows on resume; pick another column"
            )
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt template must contain {{prompt}}; got {self.prompt_template!r}")
        try:
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"prompt template {self.prompt_template!r} does not format ({type(e).__name__}: {e}); "
                "write literal braces as {{ and }}, e.g. \\boxed{{}}"
            ) from None
        for name in ("num_generations", "max_tokens", "max_concurrent", "num_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.reused_rows not in REUSED_MODES:
            raise ValueError(f"Invalid reused_rows {self.reused_rows!r}, must be one of {REUSED_MODES}")

    @property
    def sampling(self) -> dict:
        sampling = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            sampling["seed"] = self.seed
        return sampling


@dataclass
class GenerateResult:
    output_file: Path
    stats_file: Path
    stats: dict
    reused_file: Path | None = None  # the rows taken from the store, for merge (None: none are referenced)


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of a row key: the same row lands in the same shard whatever else the seed holds."""
    return int(key[:8], 16) % num_shards


def prompt_text(value) -> str:
    """The problem text of a prompt cell: a string, or the user turn of a chat-format list (verl layout)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content", "") for m in value if m.get("role") == "user"]
        if users:
            return users[-1]
    raise DataError(
        f"prompt cell must be a string or a list of chat messages, got {type(value).__name__}: {value!r:.80}"
    )


def settings_key(cfg: GenerateConfig) -> str:
    """What makes two generations interchangeable: teacher, prompt and sampling settings."""
    settings = {
        "model": cfg.model,
        "prompt_template": cfg.prompt_template,
        "system_prompt": cfg.system_prompt,
        "prompt_column": cfg.prompt_column,
        "uuid_column": cfg.uuid_column,
        "num_generations": cfg.num_generations,
        **cfg.sampling,
    }
    return hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _open_store(cfg: GenerateConfig) -> GenerationStore | None:
    return GenerationStore(cfg.store_dir, settings_key(cfg)) if cfg.store_dir else None


def _generated_json(generated: dict) -> bytes:
    return json.dumps(generated, ensure_ascii=False).encode("utf-8")


def _line(example: dict, generated_json: bytes) -> bytes:
    """The output line ``{**example, **generated}``, spliced from serialized parts (no re-encoding of the text).

    >>> _line({"a": 1}, b'{"generations": ["x"]}')
    b'{"a": 1, "generations": ["x"]}\\n'
    """
    if any(column in example for column in ADDED_BY_GENERATE):
        return dumps_line({**example, **json.loads(generated_json)})  # the generated value replaces the seed's
    return _splice(dumps_line(example), generated_json)


def _splice(example_line: bytes, generated_json: bytes) -> bytes:
    """``_line`` from the example's line as :func:`dumps_line` wrote it (no generated column in it).

    >>> _splice(b'{"a": 1}\\n', b'{"generations": ["x"]}')
    b'{"a": 1, "generations": ["x"]}\\n'
    """
    if example_line == b"{}\n":
        return generated_json + b"\n"
    return example_line[:-2] + b", " + generated_json[1:] + b"\n"


def reused_path(output_file: str | Path) -> Path:
    """The list of a shard's rows taken from the generation store: ``shard-0.jsonl`` -> ``shard-0.reused.jsonl``."""
    return sibling_path(output_file, REUSED_SUFFIX)


def _load_done(cfg: GenerateConfig, output: Path) -> set[str]:
    """Keys of the rows already in ``output``, streamed; repairs what an interrupted run left (cut-short, twice)."""
    done, bad, duplicates, unterminated = set(), 0, 0, 0
    for number, (line, row, intact) in enumerate(scan_appended_jsonl(output), start=1):
        if row is None and line.lstrip().startswith(b"{"):
            bad += 1  # a line cut short by a killed run: repaired below
            continue
        if row is None or GENERATIONS_COLUMN not in row:  # someone else's file: never rewrite it
            raise DataError(
                f"{output}:{number}: not a line written by generate (no {GENERATIONS_COLUMN!r}); the file was "
                "left as it is: give another --dst"
            )
        if cfg.uuid_column not in row:
            raise MissingColumn(
                f"{output}: existing line lacks column {cfg.uuid_column!r}; is it another run's output?"
            )
        key = row_key(row[cfg.uuid_column])
        if key in done:
            duplicates += 1
        done.add(key)
        unterminated += not intact
    if bad or duplicates or unterminated:
        logger.warning(
            "%s: repaired %d cut-short or corrupt line(s) and %d duplicate(s) left by an interrupted run",
            output,
            bad + unterminated,
            duplicates,
        )
        rewrite_jsonl_lines(output, _first_per_key(output, cfg.uuid_column))
    return done


def _first_per_key(path: Path, uuid_column: str):
    seen = set()
    for line, row, _ in scan_appended_jsonl(path):
        if row is not None and (key := row_key(row[uuid_column])) not in seen:
            seen.add(key)
            yield line


def _republish(cfg: GenerateConfig, output: Path, done: set[str], store: GenerationStore) -> int:
    """Publish rows of a resumed output that a killed run wrote but had not yet published (reads keys first)."""
    missing = done - store.present(sorted(done))
    if not missing:
        return 0

    def rows():
        for _, row, _ in scan_appended_jsonl(output):
            if row is not None and (key := row_key(row[cfg.uuid_column])) in missing:
                yield key, _generated_json({k: row[k] for k in ADDED_BY_GENERATE})

    return store.publish(rows())


def _load_parts(parts: Path, num_generations: int, done: set[str]) -> dict[str, dict[int, Completion]]:
    """Journalled completions of rows not written yet; the journal is rewritten without those of written rows."""
    found: dict[str, dict[int, Completion]] = {}
    rewrite = False
    for _, rec, intact in scan_appended_jsonl(parts):
        rewrite |= not intact or (rec is not None and rec.get("key") in done)
        if rec is not None and rec.get("key") not in done and rec.get("i", num_generations) < num_generations:
            found.setdefault(rec["key"], {})[rec["i"]] = Completion(rec["text"], rec["finish_reason"], rec["usage"])
    if rewrite:  # drop corrupt lines and completions of written rows; end a whole last line with its newline
        rewrite_jsonl_lines(
            parts,
            (line for line, rec, _ in scan_appended_jsonl(parts) if rec is not None and rec.get("key") not in done),
        )
    return found


class _Row:
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
        return _generated_json({**dict(zip(GENERATION_COLUMNS, columns, strict=True)), PROMPT_COLUMN: self.prompt})


class _Run:
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
        # the seed is read again as requests are taken: a row becomes a _Row (prompt, messages, completions) when
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

    def _succeed(self, row: _Row, index: int, completion: Completion) -> None:
        row.results[index] = completion
        row.missing -= 1
        usage = completion.usage
        self.counts["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.counts["completion_tokens"] += usage.get("completion_tokens") or 0
        if row.missing == 0 and not row.failed:
            # one write() per line: a SIGKILL leaves either the whole line or a cut-short tail that _load_done drops
            generated = row.generated_json()
            row.results = None  # written: the completions leave memory with this row
            os.write(self.output_fd, _line(row.example, generated))
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
        # items: (retry first?, order, row, generation index, failed attempts so far); fresh requests are put in
        # one at a time when the queue is empty, so waiting retries (put back when due) go first
        queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        n = self.cfg.num_generations
        pending = sum(n - len(self.partial.get(key, ())) for key in self.keys)
        num_rows = len(self.keys)
        sequence = itertools.count()

        def fresh():
            # the examples kept by the first pass over the seed, else the seed streamed again
            rows = self.examples.items() if self.examples is not None else _seed_rows(self.cfg, self.keys)
            for key, example in rows:
                known = self.partial.pop(key, {})
                prompt = self.cfg.prompt_template.format(prompt=prompt_text(example[self.cfg.prompt_column]))
                row = _Row(example, key, prompt, n, known, self.cfg.system_prompt)
                for index, result in enumerate(row.results):
                    if result is None:
                        yield row, index

        fresh_requests = fresh()

        def take():
            if queue.empty() and (request := next(fresh_requests, None)) is not None:
                queue.put_nowait((1, next(sequence), *request, 0))
            return queue.get()

        self.counts["requests_needed"] = pending
        if not pending:
            return
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        progress = Progress(logger, "rows", num_rows, self.cfg.progress_interval)
        resolved = 0

        def resolve() -> None:
            nonlocal resolved
            resolved += 1
            if resolved == pending:
                finished.set()

        async with ChatClient(
            self.cfg.api_addr,
            self.cfg.model,
            self.cfg.api_key,
            self.cfg.retry,
            max_connections=self.cfg.max_concurrent,
            endpoints=self.cfg.endpoints,
        ) as client:
            self.client = client
            # endpoints that never answered and failed this many probes are taken for wrong addresses
            unreachable_after = min(self.cfg.retry.max_attempts, 4)

            async def worker() -> None:
                while True:
                    _, order, row, index, failed_attempts = await take()
                    try:
                        completion = await client.attempt(row.messages, **self.cfg.sampling)
                    except BudgetExhausted:
                        self.counts["requests_not_sent_budget"] += 1
                        resolve()
                        continue
                    except RetryableError as e:
                        failed_attempts += 1
                        if (
                            e.cause in ("connect_failed", "connection")
                            and not self.counts["responses_ok"]
                            and client.fleet.unreachable(unreachable_after)
                        ):
                            self.fatal = EndpointUnreachable(
                                f"cannot reach the teacher endpoint {client.url} after "
                                f"{unreachable_after} tries each: {e}. Is the server running and the address right?"
                            )
                            finished.set()
                            return
                        if failed_attempts >= self.cfg.retry.max_attempts:
                            self.failures[e.cause] += 1
                            if not row.failed:
                                row.failed = True
                                self.counts["rows_failed"] += 1
                            resolve()
                        else:
                            self.retries[e.cause] += 1
                            delay = self.cfg.retry.delay(failed_attempts, e.retry_after)
                            loop.call_later(delay, queue.put_nowait, (0, order, row, index, failed_attempts))
                        continue
                    except FatalRequestError as e:
                        self.fatal = e
                        finished.set()
                        return
                    self.counts["responses_ok"] += 1
                    self._succeed(row, index, completion)
                    resolve()

            async def report() -> None:
                while True:
                    await asyncio.sleep(self.cfg.progress_interval)
                    progress.maybe_log(self.counts["rows_written"] + self.counts["rows_failed"], self._progress_extra())

            workers = [asyncio.create_task(worker()) for _ in range(min(self.cfg.max_concurrent, pending))]
            reporter = asyncio.create_task(report())
            try:
                await finished.wait()
            finally:
                for task in (*workers, reporter):
                    task.cancel()
                await asyncio.gather(*workers, reporter, return_exceptions=True)
            self.counts["requests_sent"] = client.requests_sent
            self.endpoint_stats = client.fleet.stats()
            self.rate_limit_pauses = client.fleet.rate_limit_pauses
            self.cost = client.cost
            self.budget_reached = client.budget_exhausted and bool(self.counts["requests_not_sent_budget"])
            progress.finish(self.counts["rows_written"], self._progress_extra())

    def extra_stats(self) -> dict:
        return {"teacher_mode": "online"}

    def _progress_extra(self) -> str:
        retries = sum(self.retries.values())
        failed = sum(self.failures.values())
        extra = f"| {self.counts['responses_ok']} completions, {retries} retries, {failed} failed requests"
        client = getattr(self, "client", None)
        if client is not None and client.settings.priced:
            extra += f", cost {client.cost:.4f}"
            if client.settings.max_cost:
                extra += f" of {client.settings.max_cost:g}"
        return extra


def _seed_rows(cfg: GenerateConfig, wanted: set[str]) -> Iterator[tuple[str, dict]]:
    """Stream the seed again: ``(key, example)`` of each row whose key is in ``wanted``, once (``wanted`` empties)."""
    for example in iter_rows(cfg.dataset_name, cfg.split):
        key = row_key(example[cfg.uuid_column])
        if key in wanted:
            wanted.discard(key)
            yield key, example


def _read_stats(output: Path) -> dict | None:
    try:
        return json.loads(stats_path(output).read_text())
    except (FileNotFoundError, ValueError):
        return None


def spent_before(earlier: dict | None) -> dict:
    """What the tries before this one spent writing the same output (a retried or cleared task's), from the stats
    the last of them wrote: its ``spent_total``.

    >>> first = {"requests_sent": 4, "completions_ok": 4, "prompt_tokens": 40, "completion_tokens": 400,
    ...          "cost_estimate": 0.5}
    >>> first.update(_spend(first, spent_before(None)))
    >>> rerun = dict.fromkeys(STATS_SPEND, 0)  # a cleared task finding every row done
    >>> _spend(rerun, spent_before(first))["spent_total"]["cost_estimate"]
    0.5
    """
    if earlier is None:
        return dict.fromkeys(STATS_SPEND, 0)
    if STATS_SPENT_TOTAL in earlier:
        return dict(earlier[STATS_SPENT_TOTAL])
    return {key: earlier.get(key, 0) for key in STATS_SPEND}  # stats written before spent_total existed


def _spend(stats: dict, before: dict) -> dict:
    """``spent_before`` and ``spent_total`` (this try's figures added), so that a rerun finding every row done
    still reports what the shard cost, not zero."""
    total = {key: before.get(key, 0) + stats[key] for key in STATS_SPEND}
    total["cost_estimate"] = round(total["cost_estimate"], 6)
    return {"spent_before": before, STATS_SPENT_TOTAL: total}


def _prepare_rows(
    cfg: GenerateConfig, output: Path, store: GenerationStore | None
) -> tuple[set[str], dict, dict[str, dict] | None, dict]:
    """Keys of the rows to generate, their journalled completions, their examples (None: too many to keep), counts.

    One pass over the seed: its keys are checked against the store in batches (the key index only), and a
    stored row is listed in the shard's reused list (``reference``) or copied into ``output`` (``copy``). Memory
    holds the seed's keys, one batch of rows, and the examples of the rows to generate while there are at most
    ``KEEP_EXAMPLES`` of them (then they are dropped and the seed is streamed again as requests are sent).
    """
    started = time.monotonic()
    done = _load_done(cfg, output)
    info = Counter(seed_rows=0)
    timings = Counter()
    if store is not None and done:
        info["rows_republished_to_store"] = _republish(cfg, output, done, store)
    partial = _load_parts(parts_path(output), cfg.num_generations, done)
    reference = store is not None and cfg.reused_rows == "reference"
    reused_file = reused_path(output)
    if not reference:
        reused_file.unlink(missing_ok=True)  # a list left by an earlier run with a store would add rows to merge
    to_generate: set[str] = set()
    examples: dict[str, dict] | None = {}  # of the rows to generate, in seed order
    seen = set()
    pending: list[tuple[str, dict]] = []  # this shard's rows not yet in the output, checked against the store

    def check(reused_out) -> None:
        nonlocal examples
        t0 = time.monotonic()
        stored = store.present([key for key, _ in pending]) if store is not None else set()
        timings["store_check_s"] += time.monotonic() - t0
        if stored and not reference:  # copy: each stored row goes straight to the output, one at a time
            t0 = time.monotonic()
            by_key = {key: example for key, example in pending if key in stored}
            with open(output, "ab") as f:
                for key, generated in store.lookup(list(by_key)):
                    f.write(_line(by_key.pop(key), generated))
                    info["rows_reused_from_store"] += 1
            timings["store_copy_s"] += time.monotonic() - t0
        for key, example in pending:
            if key in stored:
                if reference:
                    reused_out.write(dumps_line(example))
                    info["rows_reused_from_store"] += 1
                continue
            prompt_text(example[cfg.prompt_column])  # checked now, before any request; templated when sent
            to_generate.add(key)
            if examples is not None:
                examples[key] = example
                if len(examples) > KEEP_EXAMPLES:
                    examples = None
        pending.clear()

    with ExitStack() as stack:
        reused_out = None
        if reference:
            reused_out = stack.enter_context(open(stack.enter_context(atomic_path(reused_file)), "wb"))
            # the path as given (absolute, symlinks kept): shared storage has the same path on every host, not
            # necessarily the same target; the key column, so a merge keyed otherwise is refused by name
            header = {
                "store_dir": str(store.path.parent.absolute()),
                "settings": store.settings,
                "uuid_column": cfg.uuid_column,
            }
            reused_out.write(dumps_line({REUSED_HEADER: header}))
        for example in iter_rows(cfg.dataset_name, cfg.split):
            if not info["seed_rows"]:
                require_columns([example], [cfg.prompt_column, cfg.uuid_column], cfg.dataset_name)
            info["seed_rows"] += 1
            for column in (cfg.prompt_column, cfg.uuid_column):
                if column not in example:
                    raise DataError(
                        f"{cfg.dataset_name}: row {info['seed_rows']} has no column {column!r}; "
                        f"columns present: {', '.join(example)}"
                    )
            key = row_key(example[cfg.uuid_column])
            if shard_of(key, cfg.num_shards) != cfg.shard_index:
                continue
            if key in seen:  # a duplicate falls in its key's shard: each shard counts its own
                info["duplicate_uuids_skipped"] += 1
                continue
            seen.add(key)
            info["shard_rows"] += 1
            if key in done:
                info["rows_already_done"] += 1
                continue
            pending.append((key, example))
            if len(pending) == LOOKUP_BATCH:
                check(reused_out)
        if not info["seed_rows"]:
            raise DataError(f"{cfg.dataset_name}: the seed dataset is empty")
        check(reused_out)
    partial = {key: known for key, known in partial.items() if key in to_generate}
    info["generations_resumed"] = sum(map(len, partial.values()))
    info["rows_reused_from_store"] += 0
    timings["prepare_s"] = time.monotonic() - started
    info["timings"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    return to_generate, partial, examples, dict(info)


def run(cfg: GenerateConfig, wait_for_batches: bool = True) -> GenerateResult:
    """Generate every missing completion of the configured shard; raise if some rows stay incomplete.

    In batch mode (``cfg.batch``) ``wait_for_batches=False`` returns after one look at the batches, raising
    :class:`~distilled_plugins.teacher.batch_api.BatchesRunning` while some still run (the operator defers on it).
    """
    output = Path(cfg.output_file)
    if output.is_dir():
        raise DataError(f"{output}: --dst is a folder; give the path of a JSONL file")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    earlier_stats = _read_stats(output)
    store = _open_store(cfg)
    try:
        to_generate, partial, examples, info = _prepare_rows(cfg, output, store)
        rows_to_generate = len(to_generate)  # the job takes keys out of the set as rows finish
        logger.info(
            "shard %d/%d of %s: %d rows, %d already done, %d reused from the generation store, %d to generate "
            "(%d completions resumed from %s)",
            cfg.shard_index,
            cfg.num_shards,
            cfg.dataset_name,
            info.get("shard_rows", 0),
            info.get("rows_already_done", 0),
            info["rows_reused_from_store"],
            len(to_generate),
            info.get("generations_resumed", 0),
            parts_path(output).name,
        )
        if cfg.batch.batch:
            from distilled_plugins.generate.batch import BatchJob  # imported here: it builds on this module

            job = BatchJob(
                cfg, to_generate, partial, output, parts_path(output), store, examples, wait=wait_for_batches
            )
        else:
            job = _Run(cfg, to_generate, partial, output, parts_path(output), store, examples)
        del examples
        generate_started = time.monotonic()
        try:
            _run_loop(job.run())
        finally:
            job.close()
        info["timings"]["generate_s"] = round(time.monotonic() - generate_started, 3)
        store_stats = None
        if store is not None:
            store_stats = {**dict(store.counts), **store.size()}
    finally:
        if store is not None:
            store.close()
    rows_failed = job.counts["rows_failed"]
    rows = Stats("rows", reasons=SHARD_DROP_REASONS)  # the shard's seed rows
    rows.read(info.get("shard_rows", 0) + info.get("duplicate_uuids_skipped", 0))
    rows.drop("duplicate_uuid", info.get("duplicate_uuids_skipped", 0))
    rows.keep(info.get("rows_already_done", 0) + info["rows_reused_from_store"] + job.counts["rows_written"])
    rows.drop("failed", rows_failed)
    # stopped by the budget or a fatal error: the completions received are in .parts for the next run
    rows.drop("unfinished", rows_to_generate - job.counts["rows_written"] - rows_failed)
    stats = {
        **rows.as_dict(),
        **info,
        "model": cfg.model,
        "num_generations": cfg.num_generations,
        "sampling": cfg.sampling,
        "rows_written": job.counts["rows_written"],
        "rows_failed": rows_failed,
        "requests_needed": job.counts["requests_needed"],
        "requests_sent": job.counts["requests_sent"],
        "completions_ok": job.counts["responses_ok"],
        "retries": dict(job.retries),
        "failed_requests": dict(job.failures),
        "prompt_tokens": job.counts["prompt_tokens"],
        "completion_tokens": job.counts["completion_tokens"],
        "wall_seconds": round(time.monotonic() - started, 3),
        "endpoints": getattr(job, "endpoint_stats", {}),
        "rate_limit_pauses": getattr(job, "rate_limit_pauses", 0),
        "cost_estimate": round(getattr(job, "cost", 0.0), 6),
        "budget_reached": getattr(job, "budget_reached", False),
        "requests_not_sent_budget": job.counts["requests_not_sent_budget"],
        **job.extra_stats(),
    }
    stats.update(_spend(stats, job.spent_before(earlier_stats)))
    if store_stats is not None:
        stats["store"] = store_stats
        logger.info(
            "generation store %s: %d keys looked up, %d rows read, %d written; %d bytes (%d free, WAL %d)",
            store_stats["path"],
            store_stats.get("keys_looked_up", 0),
            store_stats.get("rows_read", 0),
            store_stats.get("rows_written", 0),
            store_stats["bytes"],
            store_stats["free_bytes"],
            store_stats["wal_bytes"],
        )
    stats_file = write_json(stats_path(output), stats)
    logger.info("shard %d/%d: %s", cfg.shard_index, cfg.num_shards, rows.summary())
    if job.fatal is not None:
        raise job.fatal
    if getattr(job, "pending", None) is not None:
        raise job.pending
    if stats["budget_reached"]:
        raise BudgetReached(
            f"budget reached: estimated cost {job.cost:.4f} >= max_cost {cfg.retry.max_cost:g} after "
            f"{job.counts['responses_ok']} completions; {job.counts['rows_written']} rows written to {output}, "
            f"the rest is kept in {parts_path(output).name}: run again (with a new --max-cost) to resume"
        )
    if rows_failed:
        raise GenerationIncomplete(
            f"{rows_failed} of {info.get('shard_rows', 0)} rows still miss completions after "
            f"{cfg.retry.max_attempts} attempts per request (failures by cause: {dict(job.failures)}); "
            f"the {job.counts['responses_ok']} completions that succeeded are kept in {output} and "
            f"{parts_path(output).name}: run again to resume"
        )
    parts_path(output).unlink(missing_ok=True)
    reused = reused_path(output)
    return GenerateResult(output, stats_file, stats, reused if reused.exists() else None)


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _index(path: Path, uuid_column: str, skip: int = 0):
    """Keys (sorted, ``S32``), offsets and lengths of the lines of a JSONL file after its first ``skip`` lines.

    Keys (32 ASCII bytes), offsets and lengths take 48 bytes a row in NumPy arrays, not Python tuples, so a
    shard of 100,000 rows indexes in ~5 MB; the merge makes its tuples one by one as it takes them.
    """
    import numpy as np  # here, not at the top: the DAG file imports this module and must load fast

    keys, offsets, lengths, offset = bytearray(), array("q"), array("q"), 0
    for number, (line, row, intact) in enumerate(scan_appended_jsonl(path)):
        if not intact:
            raise DataError(f"{path}: has a cut-short or corrupt line; resume that shard before merging")
        if number >= skip:
            if uuid_column not in row:
                raise MissingColumn(f"{path}: a row lacks the uuid column {uuid_column!r}")
            keys += row_key(row[uuid_column]).encode()
            offsets.append(offset)
            lengths.append(len(line))
        offset += len(line)
    key_array = np.frombuffer(bytes(keys), dtype="S32")
    del keys
    order = np.argsort(key_array, kind="stable")  # ties (a key twice in one file) keep file order
    return key_array, order, offsets, lengths


def _shard_rows(path: Path, number: int, uuid_column: str) -> Iterator[tuple[bytes, int, int, tuple[int, int]]]:
    """``(key, source number, position, (offset, length))`` of each line of a shard, in key order."""
    keys, order, offsets, lengths = _index(path, uuid_column)
    for position, i in enumerate(order.tolist()):
        yield keys[i].tobytes(), number, position, (offsets[i], lengths[i])


def _reused_header(path: Path) -> dict:
    with open(path, "rb") as f:
        first = f.readline()
    try:
        header = json.loads(first)[REUSED_HEADER]
        return {
            "store_dir": str(header["store_dir"]),
            "settings": str(header["settings"]),
            "uuid_column": header.get("uuid_column"),
        }
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f"{path}: not a reused-rows list written by generate (its first line names no {REUSED_HEADER!r}); "
            "move it away or rerun that shard"
        ) from None


def _reused_rows(
    path: Path, number: int, uuid_column: str, stores: dict[tuple[str, str], GenerationStore]
) -> Iterator[tuple[bytes, int, int, bytes]]:
    """``(key, source number, position, output line)`` of each row of a shard's reused list, in key order.

    Each seed row is spliced with its generated columns from the store, taken ``MERGE_LOOKUP_BATCH`` keys at a
    time in key order, so memory holds one batch of rows.
    """
    header = _reused_header(path)
    if header["uuid_column"] not in (None, uuid_column):
        raise DataError(
            f"{path}: the shard keyed its rows by column {header['uuid_column']!r}, the merge by {uuid_column!r}; "
            f"merge with --uuid-column {header['uuid_column']}"
        )
    keys, order, offsets, lengths = _index(path, uuid_column, skip=1)
    if not len(order):  # a run that reused nothing: the store is not needed (nor pyarrow's codec loaded)
        return
    store_file = Path(header["store_dir"]) / STORE_FILE
    if not store_file.is_file():
        raise DataError(
            f"{path}: lists rows of the generation store {store_file}, which does not exist here; merge where "
            "that store is mounted, or rerun the shard"
        )
    where = (header["store_dir"], header["settings"])
    if where not in stores:
        stores[where] = GenerationStore(header["store_dir"], header["settings"])
    store = stores[where]
    position = 0
    with open(path, "rb") as f:
        for start in range(0, len(order), MERGE_LOOKUP_BATCH):
            batch = order[start : start + MERGE_LOOKUP_BATCH].tolist()
            wanted = [keys[i].decode() for i in batch]
            generated = dict(store.lookup(wanted))
            if len(generated) < len(wanted):
                missing = [key for key in wanted if key not in generated]
                raise DataError(
                    f"{path}: {len(missing)} row(s) it lists (key {missing[0]} first) are not in the generation "
                    f"store {store_file} (settings {header['settings']}); rerun that shard (clear its generate task)"
                )
            for i, key in zip(batch, wanted, strict=True):
                example_line = os.pread(f.fileno(), lengths[i], offsets[i])
                example = json.loads(example_line)
                if any(column in example for column in ADDED_BY_GENERATE):
                    line = _line(example, generated.pop(key))
                else:
                    line = _splice(example_line, generated.pop(key))
                yield keys[i].tobytes(), number, position, line
                position += 1


def merge(inputs: list[str | Path], output_file: str | Path, uuid_column: str) -> Path:
    """Join shard outputs into one file: each key once, rows sorted by key so any sharding gives the same file.

    A shard is its output file plus, when it ran with a generation store, its reused list
    (``<stem>.reused.jsonl``): the seed rows whose generated columns merge takes from the store.
    Streams: each file is indexed by key (keys and byte offsets only), the sorted indexes are k-way merged
    (``heapq.merge``) and each row is copied from its shard by offset (or spliced from the store), so memory
    holds one row (one lookup batch) at a time. A key in several shards is kept from the first shard given (its
    reused rows before its own) and counted in the stats as dropped.
    """
    started = time.monotonic()
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such shard file; check the shard paths (did that generate task run?)")
    rows = Stats("rows", reasons=MERGE_DROP_REASONS)
    stores: dict[tuple[str, str], GenerationStore] = {}
    sources = []
    for number, path in enumerate(paths):
        if reused_path(path).is_file():
            sources.append(_reused_rows(reused_path(path), 2 * number, uuid_column, stores))
        sources.append(_shard_rows(path, 2 * number + 1, uuid_column))
    files = {2 * number + 1: open(path, "rb") for number, path in enumerate(paths)}
    rows_from_store = 0
    try:
        with atomic_path(output_file) as tmp, open(tmp, "wb") as out:
            previous = None
            for key, number, _, row in heapq.merge(*sources):
                rows.read()
                if key == previous:
                    rows.drop("duplicate_key")
                    continue
                previous = key
                if isinstance(row, bytes):  # spliced from the store
                    out.write(row)
                    rows_from_store += 1
                else:
                    out.write(os.pread(files[number].fileno(), row[1], row[0]))
                rows.keep()
    finally:
        for f in files.values():
            f.close()
        for store in stores.values():
            store.close()
    stats = {
        **rows.as_dict(),
        "shards": len(paths),
        "rows_from_store": rows_from_store,
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    write_json(stats_path(output_file), stats)
    logger.info(
        "merged %d shard file(s) into %s: %s (%d from the generation store)",
        len(paths),
        output_file,
        rows.summary(),
        rows_from_store,
    )
    return Path(output_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distilled_plugins.generate", description=__doc__.split("\n")[0])
    # --model and --dataset-name are not needed to --merge
    add_arguments(parser, GenerateConfig, optional=("model", "dataset_name"))
    parser.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    parser.add_argument("--merge", nargs="+", metavar="SHARD", help="merge these shard outputs into --dst")
    RequestSettings.add_arguments(parser)
    BatchSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    if args.merge:
        merge(args.merge, args.output_file, args.uuid_column or args.prompt_column)
        return 0
    if not args.model or not args.dataset_name:
        raise ValueError("--model and --dataset-name are required (unless --merge)")
    cfg = from_args(
        GenerateConfig,
        args,
        api_key=os.environ.get(args.api_key_env),
        retry=RequestSettings.from_args(args),
        batch=BatchSettings.from_args(args),
    )
    result = run(cfg)
    logger.info("wrote %s (stats: %s)", result.output_file, result.stats_file)
    return 0
