"""One generate run over a shard of the seed: its rows prepared, their missing completions requested (online, or
through the Batch API), its stats written, and an error raised where rows stay incomplete."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from distilled_plugins.core.errors import BudgetReached, DataError, GenerationIncomplete
from distilled_plugins.core.io import read_json_or_none, write_json
from distilled_plugins.core.schema import parts_path, stats_path
from distilled_plugins.core.stats import Stats
from distilled_plugins.generate.config import SHARD_DROP_REASONS, GenerateConfig, GenerateResult, settings_key
from distilled_plugins.generate.journal import reused_path, spent_totals
from distilled_plugins.generate.prepare import prepare_rows
from distilled_plugins.generate.scheduler import Run
from distilled_plugins.generate.store import GenerationStore

logger = logging.getLogger(__package__)  # the stage's name, from any of its modules


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
    earlier_stats = read_json_or_none(stats_path(output))
    store = GenerationStore(cfg.store_dir, settings_key(cfg)) if cfg.store_dir else None
    try:
        job, rows_to_generate, info = _generate(cfg, output, store, wait_for_batches)
        store_stats = None if store is None else {**dict(store.counts), **store.size()}
    finally:
        if store is not None:
            store.close()
    rows = _shard_rows(info, job, rows_to_generate)
    stats = {**rows.as_dict(), **info, **_job_stats(cfg, job, started)}
    stats.update(spent_totals(stats, job.spent_before(earlier_stats)))
    if store_stats is not None:
        stats["store"] = store_stats
        _log_store(store_stats)
    stats_file = write_json(stats_path(output), stats)
    logger.info("shard %d/%d: %s", cfg.shard_index, cfg.num_shards, rows.summary())
    _raise_if_unfinished(cfg, job, output, info)
    parts_path(output).unlink(missing_ok=True)
    reused = reused_path(output)
    return GenerateResult(output, stats_file, stats, reused if reused.exists() else None)


def _generate(
    cfg: GenerateConfig, output: Path, store: GenerationStore | None, wait_for_batches: bool
) -> tuple[Run, int, dict]:
    """Prepare the shard's rows and request their missing completions: the job, the rows it had to generate, info."""
    to_generate, partial, examples, info = prepare_rows(cfg, output, store)
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
        from distilled_plugins.generate.batch import BatchJob  # imported here: online runs need no Batch API code

        job = BatchJob(cfg, to_generate, partial, output, parts_path(output), store, examples, wait=wait_for_batches)
    else:
        job = Run(cfg, to_generate, partial, output, parts_path(output), store, examples)
    del examples
    generate_started = time.monotonic()
    try:
        _run_loop(job.run())
    finally:
        job.close()
    info["timings"]["generate_s"] = round(time.monotonic() - generate_started, 3)
    return job, rows_to_generate, info


def _shard_rows(info: dict, job: Run, rows_to_generate: int) -> Stats:
    """The shard's seed rows: those in the output (done before, reused, written now), and why the others are not."""
    rows = Stats("rows", reasons=SHARD_DROP_REASONS)
    rows.read(info.get("shard_rows", 0) + info.get("duplicate_uuids_skipped", 0))
    rows.drop("duplicate_uuid", info.get("duplicate_uuids_skipped", 0))
    rows.keep(info.get("rows_already_done", 0) + info["rows_reused_from_store"] + job.counts["rows_written"])
    rows.drop("failed", job.counts["rows_failed"])
    # stopped by the budget or a fatal error: the completions received are in .parts for the next run
    rows.drop("unfinished", rows_to_generate - job.counts["rows_written"] - job.counts["rows_failed"])
    return rows


def _job_stats(cfg: GenerateConfig, job: Run, started: float) -> dict:
    """The run's settings and figures: requests, tokens, time, endpoints, cost (and the batches in batch mode)."""
    return {
        "model": cfg.model,
        "num_generations": cfg.num_generations,
        "sampling": cfg.sampling,
        "rows_written": job.counts["rows_written"],
        "rows_failed": job.counts["rows_failed"],
        "requests_needed": job.counts["requests_needed"],
        "requests_sent": job.counts["requests_sent"],
        "completions_ok": job.counts["responses_ok"],
        "retries": dict(job.retries),
        "failed_requests": dict(job.failures),
        "prompt_tokens": job.counts["prompt_tokens"],
        "completion_tokens": job.counts["completion_tokens"],
        "wall_seconds": round(time.monotonic() - started, 3),
        "endpoints": job.endpoint_stats,
        "rate_limit_pauses": job.rate_limit_pauses,
        "cost_estimate": round(job.cost, 6),
        "budget_reached": job.budget_reached,
        "requests_not_sent_budget": job.counts["requests_not_sent_budget"],
        **job.extra_stats(),
    }


def _log_store(store_stats: dict) -> None:
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


def _raise_if_unfinished(cfg: GenerateConfig, job: Run, output: Path, info: dict) -> None:
    """Raise why the shard is not complete: a fatal error, batches still running, the budget, failed rows."""
    if job.fatal is not None:
        raise job.fatal
    if job.pending is not None:
        raise job.pending
    if job.budget_reached:
        raise BudgetReached(
            f"budget reached: estimated cost {job.cost:.4f} >= max_cost {cfg.retry.max_cost:g} after "
            f"{job.counts['responses_ok']} completions; {job.counts['rows_written']} rows written to {output}, "
            f"the rest is kept in {parts_path(output).name}: run again (with a new --max-cost) to resume"
        )
    if job.counts["rows_failed"]:
        raise GenerationIncomplete(
            f"{job.counts['rows_failed']} of {info.get('shard_rows', 0)} rows still miss completions after "
            f"{cfg.retry.max_attempts} attempts per request (failures by cause: {dict(job.failures)}); "
            f"the {job.counts['responses_ok']} completions that succeeded are kept in {output} and "
            f"{parts_path(output).name}: run again to resume"
        )


def _run_loop(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
