"""The report's figures: each stage's stats and artifacts read from the run folder into one dict (the same numbers
the page shows). Nothing is recomputed but what :mod:`.rows` reads from the rows themselves."""

from __future__ import annotations

import base64
import time
from collections import Counter
from pathlib import Path

from distilled_plugins.core.io import iter_jsonl, read_json_or_none
from distilled_plugins.core.schema import (
    DECISION,
    EVALUATION,
    FILTERED,
    FINETUNE_JOBS,
    HANDLED,
    MERGED,
    PACKED,
    PACKED_ENTRY,
    SHARD_STATS,
    STATS_DROPPED,
    STATS_FILE,
    STATS_ROWS_IN,
    STATS_ROWS_OUT,
    STATS_SPEND,
    STATS_SPENT_TOTAL,
    stats_path,
)
from distilled_plugins.report.rows import scan_rows

PACKING_FIGURES = ("packs", "packs_lower_bound", "efficiency", "tokens", "seq_length", "overlong_policy")


def collect(run_dir: str | Path, previous: str | Path | None = None) -> dict:
    """Every figure of the report, read from the run folder's artifacts (missing ones: ``None``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (expected {{output_root}}/distill_r1/{{run_id}})")
    shards = [s for p in sorted(run_dir.glob(SHARD_STATS)) if (s := read_json_or_none(p)) is not None]
    merged = read_json_or_none(stats_path(run_dir / MERGED))
    filtered = read_json_or_none(stats_path(run_dir / FILTERED))
    handled = read_json_or_none(run_dir / HANDLED / STATS_FILE)
    packed = read_json_or_none(run_dir / PACKED / STATS_FILE)
    if packed is None and (entry := read_json_or_none(run_dir / PACKED_ENTRY)) is not None:
        packed = read_json_or_none(Path(entry["path"]) / STATS_FILE)  # packed elsewhere, before this run
    evaluation = read_json_or_none(run_dir / EVALUATION)
    previous = Path(previous) if previous else previous_run(run_dir)
    previous_eval = read_json_or_none(previous / EVALUATION) if previous else None
    teacher = teacher_figures(shards, merged)
    training = _training(run_dir, packed, evaluation)
    return {
        "run_dir": str(run_dir),
        "run_id": run_dir.name,
        "funnel": [
            ("seed rows", teacher["seed_rows"]),
            ("generated", merged["rows_out"] if merged else None),
            ("kept", filtered["rows_out"] if filtered else None),
            ("handled", handled["rows_out"] if handled else None),
            ("packed rows", packed["packs"] if packed else None),
            ("trained tokens", training.get("trained_tokens") if training else None),
        ],
        "stages": {
            "generate": _stage(_generate_stats(shards)),
            "merge": _stage(merged),
            "reject_sampling": _stage(filtered),
            "handle": _stage(handled),
            "pack": _stage(packed),
        },
        "teacher": teacher,
        "grading": _grading(filtered),
        "lengths": _lengths(run_dir, handled, packed, teacher),
        "packing": None if packed is None else _packing(packed),
        "training": training,
        "evaluation": evaluation,
        "previous": {"run_id": previous.name, "evaluation": previous_eval} if previous_eval else None,
        "decision": read_json_or_none(run_dir / DECISION),
        **scan_rows(run_dir),
    }


def _stage(stats: dict | None) -> dict | None:
    if stats is None:
        return None
    return {"rows_in": stats[STATS_ROWS_IN], "rows_out": stats[STATS_ROWS_OUT], "dropped": stats[STATS_DROPPED]}


def _generate_stats(shards: list[dict]) -> dict | None:
    """The generation shards' rows and drops summed, as one stage's stats (``None`` before any shard finished)."""
    if not shards:
        return None
    return {
        "rows_in": sum(s["rows_in"] for s in shards),
        "rows_out": sum(s["rows_out"] for s in shards),
        "dropped": dict(sum((Counter(s["dropped"]) for s in shards), Counter())),
    }


def teacher_figures(shards: list[dict], merged: dict | None = None) -> dict:
    """Teacher requests, tokens, retries, reuse and cost summed over the generation shards."""
    total = Counter()
    for s in shards:
        total["rows_in"] += s.get("rows_in", 0)
        # every try of the shard (stats before spent_total existed: their own): a cleared generate paid nothing
        spent = s.get(STATS_SPENT_TOTAL, s)
        for key in STATS_SPEND:
            total[key] += spent.get(key, 0)
        total["retries"] += sum(s.get("retries", {}).values())
        total["failed_requests"] += sum(s.get("failed_requests", {}).values())
        total["rows_reused_from_store"] += s.get("rows_reused_from_store", 0)
    rows = total["rows_in"]
    return {
        "shards": len(shards),
        "model": shards[0].get("model") if shards else None,
        # batch mode (the provider's Batch API at its price factor) where any shard used it
        "mode": "batch" if any(s.get("teacher_mode") == "batch" for s in shards) else "online",
        "batches": [b["batch_id"] for s in shards for b in s.get("batches", []) if b.get("batch_id")],
        "max_tokens": shards[0].get("sampling", {}).get("max_tokens") if shards else None,
        "seed_rows": shards[0].get("seed_rows") if shards else None,
        **dict(total),
        "reused_share": round(total["rows_reused_from_store"] / rows, 4) if rows else 0.0,
        "cost_estimate": round(total["cost_estimate"], 6),
        "budget_reached": any(s.get("budget_reached") for s in shards),
        "rows_from_store_merged": merged.get("rows_from_store") if merged else None,
    }


def _grading(filtered: dict | None) -> dict | None:
    """Rejection sampling's verdicts on the generations (and its judge's stats, where it had one)."""
    if filtered is None:
        return None
    graded = filtered.get("generations_graded", 0)
    truncated = filtered.get("rejected_generations", {}).get("truncated", 0)
    return {
        "generations_graded": graded,
        "generations_correct": filtered.get("generations_correct", 0),
        "rejected_generations": filtered.get("rejected_generations", {}),
        "truncated_share": round(truncated / graded, 4) if graded else 0.0,
        "judge": filtered.get("judge"),  # the LLM judge's stats, where rejection sampling had one
    }


def _lengths(run_dir: Path, handled: dict | None, packed: dict | None, teacher: dict) -> dict | None:
    """The tokenized samples' lengths (handle's stats and chart) beside the limits set on them."""
    if handled is None:
        return None
    return {
        "percentiles": handled.get("length_percentiles", {}),
        "max_length": handled.get("max_length"),
        "truncated_by_handle": handled.get("truncated", 0),
        "seq_length": packed.get("seq_length") if packed else None,
        "max_tokens": teacher["max_tokens"],
        "chart_png": _png(run_dir / HANDLED / "lengths.png"),
    }


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def _packing(packed: dict) -> dict:
    return {key: packed.get(key) for key in PACKING_FIGURES} | {
        "samples_per_pack": packed.get("samples_per_pack", {}),
        "overlong": packed.get("overlong", {}),
    }


def _training(run_dir: Path, packed: dict | None, evaluation: dict | None) -> dict | None:
    jobs = sorted(run_dir.glob(FINETUNE_JOBS), key=lambda p: p.stat().st_mtime)
    if not jobs:
        return None
    job = jobs[-1]  # the newest: training now, or the last one
    evaluated = Path(evaluation["checkpoint"]) if evaluation and evaluation.get("checkpoint") else None
    if evaluated is not None and (run_dir / EVALUATION).stat().st_mtime >= job.stat().st_mtime:
        # evaluated after the newest job began: the figures are of the job whose checkpoint was evaluated
        job = next((j for j in jobs if evaluated.is_relative_to(j)), job)
    metrics = read_json_or_none(job / "metrics.json")
    if metrics is None:  # running: the steps recorded so far
        steps = (
            [row for _, row in iter_jsonl(job / "msrun_log" / "steps_0.jsonl")]
            if (job / "msrun_log" / "steps_0.jsonl").exists()
            else []
        )
        return {"job": job.name, "finished": False, "steps": steps}
    steps = metrics["steps"]
    epochs = steps[-1].get("epochs") if steps else None
    return {
        "job": job.name,
        "finished": True,
        "steps": steps,
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "median_step_time_ms": metrics["median_step_time_ms"],
        "tokens_per_s": metrics["tokens_per_s"],
        "workers": metrics["workers"],
        "epochs": epochs,
        # the packed tokens (padding excluded) seen once per epoch
        "trained_tokens": packed["tokens"] * epochs if packed and epochs else None,
    }


def previous_run(run_dir: Path) -> Path | None:
    """The latest other run folder beside ``run_dir`` whose evaluation report was written before this run's (or
    before now, when this run has none yet)."""
    own = run_dir / EVALUATION
    before = own.stat().st_mtime if own.exists() else time.time()
    candidates = []
    for report in run_dir.parent.glob(f"*/{EVALUATION}"):
        folder = report.parents[1]
        if folder.resolve() != run_dir.resolve() and report.stat().st_mtime < before:
            candidates.append((report.stat().st_mtime, folder))
    return max(candidates)[1] if candidates else None
