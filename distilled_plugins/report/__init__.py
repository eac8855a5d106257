"""The distillation report of one run: one self-contained HTML page built from the stages' artifacts.

Usage:
    python -m distilled_plugins.report --run-dir {output_root}/distill_r1/{run_id}
    # writes {run_dir}/report/report.html (or --dst), charts inlined as SVG: mail it, archive it

Nothing is recomputed from scratch: the figures are those of the stages' stats files (generate's shards, merge,
reject_sampling, handle, pack), the fine-tune job's ``metrics.json`` and the evaluation's ``report.json``. Two
tables take one streaming pass over the merged generations and the filtered rows (acceptance by level /
subject / source, and the teacher's completion lengths from each response's usage): the only per-row data no
stats file holds. A run in progress gets the sections of the stages that have finished; the others say what is
missing. MATH-500 is compared with the previous run beside this one (same ``{output_root}/distill_r1/``) that
has an evaluation report written before this run's, or with ``--previous``.

:func:`collect` returns the figures (a dict, the same numbers the page shows, each table cell tagged
``data-figure="<section>.<name>"``); :func:`render` turns them into HTML; :func:`run` writes the file. The
Airflow plugin (``operators/report_plugin.py``) serves :func:`render` of ``collect`` for a run's *Report* tab.
"""

from __future__ import annotations

import base64
import html
import io as stdio
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from distilled_plugins.core import cli
from distilled_plugins.core.io import atomic_path, iter_jsonl
from distilled_plugins.core.schema import (
    STATS_DROPPED,
    STATS_FILE,
    STATS_ROWS_IN,
    STATS_ROWS_OUT,
    STATS_SPEND,
    STATS_SPENT_TOTAL,
    STATS_SUFFIX,
    stats_path,
)
from distilled_plugins.core.settings import from_args, setting

logger = logging.getLogger(__name__)

REPORT_FILE = "report/report.html"  # inside the run folder
ROWS_CACHE = "report/rows.json"  # the per-row scan's result, with the sizes and times of the files it read
GROUP_COLUMNS = ("level", "subject", "source")  # seed columns acceptance is broken down by, where present
# artifacts of the DAG's tasks inside a run folder ({output_root}/distill_r1/{run_id}/{task_id}/...)
SHARD_STATS = f"generate/shard-*{STATS_SUFFIX}"
MERGED = "merge/generations.jsonl"
FILTERED = "reject_sampling/filtered.jsonl"
HANDLED = "handle"
PACKED = "pack"
FINETUNE_JOBS = "finetune/job-*"
EVALUATION = "evaluate/report.json"
DECISION = "approve_finetune/decision.json"  # the approval gate's record (operators/approval.py)
# a run started at the packed dataset entry point: the folder it trains on (operators/sources.from_packed)
PACKED_ENTRY = "from_packed/packed_dataset.json"


@dataclass
class ReportConfig:
    run_dir: str = setting(help="the run's folder: {output_root}/distill_r1/{run_id}", required=True)
    dst: str | None = setting(None, help=f"output HTML file (default: {{run_dir}}/{REPORT_FILE})")
    previous: str | None = setting(
        None,
        help="run folder to compare MATH-500 with (default: the latest other run beside this one whose "
        "evaluation report was written before this run's)",
    )


# ---- figures ----------------------------------------------------------------------------------------------------


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (a run in progress) or being replaced
        return None


def _stage(stats: dict | None) -> dict | None:
    if stats is None:
        return None
    return {"rows_in": stats[STATS_ROWS_IN], "rows_out": stats[STATS_ROWS_OUT], "dropped": stats[STATS_DROPPED]}


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


