"""Benchmark of stage 4's plan: pack count, efficiency and time on 50,000 log-normal lengths.

Usage:
    .venv/bin/python bench/bench_pack.py

Lengths: log-normal with median ~4,000, clipped to 64-16,384, seed 0. Compared with the tutorial's next-fit in
dataset order and with the lower bound ceil(tokens / seq_length).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distilled_plugins.pack.plan import plan_bfd


def next_fit(lengths, seq_length: int) -> int:
    packs, room = 0, 0
    for n in lengths:
        if n > room:
            packs, room = packs + 1, seq_length
        room -= n
    return packs


def main() -> int:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(4000), 0.8, 50_000), 64, 16_384).astype(np.int64)
    report = {"samples": len(lengths), "median_length": int(np.median(lengths)), "tokens": int(lengths.sum())}
    for seq_length in (16_384, 32_768):
        start = time.perf_counter()
        plan = plan_bfd(lengths, seq_length)
        seconds = time.perf_counter() - start
        tokens = int(lengths.sum())
        nf = next_fit(lengths.tolist(), seq_length)
        report[str(seq_length)] = {
            "packs": len(plan),
            "lower_bound": math.ceil(tokens / seq_length),
            "efficiency": round(tokens / (len(plan) * seq_length), 5),
            "plan_seconds": round(seconds, 3),
            "next_fit_packs": nf,
            "next_fit_efficiency": round(tokens / (nf * seq_length), 5),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
