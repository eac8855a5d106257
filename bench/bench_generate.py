"""Benchmark of stage 1's client: CPU per 1,000 requests, rows/s, peak RSS, loss under faults, rate limits, fleet.

Usage:
    .venv/bin/python bench/bench_generate.py [--rows 5000] [--num-generations 4] [--max-concurrent 100]
    .venv/bin/python bench/bench_generate.py --cases rate_limited,fleet   # only the teacher-fleet cases

An instant local server (its own process) answers every request with a ~9 KB (~2,000-token) completion ending
in \\boxed{42}. The client runs in this process; CPU is measured around the stage's ``run`` only (after imports).
Cases:
- ``faults``: fault-free runs against runs with 10% of replies answered 429 or 500 (median of ``--repeat``);
- ``rate_limited``: 400 rows x 1 against a server enforcing 1,200 requests/minute (20/s, bursts of 20; over it
  429 with ``Retry-After: 1`` and ``x-ratelimit-*`` headers), 100 concurrent, once with the limit learnt from the
  headers and once with ``--max-rpm 1200``: refusal rate, and wall time against the 20 s the limit allows;
- ``rate_limited_per_second``: the same against a server counting 20 requests per wall-clock second;
- ``fleet``: three endpoints answering after 0.1 s (each its own process), one SIGKILLed once a third of the rows
  are written: rows lost or duplicated, each endpoint's share and failures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distilled_plugins.devtools.local_airflow import free_port
from distilled_plugins.devtools.teacher_server import wait_for_port
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.teacher.settings import RequestSettings, RetryPolicy

STATS_DIR = tempfile.gettempdir()
COMPLETION = ("Let me work through this carefully. " * 250)[:9000] + " So the answer is $\\boxed{42}$."


def serve(
    port: int, fault_rate: float, rate_limit_rpm: float | None = None, delay: float = 0.0, per_second: bool = False
) -> None:
    from aiohttp import web

    from distilled_plugins.devtools.teacher_server import ReplayTeacher

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    teacher = ReplayTeacher(
        lambda problem: COMPLETION,
        fault_rate=fault_rate,
        seed=1,
        retry_after="1" if rate_limit_rpm else None,
        rate_limit_rpm=rate_limit_rpm,
        rate_limit_per_second=per_second,
        delay=delay,
    )
    if rate_limit_rpm:  # the refusal count is read back from this process's exit file

        async def count(app):
            Path(f"{STATS_DIR}/refused-{port}").write_text(json.dumps([teacher.requests, teacher.refused]))

        app = teacher.app()
        app.on_shutdown.append(count)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
        return
    web.run_app(teacher.app(), host="127.0.0.1", port=port, access_log=None, print=None)


def run_once(workdir: Path, seed: Path, fault_rate: float, args) -> dict:
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port, fault_rate), daemon=True)
    server.start()
    try:
        wait_for_port(port)
        output = workdir / f"out-{fault_rate}.jsonl"
        cfg = GenerateConfig(
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
        result = generate(cfg)
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


def start_server(port: int, **kwargs) -> multiprocessing.Process:
    server = multiprocessing.Process(target=serve, args=(port,), kwargs={"fault_rate": 0.0, **kwargs}, daemon=True)
    server.start()
    wait_for_port(port)
    return server


def rate_limited(workdir: Path, max_rpm: float | None, per_second: bool = False) -> dict:
    """400 requests against a server allowing 1,200/minute; the limit allows 400 / 20 = 20 s."""
    rows, rpm = 400, 1200
    seed = workdir / "seed-rl.jsonl"
    seed.write_text("".join(json.dumps({"problem": f"Problem {i}: compute 6 times 7."}) + "\n" for i in range(rows)))
    port = free_port()
    server = start_server(port, rate_limit_rpm=rpm, per_second=per_second)
    output = workdir / f"out-rl-{max_rpm}-{per_second}.jsonl"
    output.unlink(missing_ok=True)  # a fresh run, not a resumed one, when a case is repeated
    try:
        cfg = GenerateConfig(
            dataset_name=str(seed),
            output_file=str(output),
            model="bench",
            api_addr=f"127.0.0.1:{port}",
            num_generations=1,
            max_concurrent=100,
            progress_interval=60,
            retry=RequestSettings(max_rpm=max_rpm),
        )
        wall0 = time.monotonic()
        result = generate(cfg)
        wall = time.monotonic() - wall0
    finally:
        server.terminate()  # SIGTERM: aiohttp shuts down and writes the counts
        server.join()
    requests, refused = json.loads(Path(f"{STATS_DIR}/refused-{port}").read_text())
    allowed = rows / (rpm / 60)
    return {
        "limit_rpm": rpm,
        "server_counts": "per wall-clock second" if per_second else "bucket of one second's worth",
        "client_max_rpm": max_rpm or "learnt from headers",
        "rows_written": output.read_text().count("\n"),
        "requests_at_server": requests,
        "refused": refused,
        "refused_pct": round(100 * refused / requests, 2),
        "wall_s": round(wall, 2),
        "limit_allows_s": allowed,
        "wall_vs_limit": round(wall / allowed, 3),
        "client_rate_limit_pauses": result.stats["rate_limit_pauses"],
    }


def fleet(workdir: Path, rows: int = 1500) -> dict:
    """Three endpoints (0.1 s per reply), the third SIGKILLed once a third of the rows are written."""
    import signal
    import threading

    seed = workdir / "seed-fleet.jsonl"
    seed.write_text("".join(json.dumps({"problem": f"Problem {i}: compute 6 times 7."}) + "\n" for i in range(rows)))
    ports = [free_port() for _ in range(3)]
    servers = [start_server(port, delay=0.1) for port in ports]
    output = workdir / "out-fleet.jsonl"

    def kill_third() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if output.exists() and output.read_bytes().count(b"\n") >= rows // 3:
                break
            time.sleep(0.05)
        os.kill(servers[2].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_third, daemon=True)
    killer.start()
    try:
        cfg = GenerateConfig(
            dataset_name=str(seed),
            output_file=str(output),
            model="bench",
            api_addr=",".join(f"127.0.0.1:{p}" for p in ports),
            num_generations=1,
            max_concurrent=60,
            progress_interval=60,
            retry=RequestSettings(),
        )
        wall0 = time.monotonic()
        result = generate(cfg)
        wall = time.monotonic() - wall0
        killer.join()
    finally:
        for server in servers:
            server.kill()
            server.join()
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    keys = [line["problem"] for line in lines]
    per = result.stats["endpoints"]
    return {
        "rows_expected": rows,
        "rows_lost": rows - len(set(keys)),
        "rows_duplicated": len(keys) - len(set(keys)),
        "completions_beyond_needed": sum(p["ok"] for p in per.values()) - rows,
        "wall_s": round(wall, 2),
        "per_endpoint": {
            url: {k: p[k] for k in ("ok", "failures", "times_taken_out", "latency_p50_s", "latency_p95_s")}
            for url, p in per.items()
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind; the median run is reported")
    p.add_argument(
        "--cases",
        default="faults,rate_limited,rate_limited_per_second,fleet",
        help="comma-separated: faults, rate_limited, rate_limited_per_second, fleet",
    )
    args = p.parse_args()
    cases = set(args.cases.split(","))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "rate_limited" in cases:
            report["rate_limited"] = [rate_limited(workdir, None), rate_limited(workdir, 1200)]
        if "rate_limited_per_second" in cases:
            report["rate_limited_per_second"] = [rate_limited(workdir, None, True), rate_limited(workdir, 1200, True)]
        if "fleet" in cases:
            report["fleet_one_killed"] = fleet(workdir)
        if "faults" in cases:
            report.update(fault_runs(workdir, args))
    report["client_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report, indent=2))
    return 0


def fault_runs(workdir: Path, args) -> dict:
    runs = {0.0: [], 0.1: []}
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
    return {
        "fault_free": clean,
        "faults_10pct": faulty,
        "all_walls_s": {str(rate): [r["wall_s"] for r in rs] for rate, rs in runs.items()},
        "all_rows_lost": [r["rows_lost"] for rs in runs.values() for r in rs],
    }


if __name__ == "__main__":
    sys.exit(main())