def _signature(path: Path) -> list | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _scan_rows(run_dir: Path) -> dict:
    """:func:`_scan_rows_now`, kept in ``report/rows.json`` while the two files it read are unchanged: the pass
    over a large run's generations is made once, not at every look at its Report tab (a process that may not
    write there, such as a read-only API server, just scans again)."""
    cache = run_dir / ROWS_CACHE
    inputs = {name: _signature(run_dir / name) for name in (MERGED, FILTERED)}
    cached = _json(cache)
    if cached and cached.get("inputs") == inputs:
        return cached["rows"]
    rows = _scan_rows_now(run_dir)
    if inputs[MERGED] is not None:
        try:
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps({"inputs": inputs, "rows": rows}))
        except OSError as e:
            logger.debug("%s not written: %s", cache, e)
    return rows


def _scan_rows_now(run_dir: Path) -> dict:
    """Acceptance by seed column (merged rows vs kept rows) and the teacher's completion lengths, in one streaming
    pass over each file (flat in memory whatever the row count, but for one integer per completion)."""
    merged, filtered = run_dir / MERGED, run_dir / FILTERED
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    lengths: list[int] = []
    finish = Counter()
    if merged.exists():
        for _, row in iter_jsonl(merged):
            for column in GROUP_COLUMNS:
                if row.get(column) is not None:
                    groups[column][str(row[column])][0] += 1
            for usage, reason in zip(row.get("api_metadata") or [], row.get("finish_reasons") or [], strict=False):
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    lengths.append(int(usage["completion_tokens"]))
                finish[str(reason)] += 1
    if filtered.exists() and merged.exists():
        for _, row in iter_jsonl(filtered):
            for column in GROUP_COLUMNS:
                if row.get(column) is not None:
                    groups[column][str(row[column])][1] += 1
    acceptance = {
        column: {
            value: {"rows": n, "kept": kept, "accepted": round(kept / n, 4) if n else 0.0}
            for value, (n, kept) in sorted(values.items())
        }
        for column, values in groups.items()
    }
    return {"acceptance": acceptance, "completion_tokens": lengths, "finish_reasons": dict(finish)}


def _training(run_dir: Path, packed: dict | None, evaluation: dict | None) -> dict | None:
    jobs = sorted(run_dir.glob(FINETUNE_JOBS), key=lambda p: p.stat().st_mtime)
    if not jobs:
        return None
    job = jobs[-1]  # the newest: training now, or the last one
    evaluated = Path(evaluation["checkpoint"]) if evaluation and evaluation.get("checkpoint") else None
    if evaluated is not None and (run_dir / EVALUATION).stat().st_mtime >= job.stat().st_mtime:
        # evaluated after the newest job began: the figures are of the job whose checkpoint was evaluated
        job = next((j for j in jobs if evaluated.is_relative_to(j)), job)
    metrics = _json(job / "metrics.json")
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


