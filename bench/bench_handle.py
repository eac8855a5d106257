"""Benchmark of stage 3: tokens/s of the whole stage against the tutorial's path, same 2,000 rows.

Usage:
    .venv/bin/python bench/bench_handle.py [--rows 2000]

Rows: MATH training problems with their reference solutions as user/assistant conversations. Ours: the stage
as the CLI runs it (chat template, batched fast tokenizer, labels, streamed save_to_disk); tokens/s counts from
after the tokenizer is loaded (what stats.json reports), and the whole process's wall time is shown too.
The tutorial's path: the slow Python Qwen2 tokenizer's apply_chat_template per row, its label loop, then
Dataset.from_list and save_to_disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TOKENIZER = DATA / "tokenizer" / "qwen2.5"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def tutorial_path(rows: list[dict], dst: Path) -> tuple[int, float]:
    import datasets
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(TOKENIZER))
    start = time.perf_counter()
    out, tokens = [], 0
    for row in rows:
        ids = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, *row["messages"]], tokenize=True, add_generation_prompt=False
        )
        target = 0
        for i in range(len(ids)):  # the tutorial's search for <|im_start|> assistant
            if ids[i] == 151644 and ids[i + 1] == 77091:
                target = i + 3
                break
        out.append({"input_ids": ids, "labels": [-100] * target + ids[target:]})
        tokens += len(ids)
    datasets.Dataset.from_list(out).save_to_disk(str(dst))
    return tokens, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    args = p.parse_args()
    rows = []
    with open(DATA / "math_train" / "math12k_train_with_solutions.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r.get("solution"):
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": r["problem"]},
                            {"role": "assistant", "content": r["solution"]},
                        ]
                    }
                )
            if len(rows) == args.rows:
                break
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "distilled_plugins.handle",
                "--src",
                str(src),
                "--tokenizer",
                str(TOKENIZER),
                "--dst",
                str(Path(tmp) / "ours"),
            ],
            check=True,
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        process_wall = time.perf_counter() - start
        stats = json.loads((Path(tmp) / "ours" / "stats.json").read_text())
        tokens, seconds = tutorial_path(rows, Path(tmp) / "tutorial")
    report = {
        "rows": len(rows),
        "tokens": stats["tokens"],
        "ours_tokens_per_s": stats["tokens_per_s"],
        "ours_stage_seconds": stats["processing_seconds"],
        "ours_whole_process_seconds_with_imports": round(process_wall, 2),
        "tutorial_tokens_per_s": round(tokens / seconds),
        "tutorial_seconds": round(seconds, 2),
        "speedup": round(stats["tokens_per_s"] / (tokens / seconds), 1),
        "same_token_count": tokens == stats["tokens"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
