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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distilled_plugins import cli
from distilled_plugins.client import API_KEY_ENV, ChatClient, Completion, FatalRequestError, RetryableError, RetryPolicy
from distilled_plugins.io import (
    DataError,
    atomic_path,
    dumps_line,
    load_rows,
    read_appended_jsonl,
    require_columns,
    rewrite_jsonl,
    write_json,
)
from distilled_plugins.progress import Progress

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "You will be given a problem. Please reason step by step, and put your final answer within \\boxed{{}}:\n{prompt}"
)


_GENERATED_COLUMNS = ("generations", "finish_reasons", "api_metadata")


class GenerationIncomplete(RuntimeError):
    """Some rows still miss completions after all retries; what succeeded is kept for the next run."""


@dataclass
class GenerateConfig:
    """Settings of one generation run (one shard of the seed)."""

    dataset_name: str
    output_file: str
    model: str
    prompt_column: str = "problem"
    uuid_column: str | None = None  # defaults to the prompt column
    api_addr: str = "localhost:39876"
    api_key: str | None = field(default=None, repr=False)
    num_generations: int = 4
    max_tokens: int = 16384
    max_concurrent: int = 1000
    temperature: float = 0.6
    top_p: float = 0.95
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None  # sent as a system message before the prompt (evaluation uses it)
    seed: int | None = None  # sent with each request where the endpoint supports it
    split: str = "train"
    shard_index: int = 0
    num_shards: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress_interval: float = 5.0
    # shared across runs: rows finished with the same settings are copied from here instead of requested again
    store_dir: str | None = None

    def __post_init__(self):
        self.uuid_column = self.uuid_column or self.prompt_column
        if self.uuid_column == "prompt":
            raise ValueError(
                "the uuid column cannot be 'prompt': output lines overwrite that field with the templated "
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


def row_key(row: dict, uuid_column: str) -> str:
    return hashlib.md5(str(row[uuid_column]).encode()).hexdigest()


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


def _store_rows(cfg: GenerateConfig) -> dict[str, dict]:
    """Finished rows in the generation store for these settings, by row key."""
    found: dict[str, dict] = {}
    if cfg.store_dir:
        for path in sorted((Path(cfg.store_dir) / settings_key(cfg)).glob("*.jsonl")):
            for row in read_appended_jsonl(path)[0]:
                if cfg.uuid_column in row and len(row.get("generations", ())) == cfg.num_generations:
                    found.setdefault(row_key(row, cfg.uuid_column), row)
    return found


def _publish_to_store(cfg: GenerateConfig, output: Path) -> None:
    """Copy a finished shard into the store (atomically), for later runs to reuse."""
    import shutil

    name = hashlib.md5(str(output.resolve()).encode()).hexdigest()[:16] + ".jsonl"
    with atomic_path(Path(cfg.store_dir) / settings_key(cfg) / name) as tmp:
        shutil.copyfile(output, tmp)


def stats_path(output_file: str | Path) -> Path:
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + ".stats.json")


def parts_path(output_file: str | Path) -> Path:
    return Path(str(output_file) + ".parts")


def _load_done(cfg: GenerateConfig, output: Path) -> set[str]:
    rows, bad = read_appended_jsonl(output)
    done, kept = set(), []
    for row in rows:
        if cfg.uuid_column not in row:
            raise DataError(f"{output}: existing line lacks column {cfg.uuid_column!r}; is it another run's output?")
        key = row_key(row, cfg.uuid_column)
        if key not in done:
            done.add(key)
            kept.append(row)
    if bad or len(kept) != len(rows):
        logger.warning(
            "%s: repaired %d cut-short or corrupt line(s) and %d duplicate(s) left by an interrupted run",
            output,
            bad,
            len(rows) - len(kept),
        )
        rewrite_jsonl(output, kept)
    return done


def _load_parts(parts: Path, num_generations: int) -> dict[str, dict[int, Completion]]:
    records, bad = read_appended_jsonl(parts)
    if bad:
        rewrite_jsonl(parts, records)
    found: dict[str, dict[int, Completion]] = {}
    for rec in records:
        if rec.get("i", num_generations) < num_generations:
            found.setdefault(rec["key"], {})[rec["i"]] = Completion(rec["text"], rec["finish_reason"], rec["usage"])
    return found


class _Row:
    __slots__ = ("example", "failed", "key", "messages", "missing", "prompt", "results")

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
        self.results: list[Completion | None] = [known.get(i) for i in range(n)]
        self.missing = sum(r is None for r in self.results)
        self.failed = False

    def line(self) -> dict:
        return {
            **self.example,
            "generations": [r.text for r in self.results],
            "finish_reasons": [r.finish_reason for r in self.results],
            "api_metadata": [r.usage for r in self.results],
            "prompt": self.prompt,
        }