def collect(run_dir: str | Path, previous: str | Path | None = None) -> dict:
    """Every figure of the report, read from the run folder's artifacts (missing ones: ``None``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (expected {{output_root}}/distill_r1/{{run_id}})")
    shards = [s for p in sorted(run_dir.glob(SHARD_STATS)) if (s := _json(p)) is not None]
    merged = _json(stats_path(run_dir / MERGED))
    filtered = _json(stats_path(run_dir / FILTERED))
    handled = _json(run_dir / HANDLED / STATS_FILE)
    packed = _json(run_dir / PACKED / STATS_FILE)
    if packed is None and (entry := _json(run_dir / PACKED_ENTRY)) is not None:
        packed = _json(Path(entry["path"]) / STATS_FILE)  # packed elsewhere, before this run
    evaluation = _json(run_dir / EVALUATION)
    previous = Path(previous) if previous else previous_run(run_dir)
    previous_eval = _json(previous / EVALUATION) if previous else None
    teacher = teacher_figures(shards, merged)
    training = _training(run_dir, packed, evaluation)
    funnel = [
        ("seed rows", teacher["seed_rows"]),
        ("generated", merged["rows_out"] if merged else None),
        ("kept", filtered["rows_out"] if filtered else None),
        ("handled", handled["rows_out"] if handled else None),
        ("packed rows", packed["packs"] if packed else None),
        ("trained tokens", training.get("trained_tokens") if training else None),
    ]
    graded = filtered.get("generations_graded", 0) if filtered else 0
    truncated = filtered.get("rejected_generations", {}).get("truncated", 0) if filtered else 0
    return {
        "run_dir": str(run_dir),
        "run_id": run_dir.name,
        "funnel": funnel,
        "stages": {
            "generate": _stage(
                {
                    "rows_in": sum(s["rows_in"] for s in shards),
                    "rows_out": sum(s["rows_out"] for s in shards),
                    "dropped": dict(sum((Counter(s["dropped"]) for s in shards), Counter())),
                }
                if shards
                else None
            ),
            "merge": _stage(merged),
            "reject_sampling": _stage(filtered),
            "handle": _stage(handled),
            "pack": _stage(packed),
        },
        "teacher": teacher,
        "grading": None
        if filtered is None
        else {
            "generations_graded": graded,
            "generations_correct": filtered.get("generations_correct", 0),
            "rejected_generations": filtered.get("rejected_generations", {}),
            "truncated_share": round(truncated / graded, 4) if graded else 0.0,
            "judge": filtered.get("judge"),  # the LLM judge's stats, where rejection sampling had one
        },
        "lengths": None
        if handled is None
        else {
            "percentiles": handled.get("length_percentiles", {}),
            "max_length": handled.get("max_length"),
            "truncated_by_handle": handled.get("truncated", 0),
            "seq_length": packed.get("seq_length") if packed else None,
            "max_tokens": teacher["max_tokens"],
            "chart_png": _png(run_dir / HANDLED / "lengths.png"),
        },
        "packing": None
        if packed is None
        else {
            key: packed.get(key)
            for key in ("packs", "packs_lower_bound", "efficiency", "tokens", "seq_length", "overlong_policy")
        }
        | {"samples_per_pack": packed.get("samples_per_pack", {}), "overlong": packed.get("overlong", {})},
        "training": training,
        "evaluation": evaluation,
        "previous": {"run_id": previous.name, "evaluation": previous_eval} if previous_eval else None,
        "decision": _json(run_dir / DECISION),
        **_scan_rows(run_dir),
    }


def _png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def data_summary(figures: dict) -> dict:
    """The figures a person approves fine-tuning on (the approval gate's body): kept rows, tokens, truncated share,
    teacher cost."""
    packing, grading, teacher = figures["packing"] or {}, figures["grading"] or {}, figures["teacher"]
    return {
        "kept_rows": dict(figures["funnel"])["kept"],
        "packed_rows": packing.get("packs"),
        "tokens": packing.get("tokens"),
        "truncated_share": grading.get("truncated_share"),
        "teacher_cost": teacher["cost_estimate"],
        "teacher_tokens": teacher.get("prompt_tokens", 0) + teacher.get("completion_tokens", 0),
    }


# ---- charts (matplotlib, inlined as SVG) --------------------------------------------------------------------------


def _svg(fig) -> str:
    buffer = stdio.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG sits inside the HTML


def _figure(width: float = 6.4, height: float = 3.2):
    """A figure of matplotlib's object API, not pyplot's global state: the API server renders reports of several
    requests at once, in threads."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def funnel_chart(funnel: list[tuple[str, int | None]]) -> str | None:
    rows = [(name, n) for name, n in funnel if n is not None and name != "trained tokens"]
    if not rows:
        return None
    fig, ax = _figure(6.4, 0.5 + 0.45 * len(rows))
    ax.barh([n for n, _ in rows][::-1], [v for _, v in rows][::-1], color="#4c72b0")
    for i, (_, v) in enumerate(rows[::-1]):
        ax.text(v, i, f" {v:,}", va="center", fontsize=9)
    ax.set_title("Rows through the stages")
    ax.margins(x=0.15)
    return _svg(fig)


def length_chart(lengths: list[int], max_tokens: int | None, seq_length: int | None) -> str | None:
    if not lengths:
        return None
    fig, ax = _figure()
    ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#55a868")
    for value, label, color in ((max_tokens, "max_tokens", "#c44e52"), (seq_length, "seq_length", "#8172b2")):
        if value:
            ax.axvline(value, color=color, linestyle="--", linewidth=1, label=f"{label} {value:,}")
    ax.set_xlabel("completion tokens (teacher's usage)")
    ax.set_ylabel("completions")
    ax.set_title("Teacher completion lengths")
    ax.legend(fontsize=8)
    return _svg(fig)


def loss_chart(steps: list[dict]) -> str | None:
    if not steps:
        return None
    fig, ax = _figure()
    xs = [(s["epoch"] - 1) * s["steps_per_epoch"] + s["step"] for s in steps]
    ax.plot(xs, [s["loss"] for s in steps], marker=".", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (worker 0)")
    ax.set_title("Fine-tuning loss")
    return _svg(fig)


def level_chart(evaluation: dict, previous: dict | None) -> str | None:
    levels = evaluation.get("by_level") or {}
    if not levels:
        return None
    fig, ax = _figure()
    names = list(levels)
    xs = range(len(names))
    width = 0.4 if previous else 0.8
    ax.bar(
        [x - (width / 2 if previous else 0) for x in xs],
        [levels[n]["accuracy"] for n in names],
        width,
        label="this run",
    )
    if previous:
        before = previous["evaluation"].get("by_level", {})
        ax.bar(
            [x + width / 2 for x in xs],
            [before.get(n, {}).get("accuracy", 0) for n in names],
            width,
            label=f"previous ({previous['run_id']})",
            color="#999999",
        )
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), [f"level {n}" for n in names])
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(f"MATH-500 by level (pass@1 {evaluation['pass@1']:.1f}%)")
    return _svg(fig)


