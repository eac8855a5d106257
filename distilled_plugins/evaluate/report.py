"""The evaluation's report: ``report.json`` (the figures, the protocol, the baseline), ``report.md`` beside the
tutorial's table and ``accuracy.png`` (accuracy by level and by subject)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.io import read_json, write_json
from distilled_plugins.core.schema import STATS_DROPPED
from distilled_plugins.core.stats import Stats
from distilled_plugins.evaluate.config import EvalConfig
from distilled_plugins.evaluate.scoring import Scored, summarize

REFERENCE = [  # the tutorial's table (MATH-500)
    ("DeepSeek-Distill-Qwen-7B", 91.6),
    ("OpenR1-Qwen-7B (Hugging Face)", 90.6),
    ("OpenR1-Qwen-7B (MindSpore Transformers, tutorial)", 90.0),
    ("OpenThinker-7B", 89.6),
]
REPORT_FILES = ("report.json", "report.md", "accuracy.png")


def read_baseline(path: str) -> dict:
    baseline = read_json(path, "baseline report")
    if not isinstance(baseline.get("pass@1"), (int, float)):
        raise DataError(f"{path}: not an evaluation report (no numeric 'pass@1'); give a report.json of this stage")
    return baseline


def _protocol(cfg: EvalConfig, rows: list[dict]) -> dict:
    """The sampling protocol as reported, with where the completions came from."""
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
    return protocol


def build_report(cfg: EvalConfig, rows: list[dict], scored: list[Scored], excluded: Stats, base: dict | None) -> dict:
    report = {
        "label": cfg.report_label,
        "protocol": _protocol(cfg, rows),
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
    return report


def write_report(report: dict, out: Path) -> list[Path]:
    """``report.json``, ``report.md`` and ``accuracy.png`` in ``out``; their paths, in that order."""
    paths = [out / name for name in REPORT_FILES]
    write_json(paths[0], report)
    paths[1].write_text(_markdown(report), encoding="utf-8")
    _chart(report, paths[2])
    return paths


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