class _Run:
    """One asynchronous pass over the pending requests.

    A failed request waits for its retry outside the queue (so the wait holds no concurrency slot) and then
    goes ahead of fresh requests, so that its row completes, and leaves memory, soon.
    """

    def __init__(self, cfg: GenerateConfig, rows: list[_Row], output: Path, parts: Path):
        self.cfg, self.rows = cfg, rows
        self.output_fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.parts_fd = os.open(parts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.counts = Counter()
        self.retries = Counter()
        self.failures = Counter()
        self.fatal: BaseException | None = None

    def close(self) -> None:
        os.close(self.output_fd)
        os.close(self.parts_fd)

    def _succeed(self, row: _Row, index: int, completion: Completion) -> None:
        row.results[index] = completion
        row.missing -= 1
        usage = completion.usage
        self.counts["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.counts["completion_tokens"] += usage.get("completion_tokens") or 0
        if row.missing == 0 and not row.failed:
            # one write() per line: a SIGKILL leaves either the whole line or a cut-short tail that _load_done drops
            os.write(self.output_fd, dumps_line(row.line()))
            self.counts["rows_written"] += 1
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
        # items: (retry first?, order, row, generation index, failed attempts so far)
        queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        pending = 0
        for row in self.rows:
            for index, result in enumerate(row.results):
                if result is None:
                    queue.put_nowait((1, pending, row, index, 0))
                    pending += 1
        self.counts["requests_needed"] = pending
        if not pending:
            return
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        progress = Progress(logger, "rows", len(self.rows), self.cfg.progress_interval)
        resolved = 0

        def resolve() -> None:
            nonlocal resolved
            resolved += 1
            if resolved == pending:
                finished.set()

        async with ChatClient(
            self.cfg.api_addr, self.cfg.model, self.cfg.api_key, self.cfg.retry, max_connections=self.cfg.max_concurrent
        ) as client:
            self.client = client

            async def worker() -> None:
                while True:
                    _, order, row, index, failed_attempts = await queue.get()
                    try:
                        completion = await client.attempt(row.messages, **self.cfg.sampling)
                    except RetryableError as e:
                        failed_attempts += 1
                        if failed_attempts >= self.cfg.retry.max_attempts:
                            self.failures[e.cause] += 1
                            if not row.failed:
                                row.failed = True
                                self.counts["rows_failed"] += 1
                            if e.cause == "connection" and not self.counts["responses_ok"]:
                                self.fatal = FatalRequestError(
                                    f"cannot reach the teacher endpoint {client.url} after "
                                    f"{failed_attempts} attempts: {e}. Is the server running and the address right?"
                                )
                                finished.set()
                                return
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
            progress.finish(self.counts["rows_written"], self._progress_extra())

    def _progress_extra(self) -> str:
        retries = sum(self.retries.values())
        failed = sum(self.failures.values())
        return f"| {self.counts['responses_ok']} completions, {retries} retries, {failed} failed requests"


def _prepare_rows(cfg: GenerateConfig, output: Path) -> tuple[list[_Row], list[dict], dict]:
    """Rows still to generate, rows to copy from the store, and counts."""
    seed = load_rows(cfg.dataset_name, cfg.split)
    if not seed:
        raise DataError(f"{cfg.dataset_name}: the seed dataset is empty")
    require_columns(seed, [cfg.prompt_column, cfg.uuid_column], cfg.dataset_name)
    done = _load_done(cfg, output)
    partial = _load_parts(parts_path(output), cfg.num_generations)
    stored = _store_rows(cfg)
    info = Counter(seed_rows=len(seed))
    rows, reused, seen = [], [], set()
    for example in seed:
        key = row_key(example, cfg.uuid_column)
        if key in seen:
            info["duplicate_uuids_skipped"] += 1
            continue
        seen.add(key)
        if shard_of(key, cfg.num_shards) != cfg.shard_index:
            continue
        info["shard_rows"] += 1
        if key in done:
            info["rows_already_done"] += 1
            continue
        if key in stored:
            reused.append(
                {**example, **{k: stored[key][k] for k in (*_GENERATED_COLUMNS, "prompt") if k in stored[key]}}
            )
            continue
        known = partial.get(key, {})
        info["generations_resumed"] += len(known)
        prompt = cfg.prompt_template.format(prompt=prompt_text(example[cfg.prompt_column]))
        rows.append(_Row(example, key, prompt, cfg.num_generations, known, cfg.system_prompt))
    info["rows_reused_from_store"] = len(reused)
    return rows, reused, dict(info)


def run(cfg: GenerateConfig) -> GenerateResult:
    """Generate every missing completion of the configured shard; raise if some rows stay incomplete."""
    output = Path(cfg.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows, reused, info = _prepare_rows(cfg, output)
    logger.info(
        "shard %d/%d of %s: %d rows, %d already done, %d reused from the generation store, %d to generate "
        "(%d completions resumed from %s)",
        cfg.shard_index,
        cfg.num_shards,
        cfg.dataset_name,
        info.get("shard_rows", 0),
        info.get("rows_already_done", 0),
        len(reused),
        len(rows),
        info.get("generations_resumed", 0),
        parts_path(output).name,
    )
    with open(output, "ab") as f:
        f.write(b"".join(dumps_line(row) for row in reused))
    job = _Run(cfg, rows, output, parts_path(output))
    try:
        _run_loop(job.run())
    finally:
        job.close()
    rows_failed = sum(row.failed for row in rows)
    stats = {
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
    }
    stats_file = write_json(stats_path(output), stats)
    if job.fatal is not None:
        raise job.fatal
    if rows_failed:
        raise GenerationIncomplete(
            f"{rows_failed} of {info.get('shard_rows', 0)} rows still miss completions after "
            f"{cfg.retry.max_attempts} attempts per request (failures by cause: {dict(job.failures)}); "
            f"the {job.counts['responses_ok']} completions that succeeded are kept in {output} and "
            f"{parts_path(output).name}: run again to resume"
        )
    parts_path(output).unlink(missing_ok=True)
    if cfg.store_dir:
        _publish_to_store(cfg, output)
    return GenerateResult(output, stats_file, stats)


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def merge(inputs: list[str | Path], output_file: str | Path, uuid_column: str) -> Path:
    """Join shard outputs into one file: each key once, rows sorted by key so any sharding gives the same file."""
    by_key: dict[str, dict] = {}
    for path in inputs:
        rows, bad = read_appended_jsonl(Path(path))
        if bad:
            raise DataError(f"{path}: has a cut-short or corrupt line; resume that shard before merging")
        for row in rows:
            if uuid_column not in row:
                raise DataError(f"{path}: a row lacks the uuid column {uuid_column!r}")
            by_key.setdefault(row_key(row, uuid_column), row)
    with atomic_path(output_file) as tmp, open(tmp, "wb") as f:
        for key in sorted(by_key):
            f.write(dumps_line(by_key[key]))
    logger.info("merged %d shard file(s) into %s: %d rows", len(inputs), output_file, len(by_key))
    return Path(output_file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distilled_plugins.generate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="model name sent to the endpoint (required unless --merge)")
    p.add_argument("--dataset-name", help="hub dataset name, or a local jsonl/json/parquet/arrow file or folder")
    p.add_argument("--output-file", required=True, help="JSONL output; resumed if it exists")
    p.add_argument("--prompt-column", default="problem")
    p.add_argument("--uuid-column", default=None, help="column identifying a row (default: the prompt column)")
    p.add_argument("--api-addr", default="localhost:39876", help="host:port or http(s):// base URL")
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--max-concurrent", type=int, default=1000, help="requests in flight at once")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--split", default="train", help="split of a hub or save_to_disk dataset")
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--max-attempts", type=int, default=RetryPolicy.max_attempts, help="attempts per request")
    p.add_argument("--backoff-base", type=float, default=RetryPolicy.backoff_base, help="first retry delay (s)")
    p.add_argument("--backoff-max", type=float, default=RetryPolicy.backoff_max, help="longest retry delay (s)")
    p.add_argument("--connect-timeout", type=float, default=RetryPolicy.connect_timeout)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=RetryPolicy.request_timeout,
        help="seconds for one whole request, reply included",
    )
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--merge", nargs="+", metavar="SHARD", help="merge these shard outputs into --output-file")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.merge:
            merge(args.merge, args.output_file, args.uuid_column or args.prompt_column)
            return 0
        if not args.model or not args.dataset_name:
            raise ValueError("--model and --dataset-name are required")
        cfg = GenerateConfig(
            dataset_name=args.dataset_name,
            output_file=args.output_file,
            model=args.model,
            prompt_column=args.prompt_column,
            uuid_column=args.uuid_column,
            api_addr=args.api_addr,
            api_key=os.environ.get(args.api_key_env),
            num_generations=args.num_generations,
            max_tokens=args.max_tokens,
            max_concurrent=args.max_concurrent,
            temperature=args.temperature,
            top_p=args.top_p,
            prompt_template=args.prompt_template,
            split=args.split,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            progress_interval=args.progress_interval,
            retry=RetryPolicy(
                max_attempts=args.max_attempts,
                backoff_base=args.backoff_base,
                backoff_max=args.backoff_max,
                connect_timeout=args.connect_timeout,
                request_timeout=args.request_timeout,
            ),
        )
        result = run(cfg)
    except (ValueError, FatalRequestError, GenerationIncomplete) as e:
        return cli.fail(e)
    logger.info("wrote %s (stats: %s)", result.output_file, result.stats_file)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
