"""Benchmark of memory against scale: each stage as its own process at two sizes 10x apart, peak RSS ratio.

Usage:
    .venv/bin/python bench/bench_scale.py [--rows 5000 50000] [--handle-rows 500 5000] [--new-rows 500]

Synthesizes N seed problems ("Compute a + b.") whose teacher completion is ~40 KB (a ``<think>`` block of real
MATH solution text, then the boxed sum: every row passes rejection sampling). An instant local server (its own
process) answers them. Then, each a separate process under ``/usr/bin/time -f %M`` (peak RSS of the largest
process): generate (2 shards, generation store on), merge, reject_sampling, handle (on the first
``--handle-rows`` kept rows: it tokenizes ~10k tokens a row) and pack. For each stage it prints wall time,
throughput and peak RSS per size, and the ratio of peak RSS between the sizes (target <= 1.2); pack, which runs
in about a second, is run ``--pack-runs`` times and its median taken. Last, an incremental rerun at the largest
size: the seed plus ``--new-rows`` new problems through generate with the same store, whose wall time is
compared with the first run's (target <= 5%), split into its parts (process start, the pass over the seed, the
store's key checks, generation; from the shards' stats), then the rerun's merge, which fills the reused rows in
from the store. ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distilled_plugins.core.configs import SHARED_DATA  # noqa: E402
from distilled_plugins.devtools.local_airflow import free_port  # noqa: E402
from distilled_plugins.devtools.teacher_server import wait_for_port  # noqa: E402

TOKENIZER = SHARED_DATA / "tokenizer" / "qwen2.5"
SOLUTIONS = SHARED_DATA / "math_train" / "math12k_train_with_solutions.jsonl"
COMPLETION_CHARS = 40_000

_GENERATE = """
import json, sys
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.generate.stage import run
settings = json.loads(sys.argv[1])
run(GenerateConfig(**settings))
"""


def filler() -> str:
    """~40 KB of real mathematical prose: MATH reference solutions, one after another."""
    parts, size = [], 0
    with open(SOLUTIONS) as f:
        for line in f:
            text = json.loads(line).get("solution") or ""
            parts.append(text)
            size += len(text) + 2
            if size >= COMPLETION_CHARS:
                break
    return "\n\n".join(parts)[:COMPLETION_CHARS]


def serve(port: int) -> None:
    from aiohttp import web

    from distilled_plugins.devtools.teacher_server import ReplayTeacher

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    think = "<think>\n" + filler() + "\n</think>\n"
    pattern = re.compile(r"Compute (\d+) \+ (\d+)\.")

    def answer(problem: str) -> str:
        a, b = map(int, pattern.search(problem).groups())
        return f"{think}Adding the two numbers, the answer is $\\boxed{{{a + b}}}$."

    teacher = ReplayTeacher(answer, retry_after=None)
    web.run_app(teacher.app(), host="127.0.0.1", port=port, access_log=None, print=None)


def write_seed(path: Path, start: int, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            a, b = 1000 + i, 7 * i % 9973
            f.write(json.dumps({"problem": f"Compute {a} + {b}.", "answer": str(a + b), "id": i}) + "\n")
    return path


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run a stage process; return its wall seconds and peak RSS in MB (largest process, /usr/bin/time)."""
    rss_file = log.with_suffix(".rss")
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    wall = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (exit {done.returncode}); see {log}")
    return wall, int(rss_file.read_text().split()[-1]) // 1024


def median_of(runs: int, cmd: list[str], log: Path, before=None) -> tuple[float, int]:
    """Median wall time and peak RSS of ``runs`` runs of a stage (``before()`` runs before each)."""
    figures = []
    for _ in range(runs):
        if before is not None:
            before()
        figures.append(timed(cmd, log))
    return statistics.median(w for w, _ in figures), int(statistics.median(r for _, r in figures))


