"""Benchmark of stage 2: samples/s and peak RSS of rejection sampling on realistic completions.

Usage:
    .venv/bin/python bench/bench_reject_sampling.py [--samples 2000] [--naive]

The completions are built from real text: MATH-500's golds (integers, fractions, roots, pi, intervals, tuples,
sets, matrices, text, degrees, bases, equations, ...: the kinds are counted and printed), each with 2,000-8,000
characters of reasoning taken from MATH reference solutions. Half are R1-style (reasoning inside
``<think>...</think>``, then a short answer), half are plain reasoning; about 30% end in a wrong answer.
``--naive`` also measures math_verify called directly in this process (parse gold, parse whole completion,
verify), the baseline the target is set against.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def answer_kind(answer: str) -> str:
    checks = [
        ("matrix", r"\\begin\{[pb]?matrix"),
        ("text", r"\\text|\\mbox|^[A-Za-z ]+$"),
        ("interval", r"^[\[\(].*,.*[\]\)]$"),
        ("set/list", r","),
        ("fraction", r"\\d?frac"),
        ("root", r"\\sqrt"),
        ("pi", r"\\pi"),
        ("degrees", r"\^\\circ|\\degree"),
        ("equation", r"="),
        ("inequality", r"<|>|\\le|\\ge"),
        ("base", r"_\{?\d"),
        ("power", r"\^"),
        ("decimal", r"^-?\d*\.\d+$"),
        ("negative", r"^-\d+$"),
        ("integer", r"^\d+$"),
        ("infinity", r"\\infty"),
        ("complex", r"\bi\b"),
    ]
    for kind, pattern in checks:
        if re.search(pattern, answer):
            return kind
    return "other expression"


def wrong_answer(answer: str, others: list[str], rng: random.Random) -> str:
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + rng.choice([-2, -1, 1, 3]))
    return rng.choice([o for o in others if o != answer])


def build_dataset(path: Path, n: int, seed: int = 0) -> Counter:
    rng = random.Random(seed)
    math500 = [json.loads(line) for line in open(DATA / "math500" / "test.jsonl")]
    reasoning_pool = [
        json.loads(line)["solution"] for line in open(DATA / "math_train" / "math12k_train_with_solutions.jsonl")
    ]
    reasoning_pool = [re.sub(r"\\boxed\{", "{", s) for s in reasoning_pool if s]  # only the final box counts
    golds = [r["answer"] for r in math500]
    kinds = Counter()
    with open(path, "w") as f:
        for i in range(n):
            row = math500[i % len(math500)]
            target = rng.randint(2000, 8000)
            reasoning = ""
            while len(reasoning) < target:
                reasoning += rng.choice(reasoning_pool) + "\n\n"
            reasoning = reasoning[:target]
            correct = rng.random() >= 0.3
            final = row["answer"] if correct else wrong_answer(row["answer"], golds, rng)
            if i % 2:
                completion = f"<think>\n{reasoning}\n</think>\n\nThe answer is $\\boxed{{{final}}}$."
            else:
                completion = f"{reasoning}\n\nTherefore, the final answer is $\\boxed{{{final}}}$."
            kinds[answer_kind(row["answer"])] += 1
            f.write(
                json.dumps(
                    {
                        "problem": f"[bench {i}] {row['problem']}",
                        "answer": row["answer"],
                        "generations": [completion],
                        "finish_reasons": ["stop"],
                    }
                )
                + "\n"
            )
    return kinds


def naive_rate(path: Path, limit: int) -> float:
    from math_verify import parse, verify

    rows = [json.loads(line) for line in open(path)][:limit]
    start = time.monotonic()
    for row in rows:
        verify(parse("$" + row["answer"] + "$"), parse(row["generations"][0]))
    return len(rows) / (time.monotonic() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--naive", action="store_true", help="also time naive single-process math_verify (400 samples)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "generations.jsonl", Path(tmp) / "filtered.jsonl"
        kinds = build_dataset(src, args.samples)
        cmd = [
            sys.executable,
            "-m",
            "distilled_plugins.reject_sampling",
            "--src",
            str(src),
            "--dst",
            str(dst),
            "--eval-sets",
            "none",
            "--progress-interval",
            "60",
        ]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        start = time.monotonic()
        subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL)
        wall = time.monotonic() - start
        stats = json.loads((Path(tmp) / "filtered.stats.json").read_text())
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = {
            "samples": stats["generations_graded"],
            "answer_kinds": len(kinds),
            "kinds": dict(kinds.most_common()),
            "correct": stats["generations_correct"],
            "rejected": stats["rejected_generations"],
            "samples_per_s_in_stage": stats["samples_per_s"],
            "samples_per_s_whole_process": round(stats["generations_graded"] / wall, 1),
            "peak_rss_mb_largest_process": round(peak_rss, 1),
            "workers": stats["workers"],
        }
        if args.naive:
            report["naive_single_process_samples_per_s"] = round(naive_rate(src, 400), 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
