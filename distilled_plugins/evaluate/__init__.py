"""Stage 6: MATH-500 evaluation with a stated protocol, a report and a chart.

Usage:
    # an OpenAI-compatible endpoint serving the fine-tuned model (vLLM, vLLM-MindSpore, MindIE):
    python -m distilled_plugins.evaluate --api-addr localhost:8000 --model OpenR1-Qwen-7B --dst eval/
    # mindformers' own generation from the stage 5 checkpoint (the tutorial's way):
    python -m distilled_plugins.evaluate --checkpoint finetune/checkpoint \\
        --mindformers-config configs/finetune_tiny_cpu.yaml --limit 20 --max-new-tokens 64 --dst eval/
    # re-score completions made elsewhere:
    python -m distilled_plugins.evaluate --rescore outputs.jsonl --problem-column question \\
        --gold-column answer --completion-column code --dst eval/

Protocol (open-r1's values by default, all parameters, all written into the report): the system prompt
"Please reason step by step, and put your final answer within \\boxed{}.", temperature 0.6, top_p 0.95, up to
32,768 new tokens, 4 samples per problem, seed 0. pass@1 is the mean over all samples, with a 95% confidence
interval over problems; completions are graded by stage 2's grader (same math_verify semantics, same worker
processes). Completions are kept in ``--dst`` (also ``--out``, ``--output-dir``) under ``completions/<fingerprint>/``,
one folder per source (a checkpoint's files, an endpoint and model) and protocol: a rerun with the same ones requests
only the missing completions, one with another checkpoint makes new ones beside the old.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from distilled_plugins import generate
from distilled_plugins.core import cli, configs, grader
from distilled_plugins.core.configs import child_env
from distilled_plugins.core.errors import ChildFailed, DataError, MissingColumn
from distilled_plugins.core.io import dumps_line, files_state, iter_jsonl, load_rows, read_json, write_json
from distilled_plugins.core.schema import STATS_DROPPED, STATS_FILE, parts_path
from distilled_plugins.core.settings import EVALUATION, add_arguments, from_args, setting
from distilled_plugins.core.stats import Stats
from distilled_plugins.handle import SYSTEM_PROMPT
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import API_KEY_ENV, RequestSettings, RetryPolicy

logger = logging.getLogger(__name__)

MATH500, TOKENIZER = configs.MATH500, configs.QWEN_TOKENIZER
PROBLEM_COLUMNS = ("problem", "answer", "subject", "level", "unique_id")
# why a problem is left out of pass@1 (its denominator is the problems scored)
DROP_REASONS = ("gold_filtered", "no_completions")
REFERENCE = [  # the tutorial's table (MATH-500)
    ("DeepSeek-Distill-Qwen-7B", 91.6),
    ("OpenR1-Qwen-7B (Hugging Face)", 90.6),
    ("OpenR1-Qwen-7B (MindSpore Transformers, tutorial)", 90.0),
    ("OpenThinker-7B", 89.6),
]


@dataclass
class Protocol:
    """How completions are sampled (open-r1's values); every field is written into the report."""

    system_prompt: str = setting(SYSTEM_PROMPT, help="system message before each problem")
    temperature: float = setting(0.6, help="sampling temperature (0: greedy)", minimum=0)
    top_p: float = setting(0.95, help="nucleus sampling top_p", minimum=0, maximum=1)
    max_new_tokens: int = setting(
        32768,
        help="longest completion generated per evaluated sample, in tokens",
        minimum=1,
        maximum=131072,
        title="Longest evaluated completion (tokens)",
        section=EVALUATION,
    )
    n_samples: int = setting(
        4,
        help="completions per problem; pass@1 is averaged over them",
        minimum=1,
        maximum=64,
        title="Samples per problem",
        section=EVALUATION,
    )
    seed: int = setting(0, help="sampling seed")


@dataclass
class EvalConfig:
    """Settings of one evaluation: where the problems and completions come from, and where the report goes."""

    out: str = setting(
        help="folder for completions, scores and the report",
        required=True,
        flag="--dst",
        aliases=("--out", "--output-dir"),
    )
    dataset: str = setting(str(MATH500), help="problems with problem/answer/subject/level/unique_id")
    limit: int | None = setting(
        None,
        help="evaluate the first N problems only (empty: all)",
        minimum=1,
        title="Problems evaluated",
        section=EVALUATION,
    )
    protocol: Protocol = setting(factory=Protocol, help="the sampling protocol (its own flags)", cli=False)
    # completions from an endpoint ...
    api_addr: str | None = setting(
        None, help="endpoint serving the model (host:port or URL; several separated by commas)"
    )
    model: str | None = setting(None, help="model name at the endpoint")
    api_key: str | None = setting(None, help="the endpoint's API key (CLI: from --api-key-env)", cli=False, repr=False)
    endpoints: list[Endpoint] | None = setting(
        None, help="instead of api_addr: endpoints with their own keys, weights and limits", cli=False
    )
    max_concurrent: int = setting(64, help="requests in flight at once (endpoint mode)", minimum=1)
    retry: RetryPolicy = setting(
        None,
        help="a RequestSettings (timeouts, attempts, rate limits, stream, prices), as generate's (its own flags)",
        cli=False,
    )
    # ... or from a checkpoint with mindformers ...
    checkpoint: str | None = setting(None, help="stage 5 checkpoint (file or folder) for mindformers")
    mindformers_config: str | None = setting(None, help="the fine-tune YAML describing the checkpoint's model")
    tokenizer: str = setting(str(TOKENIZER), help="tokenizer folder (checkpoint mode)")
    batch_size: int = setting(64, help="checkpoint mode: sequences decoded together", minimum=1)
    prompt_template: str = setting(
        "{prompt}",
        help="checkpoint mode: the user turn around the problem, as the model was trained (stage 1's template)",
    )
    # ... or re-scored from a file
    rescore: str | None = setting(None, help="JSONL of existing completions to grade")
    problem_column: str = setting("problem", help="rescore: column of the problem text")
    gold_column: str = setting("answer", help="rescore: column of the gold answer")
    completion_column: str = setting("generations", help="rescore: a string or a list of completions")
    # scoring and report
    workers: int | None = setting(None, help="grading processes (default: one per core)", minimum=1)
    baseline: str | None = setting(None, help="report.json of a baseline (e.g. the base model)")
    report_label: str = setting("fine-tuned model", help="the evaluated model's name in the report", flag="--label")
    fresh: bool = setting(
        False,
        help="discard the completions kept for these settings and make them again (completions made with other "
        "settings, e.g. another checkpoint, are kept in their own sub-folder and never mixed in)",
    )

    def __post_init__(self):
        self.protocol = self.protocol or Protocol()
        self.retry = RequestSettings.of(self.retry)
        sources = [bool(self.api_addr or self.endpoints), bool(self.checkpoint), bool(self.rescore)]
        if sum(sources) != 1:
            raise ValueError(
                "give exactly one source of completions: an endpoint (api_addr and model), "
                "a checkpoint (with mindformers_config), or rescore"
            )
        if (self.api_addr or self.endpoints) and not self.model:
            raise ValueError("an endpoint needs the served model's name (--model)")
        if self.checkpoint and not self.mindformers_config:
            raise ValueError("a checkpoint needs the fine-tune YAML that describes its model (--mindformers-config)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.protocol.n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {self.protocol.n_samples}")


def load_problems(path: str | Path, limit: int | None) -> list[dict]:
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: the evaluation set is empty")
    missing = [c for c in PROBLEM_COLUMNS if c not in rows[0]]
    if missing:
        raise MissingColumn(f"{path}: missing column(s) {', '.join(missing)}; columns present: {', '.join(rows[0])}")
    return rows[:limit] if limit else rows


# ---- completions ----------------------------------------------------------------------------------------------


def _problems_file(folder: Path, problems: list[dict]) -> Path:
    path = folder / "problems.jsonl"
    path.write_bytes(b"".join(dumps_line(p) for p in problems))
    return path


def completions_from_endpoint(cfg: EvalConfig, problems: list[dict], folder: Path) -> Path:
    protocol = cfg.protocol
    result = generate.run(
        generate.GenerateConfig(
            dataset_name=str(_problems_file(folder, problems)),
            output_file=str(folder / "completions.jsonl"),
            model=cfg.model,
            prompt_column="problem",
            uuid_column="unique_id",
            api_addr=cfg.api_addr,
            api_key=cfg.api_key,
            endpoints=cfg.endpoints,
            num_generations=protocol.n_samples,
            max_tokens=protocol.max_new_tokens,
            max_concurrent=cfg.max_concurrent,
            temperature=protocol.temperature,
            top_p=protocol.top_p,
            prompt_template="{prompt}",
            system_prompt=protocol.system_prompt,
            seed=protocol.seed,
            retry=cfg.retry,
        )
    )
    return result.output_file


def completions_from_checkpoint(cfg: EvalConfig, problems: list[dict], folder: Path) -> Path:
    protocol = cfg.protocol
    output = folder / "completions.jsonl"
    command = [
        sys.executable,
        "-m",
        "distilled_plugins.in_mindformers.mf_generate",
        "--config",
        cfg.mindformers_config,
        "--checkpoint",
        cfg.checkpoint,
        "--tokenizer",
        cfg.tokenizer,
        "--problems",
        str(_problems_file(folder, problems)),
        "--output",
        str(output),
        "--system-prompt",
        protocol.system_prompt,
        "--num-samples",
        str(protocol.n_samples),
        "--max-new-tokens",
        str(protocol.max_new_tokens),
        "--temperature",
        str(protocol.temperature),
        "--top-p",
        str(protocol.top_p),
        "--seed",
        str(protocol.seed),
        "--batch-size",
        str(cfg.batch_size),
        "--prompt-template",
        cfg.prompt_template,
    ]
    env_log = Path(cfg.out) / "mindformers"
    env = child_env()  # no Airflow secrets, no API keys
    env.update(LOG_MF_PATH=str(env_log / "log"), LOCAL_DEFAULT_PATH=str(env_log))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    # the generation's own lines (progress every few seconds) go to this log as they come; mindformers' and
    # mindspore's chatter stays in the tail kept for an error message
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if " distilled_plugins." in line:
                logger.info("mf_generate: %s", line.split(": ", 1)[-1])
    if proc.returncode != 0:
        raise ChildFailed(
            f"mindformers generation from {cfg.checkpoint} failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )
    return output


# ---- scoring --------------------------------------------------------------------------------------------------


@dataclass
class Scored:
    key: str
    level: str
    subject: str
    verdicts: list[str]


def _rows_to_score(cfg: EvalConfig, completions: Path, problems: list[dict] | None, excluded: Stats) -> list[dict]:
    """Rows of ``{key, problem, gold, level, subject, completions, finish_reasons}`` in problem order.

    Problems that cannot be scored (an unusable gold, no completions) are left out and counted in ``excluded``.
    """
    if cfg.rescore:
        by_problem = {p["problem"]: p for p in load_rows(cfg.dataset)} if Path(cfg.dataset).exists() else {}
        rows = []
        for lineno, row in iter_jsonl(completions):
            excluded.read()
            for column in (cfg.problem_column, cfg.gold_column, cfg.completion_column):
                if column not in row:
                    raise DataError(
                        f"{completions}:{lineno}: missing column {column!r}; columns present: {', '.join(row)}"
                    )
            texts = row[cfg.completion_column]
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise DataError(
                    f"{completions}:{lineno}: {cfg.completion_column!r} must be a string or a list of strings, "
                    f"got {type(texts).__name__}"
                )
            if grader.gold_is_filtered(row[cfg.gold_column]):
                excluded.drop("gold_filtered")  # proof / notfound / empty: nothing to check against
                continue
            if not texts:
                excluded.drop("no_completions")
                continue
            excluded.keep()
            known = by_problem.get(row[cfg.problem_column], {})
            rows.append(
                {
                    "key": str(row.get("unique_id") or known.get("unique_id") or lineno),
                    "problem": row[cfg.problem_column],
                    "gold": str(row[cfg.gold_column]),
                    "level": str(row.get("level") or known.get("level") or "unknown"),
                    "subject": str(row.get("subject") or known.get("subject") or "unknown"),
                    "completions": texts,
                    "finish_reasons": row.get("finish_reasons") or [None] * len(texts),
                }
            )
        if not rows:
            raise DataError(f"{completions}: no completions to score ({excluded.summary()})")
        return rows
    by_key = {str(r["unique_id"]): r for _, r in iter_jsonl(completions)}
    rows = []
    for p in problems:
        excluded.read()
        got = by_key.get(str(p["unique_id"]))
        if got is None:
            raise DataError(f"{completions}: no completions for problem {p['unique_id']}")
        if grader.gold_is_filtered(p["answer"]):
            excluded.drop("gold_filtered")
            continue
        excluded.keep()
        rows.append(
            {
                "key": str(p["unique_id"]),
                "problem": p["problem"],
                "gold": str(p["answer"]),
                "level": str(p["level"]),
                "subject": str(p["subject"]),
                "completions": got["generations"],
                "finish_reasons": got.get("finish_reasons") or [None] * len(got["generations"]),
            }
        )
    return rows


def score(rows: list[dict], workers: int | None, scored_path: Path) -> list[Scored]:
    samples = (
        grader.Sample((i, j), row["gold"], text, row["finish_reasons"][j])
        for i, row in enumerate(rows)
        for j, text in enumerate(row["completions"])
    )
    verdicts: dict[tuple[int, int], grader.Verdict] = {}
    with grader.GradingPool(workers) as pool:
        for verdict in pool.grade(samples):
            verdicts[verdict.id] = verdict
    scored = []
    with open(scored_path, "wb") as f:
        for i, row in enumerate(rows):
            row_verdicts = [verdicts[(i, j)] for j in range(len(row["completions"]))]
            scored.append(Scored(row["key"], row["level"], row["subject"], [v.verdict for v in row_verdicts]))
            for j, v in enumerate(row_verdicts):
                f.write(dumps_line({"key": row["key"], "sample": j, "verdict": v.verdict, "reason": v.reason}))
    return scored


def _accuracy(items: list[Scored]) -> dict:
    samples = sum(len(s.verdicts) for s in items)
    correct = sum(v == grader.CORRECT for s in items for v in s.verdicts)
    return {
        "problems": len(items),
        "samples": samples,
        "correct": correct,
        "accuracy": round(100.0 * correct / samples, 2) if samples else 0.0,
    }


def summarize(scored: list[Scored]) -> dict:
    overall = _accuracy(scored)
    per_problem = [sum(v == grader.CORRECT for v in s.verdicts) / len(s.verdicts) for s in scored if s.verdicts]
    n = len(per_problem)
    if n == 0:
        raise DataError("no problem has a completion to score")
    mean = sum(per_problem) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in per_problem) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n) if n else 0.0
    groups = {"by_level": defaultdict(list), "by_subject": defaultdict(list)}
    for s in scored:
        groups["by_level"][s.level].append(s)
        groups["by_subject"][s.subject].append(s)
    verdict_counts = defaultdict(int)
    for s in scored:
        for v in s.verdicts:
            verdict_counts[v] += 1
    return {
        "pass@1": round(100.0 * mean, 2),
        "ci95": [round(100.0 * max(0.0, mean - half), 2), round(100.0 * min(1.0, mean + half), 2)],
        **{k: overall[k] for k in ("problems", "samples", "correct")},
        "truncated": verdict_counts.get(grader.TRUNCATED, 0),
        "verdicts": dict(sorted(verdict_counts.items())),
        "by_level": {k: _accuracy(v) for k, v in sorted(groups["by_level"].items())},
        "by_subject": {k: _accuracy(v) for k, v in sorted(groups["by_subject"].items())},
    }