def generate_shards(
    work: Path, seed: Path, url: str, store: Path, out: Path, walls: list | None = None
) -> tuple[float, int, list[Path]]:
    out.mkdir(parents=True, exist_ok=True)
    wall, rss, shards = 0.0, 0, []
    for index in range(2):
        shard = out / f"shard-{index}.jsonl"
        settings = {
            "dataset_name": str(seed),
            "output_file": str(shard),
            "model": "bench",
            "api_addr": url,
            "num_generations": 1,
            "max_concurrent": 64,
            "shard_index": index,
            "num_shards": 2,
            "store_dir": str(store),
            "progress_interval": 30,
        }
        w, r = timed([sys.executable, "-c", _GENERATE, json.dumps(settings)], out / f"generate-{index}.log")
        wall, rss, shards = wall + w, max(rss, r), [*shards, shard]
        if walls is not None:
            walls.append(w)
    return wall, rss, shards


def one_size(work: Path, rows: int, handle_rows: int, url: str, pack_runs: int = 3) -> dict:
    work.mkdir(parents=True)
    seed = write_seed(work / "seed.jsonl", 0, rows)
    store = work / "store"
    figures = {}
    wall, rss, shards = generate_shards(work, seed, url, store, work / "generate")
    figures["generate"] = {"rows": rows, "wall_s": wall, "peak_rss_mb": rss}
    merged = work / "merge" / "generations.jsonl"
    merged.parent.mkdir()
    py = sys.executable
    wall, rss = timed(
        [py, "-m", "distilled_plugins.generate", "--merge", *map(str, shards), "--output-file", str(merged)],
        work / "merge.log",
    )
    figures["merge"] = {"rows": rows, "wall_s": wall, "peak_rss_mb": rss}
    filtered = work / "filtered.jsonl"
    wall, rss = timed(
        [py, "-m", "distilled_plugins.reject_sampling", "--src", str(merged), "--dst", str(filtered), "--workers", "2"],
        work / "reject_sampling.log",
    )
    figures["reject_sampling"] = {"rows": rows, "wall_s": wall, "peak_rss_mb": rss}
    handle_in = work / "handle_in.jsonl"
    with open(filtered, "rb") as src, open(handle_in, "wb") as dst:
        for i, line in enumerate(src):
            if i == handle_rows:
                break
            dst.write(line)
    handled = work / "handled"
    wall, rss = timed(
        [
            py,
            "-m",
            "distilled_plugins.handle",
            "--src",
            str(handle_in),
            "--tokenizer",
            str(TOKENIZER),
            "--dst",
            str(handled),
        ],
        work / "handle.log",
    )
    tokens = json.loads((handled / "stats.json").read_text())["tokens"]
    figures["handle"] = {"rows": handle_rows, "wall_s": wall, "peak_rss_mb": rss, "tokens": tokens}
    wall, rss = median_of(
        pack_runs,
        [py, "-m", "distilled_plugins.pack", "--src", str(handled), "--dst", str(work / "packed")],
        work / "pack.log",
        before=lambda: shutil.rmtree(work / "packed", ignore_errors=True),
    )
    figures["pack"] = {"rows": handle_rows, "wall_s": wall, "peak_rss_mb": rss, "runs": pack_runs}
    disk = {
        "generate_shards": sum(p.stat().st_size for p in shards),
        "merge": merged.stat().st_size,
        "reject_sampling": filtered.stat().st_size,
        "store": sum(p.stat().st_size for p in store.iterdir()),
        "handle": sum(p.stat().st_size for p in handled.rglob("*") if p.is_file()),
        "pack": sum(p.stat().st_size for p in (work / "packed").rglob("*") if p.is_file()),
    }
    for entry in figures.values():
        entry["rows_per_s"] = round(entry["rows"] / entry["wall_s"], 1)
        entry["wall_s"] = round(entry["wall_s"], 2)
    return {"rows": rows, "stages": figures, "disk_bytes": disk}


def seed_pass_seconds(seed: Path) -> float:
    """One pass over the seed as generate makes it (stream the rows, hash each key), in this process."""
    from distilled_plugins.core.io import iter_rows
    from distilled_plugins.core.schema import row_key

    started = time.monotonic()
    for row in iter_rows(seed):
        row_key(row["problem"])
    return time.monotonic() - started