def acceptance_chart(column: str, values: dict) -> str | None:
    if len(values) < 2:
        return None
    fig, ax = _figure(6.4, 0.6 + 0.35 * len(values))
    names = list(values)
    ax.barh(names[::-1], [100 * values[n]["accepted"] for n in names][::-1], color="#dd8452")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of rows kept by rejection sampling")
    ax.set_title(f"Acceptance by {column}")
    return _svg(fig)


# ---- HTML ---------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; padding-top: .6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f4f4; text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; } figure { margin: 0; }
figure svg, figure img { max-width: 640px; height: auto; } .missing { color: #888; font-style: italic; }
.decision { padding: .6em 1em; border-radius: 4px; margin: .5em 0; }
.approved { background: #e6f4ea; } .rejected { background: #fce8e6; font-weight: bold; }
"""


def _cell(value, figure: str | None = None) -> str:
    tag = f' data-figure="{html.escape(figure)}"' if figure else ""
    if isinstance(value, float):
        text = f"{value:,.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = html.escape("" if value is None else str(value))
    cls = ' class="n"' if isinstance(value, (int, float)) else ""
    return f"<td{cls}{tag}>{text}</td>"


def _table(rows: list[tuple[str, object, str | None]], header: tuple[str, str] = ("", "")) -> str:
    body = "".join(f"<tr><th>{html.escape(label)}</th>{_cell(value, figure)}</tr>" for label, value, figure in rows)
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if any(header) else ""
    return f"<table>{head}{body}</table>"


def _chart(svg: str | None) -> str:
    return f'<figure class="chart">{svg}</figure>' if svg else ""


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _judge_section(judge: dict) -> str:
    """The LLM judge's verdicts on what math_verify rejected (and on its audit sample), and the two's agreement."""
    title = f"The judge: {judge['model']}, prompt {judge['prompt_version']}, policy {judge['policy']}"
    rows = [
        ("generations asked about", judge["requests"] + judge["from_cache"], None),
        ("answered from its cache", judge["from_cache"], "judge.from_cache"),
        ("recovered (math_verify rejected, judge: yes)", judge["recovered"], "judge.recovered"),
        ("confirmed wrong", judge["confirmed_wrong"], "judge.confirmed_wrong"),
        ("unparseable replies (counted as no)", judge["unparseable"], "judge.unparseable"),
        ("failed requests (not kept)", judge["errors"], "judge.errors"),
        ("generations kept thanks to it", judge["generations_added"], "judge.generations_added"),
        ("problems kept thanks to it", judge["rows_added"], "judge.rows_added"),
        ("audited (math_verify accepted)", judge["audited"], "judge.audited"),
        ("cost estimate ($)", judge.get("cost_estimate"), "judge.cost_estimate"),
    ]
    agreement = judge.get("agreement", {})
    cells = "".join(
        f"<tr><th>{html.escape(side.replace('_', ' '))}</th>"
        f"{_cell(counts.get('judge_yes'), f'judge.agreement.{side}.yes')}"
        f"{_cell(counts.get('judge_no'), f'judge.agreement.{side}.no')}</tr>"
        for side, counts in agreement.items()
    )
    table = f"<table><tr><th></th><th>judge: yes</th><th>judge: no</th></tr>{cells}</table>" if cells else ""
    return f"<h3>{html.escape(title)}</h3>" + f'<div class="row">{_table(rows)}{table}</div>'


def render(figures: dict) -> str:
    """The report page of :func:`collect`'s figures."""
    parts = [f"<h1>Distillation report: {html.escape(figures['run_id'])}</h1>"]
    parts.append(f"<p>Run folder <code>{html.escape(figures['run_dir'])}</code></p>")
    decision = figures["decision"]
    if decision:
        approved = decision.get("approved")
        who = decision.get("responded_by") or "nobody (the timeout's default)"
        when = html.escape(str(decision.get("responded_at", "")))
        parts.append(
            f'<p class="decision {"approved" if approved else "rejected"}" data-figure="decision.chosen">'
            f"{html.escape(decision.get('chosen') or '')}: fine-tuning {'approved' if approved else 'rejected'} by "
            f"{html.escape(who)} at {when}{'' if approved else '; the run ended without training'}</p>"
        )

    # funnel and drops
    parts.append("<h2>Funnel: rows through the stages</h2>")
    funnel_rows = [(name, n, f"funnel.{name.replace(' ', '_')}") for name, n in figures["funnel"]]
    parts.append(f'<div class="row">{_chart(funnel_chart(figures["funnel"]))}{_table(funnel_rows)}</div>')
    drops = []
    for stage, s in figures["stages"].items():
        if s is None:
            continue
        reasons = ", ".join(f"{r} {n:,}" for r, n in s["dropped"].items() if n) or "none"
        drops.append(
            f"<tr><th>{stage}</th>{_cell(s['rows_in'], f'{stage}.rows_in')}{_cell(s['rows_out'], f'{stage}.rows_out')}"
            f"{_cell(sum(s['dropped'].values()), f'{stage}.dropped')}<td>{html.escape(reasons)}</td></tr>"
        )
    if drops:
        parts.append(
            "<table><tr><th>stage</th><th>rows in</th><th>rows out</th><th>dropped</th><th>by reason</th></tr>"
            + "".join(drops)
            + "</table>"
        )
    else:
        parts.append(_missing("No stage has finished yet."))

    # acceptance by group
    acceptance = figures["acceptance"]
    if acceptance:
        parts.append("<h2>Acceptance by seed column</h2>")
        for column, values in acceptance.items():
            rows = "".join(
                f"<tr><th>{html.escape(v)}</th>{_cell(a['rows'])}{_cell(a['kept'])}"
                f"{_cell(round(100 * a['accepted'], 1), f'acceptance.{column}.{v}')}</tr>"
                for v, a in values.items()
            )
            table = f"<table><tr><th>{column}</th><th>rows</th><th>kept</th><th>kept %</th></tr>{rows}</table>"
            parts.append(f'<div class="row">{_chart(acceptance_chart(column, values))}{table}</div>')

    # lengths
    parts.append("<h2>Lengths: teacher completions, max_tokens and seq_length</h2>")
    lengths, grading = figures["lengths"], figures["grading"]
    completion = figures["completion_tokens"]
    rows = []
    if completion:
        ordered = sorted(completion)
        rows += [
            ("completions", len(ordered), "lengths.completions"),
            ("median completion tokens", ordered[len(ordered) // 2], "lengths.completion_p50"),
            ("longest completion", ordered[-1], "lengths.completion_max"),
            ("finished by length (max_tokens)", figures["finish_reasons"].get("length", 0), "lengths.finish_length"),
        ]
    if grading:
        rows.append(("truncated share (graded)", grading["truncated_share"], "grading.truncated_share"))
    if lengths:
        rows += [
            ("max_tokens (teacher)", lengths["max_tokens"], "lengths.max_tokens"),
            ("max_length (handle)", lengths["max_length"], "lengths.max_length"),
            ("seq_length (pack)", lengths["seq_length"], "lengths.seq_length"),
            ("samples truncated by handle", lengths["truncated_by_handle"], "lengths.truncated_by_handle"),
        ]
        rows += [(f"sample tokens {k}", v, f"lengths.{k}") for k, v in lengths["percentiles"].items()]
    if rows:
        chart = _chart(length_chart(completion, lengths and lengths["max_tokens"], lengths and lengths["seq_length"]))
        png = (
            f'<figure><img alt="tokenized sample lengths" src="data:image/png;base64,{lengths["chart_png"]}"></figure>'
            if lengths and lengths["chart_png"]
            else ""
        )
        parts.append(f'<div class="row">{chart}{_table(rows)}{png}</div>')
    else:
        parts.append(_missing("No generations yet."))

    # teacher
    teacher = figures["teacher"]
    parts.append("<h2>Teacher</h2>")
    if teacher["shards"]:
        parts.append(
            _table(
                [
                    ("model", teacher["model"], "teacher.model"),
                    ("mode", teacher["mode"], "teacher.mode"),
                    ("batches", ", ".join(teacher["batches"]) or "none", "teacher.batches"),
                    ("generation shards", teacher["shards"], "teacher.shards"),
                    ("requests sent", teacher["requests_sent"], "teacher.requests_sent"),
                    ("completions received", teacher["completions_ok"], "teacher.completions_ok"),
                    ("retries (last try of each shard)", teacher["retries"], "teacher.retries"),
                    ("failed requests (last try of each shard)", teacher["failed_requests"], "teacher.failed_requests"),
                    ("prompt tokens", teacher["prompt_tokens"], "teacher.prompt_tokens"),
                    ("completion tokens", teacher["completion_tokens"], "teacher.completion_tokens"),
                    ("rows reused from the store", teacher["rows_reused_from_store"], "teacher.rows_reused"),
                    ("reused share", teacher["reused_share"], "teacher.reused_share"),
                    ("cost estimate", teacher["cost_estimate"], "teacher.cost_estimate"),
                    ("budget reached", "yes" if teacher["budget_reached"] else "no", None),
                ]
            )
        )
    else:
        parts.append(_missing("No generation shard has finished yet."))

    # grading
    parts.append("<h2>Grading (rejection sampling: math_verify, and the judge where it ran)</h2>")
    if grading:
        rows = [
            ("generations graded", grading["generations_graded"], "grading.generations_graded"),
            ("correct", grading["generations_correct"], "grading.generations_correct"),
        ]
        rows += [(f"rejected: {k}", v, f"grading.rejected.{k}") for k, v in grading["rejected_generations"].items()]
        parts.append(_table(rows))
        if grading.get("judge"):
            parts.append(_judge_section(grading["judge"]))
    else:
        parts.append(_missing("Rejection sampling has not finished yet."))

    # packing
    packing = figures["packing"]
    parts.append("<h2>Packing</h2>")
    if packing:
        rows = [
            ("packed rows", packing["packs"], "packing.packs"),
            ("lower bound of rows", packing["packs_lower_bound"], "packing.packs_lower_bound"),
            ("efficiency (tokens / slots)", packing["efficiency"], "packing.efficiency"),
            ("tokens", packing["tokens"], "packing.tokens"),
            ("seq_length", packing["seq_length"], "packing.seq_length"),
            ("samples per row (mean)", packing["samples_per_pack"].get("mean"), "packing.samples_per_pack_mean"),
            (
                f"overlong samples ({packing['overlong_policy']})",
                sum(v for k, v in packing["overlong"].items() if k != "split_pieces"),
                "packing.overlong",
            ),
        ]
        parts.append(_table(rows))
    else:
        parts.append(_missing("Packing has not finished yet."))

    # training
    training = figures["training"]
    parts.append("<h2>Fine-tuning</h2>")
    if training:
        rows = [("job", training["job"], None), ("steps recorded", len(training["steps"]), "training.steps")]
        if training["finished"]:
            rows += [
                ("first loss", training["first_loss"], "training.first_loss"),
                ("final loss", training["final_loss"], "training.final_loss"),
                ("epochs", training["epochs"], "training.epochs"),
                ("trained tokens", training["trained_tokens"], "training.trained_tokens"),
                ("median step time (ms)", training["median_step_time_ms"], "training.median_step_time_ms"),
                ("tokens/s (all workers)", training["tokens_per_s"], "training.tokens_per_s"),
            ]
        else:
            rows.append(("state", "running", None))
        parts.append(f'<div class="row">{_chart(loss_chart(training["steps"]))}{_table(rows)}</div>')
    elif decision and not decision.get("approved"):
        parts.append(_missing("Not trained: fine-tuning was rejected at the approval gate."))
    else:
        parts.append(_missing("Fine-tuning has not started yet."))

    # evaluation
    evaluation, previous = figures["evaluation"], figures["previous"]
    parts.append("<h2>MATH-500</h2>")
    if evaluation:
        low, high = evaluation.get("ci95", [None, None])
        rows = [
            ("pass@1 %", evaluation["pass@1"], "evaluation.pass@1"),
            ("95% interval", f"{low} – {high}", "evaluation.ci95"),
            ("problems", evaluation["problems"], "evaluation.problems"),
            ("samples", evaluation["samples"], "evaluation.samples"),
        ]
        if previous:
            before = previous["evaluation"]["pass@1"]
            rows += [
                (f"previous run {previous['run_id']}", before, "previous.pass@1"),
                ("difference (points)", round(evaluation["pass@1"] - before, 2), "previous.difference"),
            ]
        levels = "".join(
            f"<tr><th>level {html.escape(str(k))}</th>{_cell(v['problems'])}"
            f"{_cell(v['accuracy'], f'evaluation.level.{k}')}"
            f"{_cell(previous['evaluation'].get('by_level', {}).get(k, {}).get('accuracy')) if previous else ''}</tr>"
            for k, v in evaluation.get("by_level", {}).items()
        )
        level_table = (
            "<table><tr><th>level</th><th>problems</th><th>accuracy %</th>"
            + ("<th>previous %</th>" if previous else "")
            + f"</tr>{levels}</table>"
        )
        parts.append(f'<div class="row">{_chart(level_chart(evaluation, previous))}{_table(rows)}{level_table}</div>')
    else:
        parts.append(_missing("Not evaluated yet."))

    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Distillation report {html.escape(figures['run_id'])}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def run(cfg: ReportConfig) -> Path:
    """Write the report of ``cfg.run_dir``; return the HTML file's path."""
    run_dir = Path(cfg.run_dir)
    dst = Path(cfg.dst) if cfg.dst else run_dir / REPORT_FILE
    started = time.monotonic()
    page = render(collect(run_dir, cfg.previous))
    with atomic_path(dst) as tmp:
        tmp.write_text(page)
    logger.info("wrote %s (%d KB) in %.1f s", dst, len(page) // 1024, time.monotonic() - started)
    return dst


def build_parser():
    return cli.stage_parser("distilled_plugins.report", __doc__, ReportConfig)


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    print(run(from_args(ReportConfig, args)))
    return 0
