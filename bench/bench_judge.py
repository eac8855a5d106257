"""Rejection sampling with the LLM judge, run from its CLI against a local judge on real recorded generations.

Usage:
    .venv/bin/python bench/bench_judge.py [--out /tmp/bench_judge] [--audit 50]

The generations are four published models' answers to each MATH-500 problem (Qwen2.5-Math-7B,
Qwen2.5-14B-Instruct, gemma-2-27b-it, Sky-T1-math-correct-5K-27B), as the Qwen2.5-Math evaluation harness
recorded them (``../shared/data/eval_outputs/skythought/``), with the harness's gold (``gt``). The local judge
(``teacher_server --judge-verdicts``) replies to the judge prompt with that harness's own recorded grading of each
answer (``score``): a second, independent grader whose verdicts are real, standing in for an LLM judge (no model
runs here, so the figures measure the stage's plumbing and the two graders' disagreement, not an LLM's). The stage runs twice with one verdict cache: the rerun
must send the judge nothing. Prints the first run's figures and the rerun's requests as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distilled_plugins.core.configs import SHARED_DATA  # noqa: E402
from distilled_plugins.core.io import iter_jsonl, rewrite_jsonl  # noqa: E402
from distilled_plugins.devtools.local_airflow import free_port  # noqa: E402
from distilled_plugins.devtools.teacher_server import wait_for_port  # noqa: E402

RECORDED = SHARED_DATA / "eval_outputs" / "skythought"
MODELS = ("Qwen2.5-Math-7B", "Qwen2.5-14B-Instruct", "gemma-2-27b-it", "Sky-T1-math-correct-5K-27B")


def prepare(out: Path) -> tuple[Path, Path]:
    """The generations file (stage 1's schema) and the judge's verdicts (the harness's scores)."""
    generations, verdicts = [], []
    per_model = [[row for _, row in iter_jsonl(RECORDED / f"{model}.math500.jsonl")] for model in MODELS]
    for rows in zip(*per_model, strict=True):
        if len({row["question"] for row in rows}) != 1:
            raise SystemExit("the recorded outputs are not in the same problem order")
        texts = [row["code"][0] for row in rows]
        generations.append(
            {
                "problem": rows[0]["question"],
                "answer": rows[0]["gt"],
                "generations": texts,
                "finish_reasons": ["stop"] * len(texts),
            }
        )
        for text, row in zip(texts, rows, strict=True):
            verdict = "yes" if row["score"][0] else "no"
            verdicts.append({"problem": row["question"], "generation": text, "verdict": verdict})
    return rewrite_jsonl(out / "generations.jsonl", generations), rewrite_jsonl(out / "judge.jsonl", verdicts)


def run_stage(src: Path, dst: Path, port: int, audit: int) -> tuple[dict, float, str]:
    command = [sys.executable, "-m", "distilled_plugins.reject_sampling", "--src", src, "--dst", dst]
    command += ["--eval-sets", "none", "--judge-api-addr", f"127.0.0.1:{port}", "--judge-model", "qwen-harness-replay"]
    command += ["--workers", 2]
    command += ["--judge-audit-sample", audit, "--judge-cache-dir", dst.parent / "judge_cache"]
    started = time.monotonic()
    done = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(done.stderr)
    last = [line for line in done.stderr.splitlines() if ": kept " in line][-1]
    return json.loads(dst.with_name(dst.stem + ".stats.json").read_text()), time.monotonic() - started, last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/bench_judge", help="working folder (the verdict cache is reset)")
    p.add_argument("--audit", type=int, default=100, help="generations math_verify accepted sent to the judge too")
    args = p.parse_args()
    out = Path(args.out)
    (out / "judge_cache" / "judge_verdicts.sqlite").unlink(missing_ok=True)
    src, verdicts = prepare(out)
    port = free_port()
    judge_server = [sys.executable, "-m", "distilled_plugins.devtools.teacher_server"]
    server = subprocess.Popen(
        [*judge_server, "--judge-verdicts", str(verdicts), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        first, first_s, last_line = run_stage(src, out / "filtered.jsonl", port, args.audit)
        rerun, rerun_s, _ = run_stage(src, out / "rerun.jsonl", port, args.audit)
    finally:
        server.kill()
        server.wait()
    judge = first["judge"]
    summary = {
        "examples": first["rows_in"],
        "generations": first["generations_graded"],
        "kept": first["rows_out"],
        "dropped": first["dropped"],
        "math_verify_correct": first["generations_correct"],
        "math_verify_rejected": first["rejected_generations"],
        "judge": {k: judge[k] for k in ("requests", "requests_sent", "recovered", "confirmed_wrong", "unparseable")}
        | {k: judge[k] for k in ("errors", "audited", "generations_added", "rows_added", "agreement")}
        | {k: judge[k] for k in ("prompt_tokens", "completion_tokens")},
        "last_log_line": last_line.split(": ", 1)[1],
        "wall_s": round(first_s, 1),
        "rerun": {"requests": rerun["judge"]["requests"], "from_cache": rerun["judge"]["from_cache"]}
        | {"wall_s": round(rerun_s, 1)},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