def incremental(work: Path, rows: int, new_rows: int, url: str) -> dict:
    seed = work / "seed-refreshed.jsonl"
    shutil.copyfile(work / "seed.jsonl", seed)
    with open(seed, "a") as f, open(write_seed(work / "new.jsonl", rows, new_rows)) as new:
        f.write(new.read())
    out = work / "rerun"
    walls: list[float] = []
    wall, rss, shards = generate_shards(work, seed, url, work / "store", out, walls)
    stats = [json.loads((out / f"shard-{i}.stats.json").read_text()) for i in range(2)]
    parts = {
        # the process's own start (interpreter, imports) and end: its wall time less what run() measured
        "process_start_s": sum(w - s["wall_seconds"] for w, s in zip(walls, stats, strict=True)),
        "seed_pass_and_list_s": sum(s["timings"]["prepare_s"] - s["timings"].get("store_check_s", 0) for s in stats),
        "store_key_checks_s": sum(s["timings"].get("store_check_s", 0) for s in stats),
        "generate_s": sum(s["timings"]["generate_s"] for s in stats),
    }
    merged = out / "merged.jsonl"
    merge_wall, merge_rss = timed(
        [
            sys.executable,
            "-m",
            "distilled_plugins.generate",
            "--merge",
            *map(str, shards),
            "--output-file",
            str(merged),
        ],
        out / "merge.log",
    )
    merge_stats = json.loads((out / "merged.stats.json").read_text())
    if merge_stats["rows_out"] != rows + new_rows:
        raise RuntimeError(f"the rerun's merge wrote {merge_stats['rows_out']} rows, not {rows + new_rows}")
    return {
        "rows": rows + new_rows,
        "new_rows": new_rows,
        "wall_s": round(wall, 2),
        "peak_rss_mb": rss,
        "requests_sent": sum(s["requests_sent"] for s in stats),
        "rows_reused_from_store": sum(s["rows_reused_from_store"] for s in stats),
        "store_rows_written": sum(s["store"]["rows_written"] for s in stats),
        "store_rows_read": sum(s["store"]["rows_read"] for s in stats),
        "store_bytes": stats[-1]["store"]["bytes"],
        "parts_s": {name: round(seconds, 2) for name, seconds in parts.items()},
        "seed_pass_here_s": round(seed_pass_seconds(seed), 2),
        "shard_file_bytes": sum(p.stat().st_size for p in shards),
        "reused_list_bytes": sum(p.with_name(p.stem + ".reused.jsonl").stat().st_size for p in shards),
        "merge_wall_s": round(merge_wall, 2),
        "merge_peak_rss_mb": merge_rss,
        "merge_rows_from_store": merge_stats["rows_from_store"],
    }


# The tutorial's data: OpenR1-Math-220k default split, ~94,000 problems x 4 completions of ~40 KB.
TUTORIAL_PROBLEMS, TUTORIAL_COMPLETIONS = 94_000, 4
# units of work per stage at the tutorial's scale, in bench rows (one 40 KB completion each): generate, merge and
# reject_sampling see every completion; handle and pack see one conversation per problem (the kept completion)
TUTORIAL_UNITS = {
    "generate": TUTORIAL_PROBLEMS * TUTORIAL_COMPLETIONS,
    "merge": TUTORIAL_PROBLEMS * TUTORIAL_COMPLETIONS,
    "reject_sampling": TUTORIAL_PROBLEMS * TUTORIAL_COMPLETIONS,
    "handle": TUTORIAL_PROBLEMS,
    "pack": TUTORIAL_PROBLEMS,
}
# how a stage's wall time scales from this 2-core machine to a 32-core worker: grading runs one process per
# core and the Rust tokenizer one thread per core; generate (client side), merge and pack are single-process
SPEEDUP_32_CORES = {"generate": 1, "merge": 1, "reject_sampling": 16, "handle": 16, "pack": 1}
DISK_OF = {
    "generate": "generate_shards",
    "merge": "merge",
    "reject_sampling": "reject_sampling",
    "handle": "handle",
    "pack": "pack",
}


