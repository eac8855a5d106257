"""Benchmark of stage 1's client: CPU per 1,000 requests, rows/s, peak RSS, and loss under faults.

Usage:
    .venv/bin/python bench/bench_generate.py [--rows 5000] [--num-generations 4] [--max-concurrent 100]

An instant local server (its own process) answers every request with a ~9 KB (~2,000-token) completion ending
in \\boxed{42}. The client runs in this process; CPU is measured around ``generate.run`` only (after imports).
The second run has 10% of replies answered 429 or 500 with JSON bodies.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distilled_plugins import generate
from distilled_plugins.client import RetryPolicy

COMPLETION = ("Let me work through this carefully. " * 250)[:9000] + " So the answer is $\\boxed{42}$."


def serve(port: int, fault_rate: float) -> None:
    from aiohttp import web

    from distilled_plugins.teacher_server import ReplayTeacher

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    teacher = ReplayTeacher(lambda problem: COMPLETION, fault_rate=fault_rate, seed=1, retry_after=None)
    web.run_app(teacher.app(), host="127.0.0.1", port=port, access_log=None, print=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("bench server did not start")


def run_once(workdir: Path, seed: Path, fault_rate: float, args) -> dict:
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port, fault_rate), daemon=True)
    server.start()
    try:
        wait_for(port)
        output = workdir / f"out-{fault_rate}.jsonl"
        cfg = generate.GenerateConfig(
            dataset_name=str(seed),
            output_file=str(output),
            model="bench",
            api_addr=f"127.0.0.1:{port}",
            num_generations=args.num_generations,
            max_concurrent=args.max_concurrent,
            progress_interval=60,
            retry=RetryPolicy(),
        )
        cpu0, wall0 = time.process_time(), time.monotonic()
        result = generate.run(cfg)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    finally:
        server.terminate()
        server.join()
    rows = output.read_text().count("\n")
    requests = result.stats["requests_sent"]
    return {
        "fault_rate": fault_rate,
        "rows_expected": args.rows,
        "rows_written": rows,
        "rows_lost": args.rows - rows,
        "requests": requests,
        "retries": result.stats["retries"],
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
        "client_cpu_s_per_1000_requests": round(1000 * cpu / requests, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind; the median run is reported")
    args = p.parse_args()
    runs = {0.0: [], 0.1: []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        seed = workdir / "seed.jsonl"
        seed.write_text(
            "".join(json.dumps({"problem": f"Problem {i}: compute 6 times 7."}) + "\n" for i in range(args.rows))
        )
        for _ in range(args.repeat):  # interleaved, so drifting machine load hits both kinds alike
            for rate in runs:
                for old in workdir.glob("out-*"):
                    old.unlink()
                runs[rate].append(run_once(workdir, seed, rate, args))
    clean, faulty = (sorted(r, key=lambda x: x["wall_s"])[len(r) // 2] for r in runs.values())
    faulty["wall_vs_fault_free"] = round(faulty["wall_s"] / clean["wall_s"], 2)
    report = {
        "fault_free": clean,
        "faults_10pct": faulty,
        "all_walls_s": {str(rate): [r["wall_s"] for r in rs] for rate, rs in runs.items()},
        "all_rows_lost": [r["rows_lost"] for rs in runs.values() for r in rs],
        "client_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
