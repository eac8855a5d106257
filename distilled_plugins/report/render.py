"""The report page: :func:`render` turns :func:`~distilled_plugins.report.collect.collect`'s figures into one
self-contained HTML page, a section per stage, each table cell tagged ``data-figure="<section>.<name>"``."""

from __future__ import annotations

import html

from distilled_plugins.report.charts import acceptance_chart, funnel_chart, length_chart, level_chart, loss_chart

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


def render(figures: dict) -> str:
    """The report page of :func:`~distilled_plugins.report.collect.collect`'s figures."""
    parts = [f"<h1>Distillation report: {html.escape(figures['run_id'])}</h1>"]
    parts.append(f"<p>Run folder <code>{html.escape(figures['run_dir'])}</code></p>")
    for section in SECTIONS:
        parts += section(figures)
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Distillation report {html.escape(figures['run_id'])}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


# Each section: the page's parts for one topic, from the figures (a heading, then its charts and tables).


def _decision_section(figures: dict) -> list[str]:
    """The approval gate's decision, heading the page where the gate was asked."""
    decision = figures["decision"]
    if not decision:
        return []
    approved = decision.get("approved")
    who = decision.get("responded_by") or "nobody (the timeout's default)"
    when = html.escape(str(decision.get("responded_at", "")))
    return [
        f'<p class="decision {"approved" if approved else "rejected"}" data-figure="decision.chosen">'
        f"{html.escape(decision.get('chosen') or '')}: fine-tuning {'approved' if approved else 'rejected'} by "
        f"{html.escape(who)} at {when}{'' if approved else '; the run ended without training'}</p>"
    ]


def _funnel_section(figures: dict) -> list[str]:
    """Rows through the stages, and what each stage dropped and why."""
    parts = ["<h2>Funnel: rows through the stages</h2>"]
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
    return parts


def _acceptance_section(figures: dict) -> list[str]:
    """The share of rows rejection sampling kept, by seed column (none before there are generations)."""
    acceptance = figures["acceptance"]
    if not acceptance:
        return []
    parts = ["<h2>Acceptance by seed column</h2>"]
    for column, values in acceptance.items():
        rows = "".join(
            f"<tr><th>{html.escape(v)}</th>{_cell(a['rows'])}{_cell(a['kept'])}"
            f"{_cell(round(100 * a['accepted'], 1), f'acceptance.{column}.{v}')}</tr>"
            for v, a in values.items()
        )
        table = f"<table><tr><th>{column}</th><th>rows</th><th>kept</th><th>kept %</th></tr>{rows}</table>"
        parts.append(f'<div class="row">{_chart(acceptance_chart(column, values))}{table}</div>')
    return parts


def _lengths_section(figures: dict) -> list[str]:
    """The teacher's completion lengths beside the limits on them (max_tokens, max_length, seq_length)."""
    parts = ["<h2>Lengths: teacher completions, max_tokens and seq_length</h2>"]
    lengths, completion = figures["lengths"], figures["completion_tokens"]
    rows = _length_rows(figures)
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
    return parts


def _length_rows(figures: dict) -> list[tuple[str, object, str | None]]:
    lengths, grading, completion = figures["lengths"], figures["grading"], figures["completion_tokens"]
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
    return rows


def _teacher_section(figures: dict) -> list[str]:
    """What the teacher was asked, answered, retried and cost, over the generation shards."""
    teacher = figures["teacher"]
    if not teacher["shards"]:
        return ["<h2>Teacher</h2>", _missing("No generation shard has finished yet.")]
    rows = [
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
    return ["<h2>Teacher</h2>", _table(rows)]


def _grading_section(figures: dict) -> list[str]:
    """Rejection sampling's verdicts, and the judge's where it ran."""
    grading = figures["grading"]
    parts = ["<h2>Grading (rejection sampling: math_verify, and the judge where it ran)</h2>"]
    if not grading:
        return [*parts, _missing("Rejection sampling has not finished yet.")]
    rows = [
        ("generations graded", grading["generations_graded"], "grading.generations_graded"),
        ("correct", grading["generations_correct"], "grading.generations_correct"),
    ]
    rows += [(f"rejected: {k}", v, f"grading.rejected.{k}") for k, v in grading["rejected_generations"].items()]
    parts.append(_table(rows))
    if grading.get("judge"):
        parts.append(_judge_section(grading["judge"]))
    return parts


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


def _packing_section(figures: dict) -> list[str]:
    """How the samples were packed into rows of seq_length tokens."""
    packing = figures["packing"]
    if not packing:
        return ["<h2>Packing</h2>", _missing("Packing has not finished yet.")]
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
    return ["<h2>Packing</h2>", _table(rows)]


def _training_section(figures: dict) -> list[str]:
    """The fine-tuning job's loss and speed (the steps so far while it runs), or why there is none."""
    training, decision = figures["training"], figures["decision"]
    parts = ["<h2>Fine-tuning</h2>"]
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
    return parts


def _evaluation_section(figures: dict) -> list[str]:
    """MATH-500's pass@1, overall and by level, beside the previous run's."""
    evaluation, previous = figures["evaluation"], figures["previous"]
    if not evaluation:
        return ["<h2>MATH-500</h2>", _missing("Not evaluated yet.")]
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
    chart = _chart(level_chart(evaluation, previous))
    return ["<h2>MATH-500</h2>", f'<div class="row">{chart}{_table(rows)}{_level_table(evaluation, previous)}</div>']


def _level_table(evaluation: dict, previous: dict | None) -> str:
    """Accuracy by MATH level, with the previous run's beside it."""
    levels = "".join(
        f"<tr><th>level {html.escape(str(k))}</th>{_cell(v['problems'])}"
        f"{_cell(v['accuracy'], f'evaluation.level.{k}')}"
        f"{_cell(previous['evaluation'].get('by_level', {}).get(k, {}).get('accuracy')) if previous else ''}</tr>"
        for k, v in evaluation.get("by_level", {}).items()
    )
    return (
        "<table><tr><th>level</th><th>problems</th><th>accuracy %</th>"
        + ("<th>previous %</th>" if previous else "")
        + f"</tr>{levels}</table>"
    )


# the page's sections, in order
SECTIONS = (
    _decision_section,
    _funnel_section,
    _acceptance_section,
    _lengths_section,
    _teacher_section,
    _grading_section,
    _packing_section,
    _training_section,
    _evaluation_section,
)