def extrapolate(large: dict) -> list[dict]:
    """Linear extrapolation of the large size's wall time and disk to the tutorial's data; memory as measured."""
    table = []
    for stage, figures in large["stages"].items():
        factor = TUTORIAL_UNITS[stage] / figures["rows"]
        hours = figures["wall_s"] * factor / 3600
        table.append(
            {
                "stage": stage,
                "units": TUTORIAL_UNITS[stage],
                "hours_here": round(hours, 2),
                "hours_32_cores": round(hours / SPEEDUP_32_CORES[stage], 2),
                "disk_gb": round(large["disk_bytes"][DISK_OF[stage]] * factor / 1e9, 1),
                "peak_rss_mb": figures["peak_rss_mb"],
            }
        )
    store_factor = TUTORIAL_UNITS["generate"] / large["stages"]["generate"]["rows"]
    table.append({"stage": "generation store", "disk_gb": round(large["disk_bytes"]["store"] * store_factor / 1e9, 1)})
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs=2, default=[5000, 50000], help="two seed sizes (text stages)")
    p.add_argument("--handle-rows", type=int, nargs=2, default=[500, 5000], help="rows handled and packed")
    p.add_argument("--new-rows", type=int, default=500, help="new problems in the incremental rerun")
    p.add_argument("--pack-runs", type=int, default=3, help="runs of pack per size (the median is reported)")
    p.add_argument("--workdir", default=None, help="keep the artifacts here (default: a removed temp folder)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--report", default=None, help="print the tables again from a --json file; run nothing")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["sizes"], saved["incremental"], None)
        return 0
    if not Path("/usr/bin/time").exists():
        print("bench_scale needs GNU time at /usr/bin/time (apt-get install -y time)", file=sys.stderr)
        return 1
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    try:
        wait_for_port(port)
        url = f"127.0.0.1:{port}"
        results = [
            one_size(root / f"n{rows}", rows, handle_rows, url, args.pack_runs)
            for rows, handle_rows in zip(args.rows, args.handle_rows, strict=True)
        ]
        rerun = incremental(root / f"n{args.rows[1]}", args.rows[1], args.new_rows, url)
    finally:
        server.terminate()
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    report(results, rerun, args.json)
    return 0


def report(results: list[dict], rerun: dict, json_path: str | None) -> None:
    small, large = results
    print(f"{'stage':<16} {'rows':>14} {'wall s':>16} {'rows/s':>16} {'peak RSS MB':>16} {'RSS ratio':>9}")
    ratios = {}
    for stage, a in small["stages"].items():
        b = large["stages"][stage]
        ratios[stage] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)
        print(
            f"{stage:<16} {a['rows']:>6} / {b['rows']:>6} {a['wall_s']:>7} / {b['wall_s']:>7} "
            f"{a['rows_per_s']:>7} / {b['rows_per_s']:>7} {a['peak_rss_mb']:>7} / {b['peak_rss_mb']:>6} "
            f"{ratios[stage]:>9}"
        )
    first = large["stages"]["generate"]["wall_s"]
    share = rerun["wall_s"] / first
    print(
        f"incremental rerun: {rerun['new_rows']} new of {rerun['rows']}: {rerun['wall_s']} s = {share:.1%} of the "
        f"first generate ({first} s); {rerun['requests_sent']} requests, store read {rerun['store_rows_read']} / "
        f"wrote {rerun['store_rows_written']} rows, store {rerun['store_bytes'] / 1e6:.0f} MB"
    )
    if "parts_s" in rerun:
        print(
            "  parts (both shards, s): " + ", ".join(f"{k} {v}" for k, v in rerun["parts_s"].items()) + f"; one pass "
            f"over the seed in this process {rerun['seed_pass_here_s']} s; shard files {rerun['shard_file_bytes'] / 1e6:.1f}"
            f" MB + reused lists {rerun['reused_list_bytes'] / 1e6:.1f} MB"
        )
        print(
            f"  the rerun's merge: {rerun['merge_wall_s']} s, {rerun['merge_peak_rss_mb']} MB peak RSS, "
            f"{rerun['merge_rows_from_store']} rows from the store"
        )
    print("disk (large size, MB): " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in large["disk_bytes"].items()))
    projection = extrapolate(large)
    print(f"extrapolated to {TUTORIAL_PROBLEMS:,} problems x {TUTORIAL_COMPLETIONS} completions of ~40 KB:")
    for row in projection:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if json_path:
        Path(json_path).write_text(
            json.dumps(
                {"sizes": results, "rss_ratio": ratios, "incremental": rerun, "share": share, "projection": projection},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    sys.exit(main())