# ---- report ---------------------------------------------------------------------------------------------------


def _chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    for ax, key, title in ((axes[0], "by_level", "Accuracy by level"), (axes[1], "by_subject", "Accuracy by subject")):
        names = list(report[key])
        values = [report[key][n]["accuracy"] for n in names]
        ax.bar(range(len(names)), values, color="#4c72b0")
        ax.set_xticks(
            range(len(names)),
            names,
            rotation=30 if key == "by_subject" else 0,
            ha="right" if key == "by_subject" else "center",
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.axhline(report["pass@1"], color="#c44e52", linestyle="--", linewidth=1)
    fig.suptitle(f"MATH-500 pass@1 {report['pass@1']:.1f}% ({report['label']}, n={report['protocol']['n_samples']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# MATH-500 evaluation: {report['label']}",
        "",
        f"**pass@1 {report['pass@1']:.1f}%** (95% CI {report['ci95'][0]:.1f}-{report['ci95'][1]:.1f}) over "
        f"{report['problems']} problems x {p['n_samples']} samples; {report['truncated']} truncated."
        + (
            f" Left out of pass@1: {', '.join(f'{n} ({k})' for k, n in report['excluded'].items())}."
            if report.get("excluded")
            else ""
        ),
        "",
        "## Protocol",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {json.dumps(v, ensure_ascii=False)} |" for k, v in p.items()],
        "",
        "## By level",
        "",
        "| level | problems | samples | accuracy |",
        "|---|---|---|---|",
        *[f"| {k} | {v['problems']} | {v['samples']} | {v['accuracy']:.1f} |" for k, v in report["by_level"].items()],
        "",
        "## By subject",
        "",
        "| subject | problems | samples | accuracy |",
        "|---|---|---|---|",
        *[f"| {k} | {v['problems']} | {v['samples']} | {v['accuracy']:.1f} |" for k, v in report["by_subject"].items()],
        "",
        "## Beside the tutorial's table",
        "",
        "| model | MATH-500 |",
        "|---|---|",
        *[f"| {name} | {score:.1f} |" for name, score in REFERENCE],
        f"| **{report['label']} (this run)** | **{report['pass@1']:.1f}** |",
    ]
    if report.get("baseline"):
        b = report["baseline"]
        lines += [
            "",
            "## Against the baseline",
            "",
            f"Baseline {b['label']}: {b['pass@1']:.1f}; difference **{b['difference']:+.1f}** points.",
        ]
    lines += ["", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


SETTINGS_FILE = "settings.json"  # what the completions in a completions folder were made with
COMPLETIONS_DIR = "completions"  # under the output folder: one sub-folder per settings fingerprint


def settings_fingerprint(cfg: EvalConfig) -> dict:
    """What the stored completions depend on: their source (for a checkpoint, its files' names, sizes and mtimes:
    a new fine-tune into the same folder is another model), the sampling protocol, the problems."""
    return {
        "source": {"endpoints": sorted(e.addr for e in cfg.endpoints or []) or [cfg.api_addr], "model": cfg.model}
        if cfg.api_addr or cfg.endpoints
        else {
            "checkpoint": cfg.checkpoint,
            "checkpoint_files": files_state(Path(cfg.checkpoint)),
            "mindformers_config": cfg.mindformers_config,
            "tokenizer": cfg.tokenizer,
        }
        if cfg.checkpoint
        else {"rescore": cfg.rescore},
        "protocol": asdict(cfg.protocol),
        "dataset": str(cfg.dataset),
        "limit": cfg.limit,
    }


def completions_folder(cfg: EvalConfig) -> Path:
    """The folder of the completions made with these settings: ``<out>/completions/<fingerprint>/``, created with
    its ``settings.json``. Completions made with other settings (an earlier checkpoint, other sampling) stay in
    their own folders, kept aside and never mixed in, so evaluating the same checkpoint again reuses its
    completions and evaluating a new one makes new ones; ``fresh`` discards those of these settings."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --dst is an existing file; give a folder")
    wanted = settings_fingerprint(cfg)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = out / COMPLETIONS_DIR / digest
    folder.mkdir(parents=True, exist_ok=True)
    stored = [p for p in (folder / "completions.jsonl", parts_path(folder / "completions.jsonl")) if p.exists()]
    if stored and cfg.fresh:
        logger.info("--fresh: discarding the completions in %s", folder)
        for path in stored:
            path.unlink()
    elif stored:
        logger.info("reusing the completions in %s (made with these settings)", folder)
    write_json(folder / SETTINGS_FILE, wanted)
    return folder


def _read_baseline(path: str) -> dict:
    baseline = read_json(path, "baseline report")
    if not isinstance(baseline.get("pass@1"), (int, float)):
        raise DataError(f"{path}: not an evaluation report (no numeric 'pass@1'); give a report.json of this stage")
    return baseline


def run(cfg: EvalConfig) -> Path:
    """Get completions, grade them and write ``report.json``, ``report.md`` and ``accuracy.png`` in ``cfg.out``."""
    out = Path(cfg.out)
    base = _read_baseline(cfg.baseline) if cfg.baseline else None  # checked before hours of generation
    folder = completions_folder(cfg)
    problems = None
    if cfg.rescore:
        completions = Path(cfg.rescore)
        if not completions.is_file():
            raise DataError(f"{completions}: no such file")
    else:
        problems = load_problems(cfg.dataset, cfg.limit)
        from_endpoint = cfg.api_addr or cfg.endpoints
        completions = (completions_from_endpoint if from_endpoint else completions_from_checkpoint)(
            cfg, problems, folder
        )
    excluded = Stats("problems", reasons=DROP_REASONS)
    rows = _rows_to_score(cfg, completions, problems, excluded)
    write_json(out / STATS_FILE, {**excluded.as_dict(), "completions": str(completions)})
    logger.info("grading %d completions of %d problems", sum(len(r["completions"]) for r in rows), len(rows))
    scored = score(rows, cfg.workers, out / "scored.jsonl")
    protocol = asdict(cfg.protocol)
    source = (
        "endpoint " + (cfg.api_addr or ", ".join(e.url for e in cfg.endpoints)) + f" model {cfg.model}"
        if cfg.api_addr or cfg.endpoints
        else f"mindformers checkpoint {cfg.checkpoint}"
        if cfg.checkpoint
        else f"rescore of {cfg.rescore}"
    )
    protocol.update(completions=source, dataset=str(cfg.rescore or cfg.dataset), limit=cfg.limit)
    if cfg.rescore:
        protocol["n_samples"] = max(len(r["completions"]) for r in rows)
        protocol["note"] = "completions made elsewhere: sampling settings are those of their producer"
    report = {
        "label": cfg.report_label,
        "protocol": protocol,
        "checkpoint": cfg.checkpoint,  # the run report pairs the evaluation with the training job it came from
        **summarize(scored),
        # pass@1's denominator: the problems scored; those left out are counted by reason
        "excluded": {reason: n for reason, n in excluded.as_dict()[STATS_DROPPED].items() if n},
        "reference": [{"model": n, "math500": s} for n, s in REFERENCE],
    }
    if base is not None:
        report["baseline"] = {
            "label": base.get("label", cfg.baseline),
            "pass@1": base["pass@1"],
            "difference": round(report["pass@1"] - base["pass@1"], 2),
            "path": cfg.baseline,
        }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    _chart(report, out / "accuracy.png")
    logger.info("wrote %s, %s and %s", out / "report.json", out / "report.md", out / "accuracy.png")
    logger.info("pass@1 %.2f over the problems scored: %s", report["pass@1"], excluded.summary())
    return out / "report.json"


def build_parser() -> argparse.ArgumentParser:
    p = cli.stage_parser("distilled_plugins.evaluate", __doc__, EvalConfig)
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the API key")
    add_arguments(p.add_argument_group("sampling protocol"), Protocol)
    RequestSettings.add_arguments(p)  # the same request flags as generate: one definition
    return p


def main(argv: list[str] | None = None) -> int:
    cli.start_logging()
    args = build_parser().parse_args(argv)
    report = run(
        from_args(
            EvalConfig,
            args,
            protocol=from_args(Protocol, args),
            api_key=os.environ.get(args.api_key_env),
            retry=RequestSettings.from_args(args),
        )
    )
    summary = json.loads(report.read_text())
    logger.info(  # the one line with the result (the operator logs its own, the engine none)
        "pass@1 %.2f%% (95%% CI %s) over %d problems x %d samples; report %s",
        summary["pass@1"],
        summary["ci95"],
        summary["problems"],
        summary["protocol"]["n_samples"],
        report,
    )
    return 0
