"""The embedded demo: the whole DAG in a private Airflow on this machine, with no network.

Usage:
    make demo            # or: python -m distilled_plugins.devtools.demo [--problems 32] [--keep-running]

It starts Airflow 3 (api-server, scheduler, dag-processor, triggerer; SQLite and LocalExecutor under
``.demo/airflow``) and a local teacher endpoint that replays each problem's reference solution from the MATH
training set in ``../shared/data`` as its completion (real text with correct answers, no model). It then
triggers ``distill_r1`` through the REST API on ~32 MATH training problems with the tiny CPU fine-tune profile
and a MATH-500 subset, follows the run to its end, and prints the UI address, the run's state and the
evaluation report. Then it runs the learnability check (``distilled_plugins/devtools/learnability.py``, a smaller size
than the benchmark's): the same stages teach a small model from scratch to add tens and units written in words, and the final
summary says how often it answers held-out problems right before and after (chance: 1 in 64). A tiny model
trained for seconds scores ~0 on MATH-500 whatever the wiring; the learnability figure is the one that shows the
chain teaches. A second ``make demo`` reuses the Airflow database and the generation store: its run requests
nothing from the teacher that the first one already generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from distilled_plugins.core.configs import FINETUNE_TINY, SHARED_DATA, TINY_TOKENIZER
from distilled_plugins.core.io import rewrite_jsonl, write_json
from distilled_plugins.devtools import learnability
from distilled_plugins.devtools.batch_server import BatchTeacher
from distilled_plugins.devtools.local_airflow import LocalAirflow, free_port, port_is_free
from distilled_plugins.devtools.teacher_server import ReplayTeacher, ServerThread, load_answers, replay_answer

logger = logging.getLogger("distilled_plugins.devtools.demo")

REPO = Path(__file__).resolve().parents[2]
MATH_TRAIN = SHARED_DATA / "math_train" / "math12k_train_with_solutions.jsonl"
DAG_ID = "distill_r1"
# seconds Airflow's start and the DAG run take on an idle 2-core machine (README); the learnability check's come from
# learnability.estimate_seconds. A later demo estimates from what the last one took here (TIMINGS in --workdir).
DAG_RUN_SECONDS = 60.0
TIMINGS = "timings.json"


def estimate(workdir: Path, learnability_on: bool) -> dict[str, float]:
    """Seconds each part of the demo will take: what the last demo in ``workdir`` took, else the idle figures."""
    parts = {"dag_run": DAG_RUN_SECONDS}
    if learnability_on:
        parts["learnability"] = learnability.estimate_seconds(learnability.SIZE["n_train"], learnability.SIZE["epochs"])
    try:
        last = json.loads((workdir / TIMINGS).read_text())
    except (OSError, ValueError):
        last = {}
    return {part: float(last.get(part, seconds)) for part, seconds in parts.items()}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def make_seed(path: Path, n: int) -> Path:
    """The first ``n`` MATH training problems with a reference solution and a gold answer."""
    rows = []
    with open(MATH_TRAIN) as f:
        for line in f:
            row = json.loads(line)
            if row.get("solution") and row.get("answer"):
                rows.append({"problem": row["problem"], "answer": row["answer"], "subject": row.get("subject")})
            if len(rows) == n:
                break
    return rewrite_jsonl(path, rows)


def demo_settings(workdir: Path, seed: Path) -> dict:
    """Parameters of a demo run: the tiny CPU model with its tokenizer, one msrun worker, a MATH-500 subset."""
    return {
        "seed_dataset": str(seed),
        "teacher_model": "demo-replay-teacher",
        "num_generations": 2,
        "shards": 2,
        "max_concurrent": 16,
        "finetune_config": FINETUNE_TINY.name,
        "tokenizer_dir": str(TINY_TOKENIZER),
        "nodes": 1,
        "workers_per_node": 1,
        "master_port": free_port(),
        "eval_samples": 1,
        "eval_limit": 5,
        "eval_max_new_tokens": 32,
        "output_root": str(workdir / "output"),
    }


def airflow_for_demo(
    workdir: Path, teacher_url: str, port: int, settings: dict, users: str | None = None, **deployment
) -> LocalAirflow:
    """The demo's private Airflow: ``settings`` are the deployment's defaults (the form's, and those of runs the
    seed watcher starts), stored with ``deployment`` (e.g. ``retry_delay_seconds=1``) in the Variable
    ``distill_deployment`` (operators/dag_helpers/deployment.py) that every service reads from the database. ``users``
    (``"admin:admin"``): real logins instead of none (``LocalAirflow``)."""
    host, _, teacher_port = teacher_url.removeprefix("http://").partition(":")
    return LocalAirflow(
        workdir / "airflow",
        port=port,
        env={
            "AIRFLOW_CONN_TEACHER_DEFAULT": json.dumps({"conn_type": "http", "host": host, "port": int(teacher_port)}),
        },
        # a tiny model trains for seconds: its trigger looks every second, not every 5
        variables={
            "distill_deployment": {
                "defaults": settings,
                "retry_delay_seconds": 5,
                "training_poll_seconds": 1,
                **deployment,
            }
        },
        users=users,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distilled_plugins.devtools.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / ".demo", help="where the demo keeps Airflow and outputs")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--port", type=int, default=8080, help="Airflow UI/API port (a free one if taken)")
    p.add_argument("--keep-running", action="store_true", help="keep Airflow up after the run (Ctrl-C stops it)")
    p.add_argument("--no-learnability", action="store_true", help="skip the learnability check (~2 min)")
    p.add_argument(
        "--teacher-batch", action="store_true", help="generate through the teacher's Batch API (a local one)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _stop_on_signals()
    try:
        return _demo(args)
    except KeyboardInterrupt as e:  # the `with` blocks stopped Airflow and the teacher on the way out
        logger.warning("demo stopped (%s): stopping what it started", e.args[0] if e.args else "SIGINT")
        return 130
    finally:
        stop_training_jobs(args.workdir.resolve() / "output")


def _demo(args: argparse.Namespace) -> int:
    if not MATH_TRAIN.exists():
        logger.error("%s not found: the demo needs the shared data folder beside the checkout", MATH_TRAIN)
        return 1
    workdir = args.workdir.resolve()
    seed = make_seed(workdir / "seed" / "seed.jsonl", args.problems)
    settings = demo_settings(workdir, seed)
    port = args.port if port_is_free(args.port) else free_port()
    teacher = ReplayTeacher(replay_answer(load_answers(MATH_TRAIN, "problem", "solution")))
    expected = estimate(workdir, not args.no_learnability)
    print(_estimate_line(expected, args.problems), flush=True)
    app, batches = teacher.app(), None
    if args.teacher_batch:  # the same teacher behind a local Batch API; the generate tasks defer while it runs
        batches = BatchTeacher(teacher, seconds_per_request=0.05)
        app = batches.app()
        settings.update(teacher_mode="batch", teacher_batch_poll_seconds=2)
    started = time.monotonic()
    took: dict[str, float] = {}
    with ServerThread(app) as server:
        logger.info("demo teacher (replays MATH reference solutions) at %s", server.url)
        airflow = airflow_for_demo(workdir, server.url, port, settings)
        logger.info("starting Airflow (api-server, scheduler, dag-processor, triggerer) in %s", airflow.home)
        with airflow:
            print(f"\nAirflow UI: {airflow.url}  (no login: a private demo instance)\n", flush=True)
            airflow.wait_for_dag(DAG_ID)
            run_id = airflow.trigger(DAG_ID, settings)
            logger.info("triggered %s run %s; following it", DAG_ID, run_id)
            state = airflow.wait_for_run(DAG_ID, run_id, timeout=1800)
            took["dag_run"] = time.monotonic() - started
            report = airflow.xcom(DAG_ID, run_id, "evaluate") if state == "success" else None
            generated = (
                [airflow.xcom(DAG_ID, run_id, "generate", map_index=i) for i in range(settings["shards"])]
                if state == "success"
                else []
            )
            lines = [f"Run {run_id} of {DAG_ID}: {state} in {time.monotonic() - started:.0f} s"]
            lines.append(f"Airflow UI: {airflow.url}/dags/{DAG_ID}")
            if batches is None:
                lines.append(f"Teacher requests this run: {teacher.requests}")
            else:  # the Batch API answers from the teacher's replies without a request to its HTTP side
                lines.append(f"Teacher requests this run: {sum(batches.submitted.values())} in batches")
            for shard in generated:
                stats = json.loads(Path(shard["stats"]).read_text())
                lines.append(
                    f"  shard stats {shard['stats']}: {stats.get('rows_reused_from_store', 0)} rows reused from "
                    f"the generation store, {stats['requests_sent']} requests"
                    + (
                        f" in batches {', '.join(b['batch_id'] for b in stats.get('batches', []))}"
                        if args.teacher_batch
                        else ""
                    )
                )
            if report:
                summary = json.loads(Path(report).read_text())
                lines.append(
                    f"MATH-500 evaluation: {report}  (pass@1 {summary['pass@1']:.1f}% on {summary['problems']} "
                    f"problems: a tiny model trained for seconds on a CPU, so ~0 is expected; see below for learning)"
                )
                lines.append(f"                   {Path(report).with_suffix('.md')}")
            else:
                lines.append(f"The run failed: see the failed task's log in the UI or under {airflow.home}/logs")
            if args.keep_running:
                lines += _learnability_lines(workdir, skip=args.no_learnability, took=took)
                print("\n" + "\n".join([*lines, _timing_line(workdir, took, expected)]), flush=True)
                print("Airflow keeps running; press Ctrl-C to stop it.")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    if not args.keep_running:  # Airflow is down: the check has the CPUs to itself
        lines += _learnability_lines(workdir, skip=args.no_learnability, took=took)
        print("\n" + "\n".join([*lines, _timing_line(workdir, took, expected)]), flush=True)
    return 0 if state == "success" else 1


def _estimate_line(expected: dict[str, float], problems: int) -> str:
    line = (
        f"\nThis demo takes about {_minutes(sum(expected.values()))}: Airflow starts and runs the DAG on {problems} "
        f"problems (~{_minutes(expected['dag_run'])}; each task's state is logged as it changes)"
    )
    if "learnability" in expected:
        line += (
            f", then the learnability check (~{_minutes(expected['learnability'])}; its {len(learnability.STAGES)} "
            "stages are logged as they start and end, and the training steps every second)"
        )
    return line + ".\n"


def _timing_line(workdir: Path, took: dict[str, float], expected: dict[str, float]) -> str:
    """What each part took against the estimate; kept in ``workdir`` for the next demo's estimate."""
    write_json(workdir / TIMINGS, {part: round(s, 1) for part, s in took.items()})
    parts = ", ".join(f"{part.replace('_', ' ')} {_minutes(s)}" for part, s in took.items())
    return f"Took {_minutes(sum(took.values()))} ({parts}); estimated {_minutes(sum(expected.values()))}."


def _learnability_lines(workdir: Path, skip: bool, took: dict[str, float]) -> list[str]:
    """Run the learnability check (the benchmark's size) and say plainly what was learned."""
    if skip:
        return ["Learnability check skipped (--no-learnability)."]
    logger.info("learnability check: the same stages teach a small model to add tens and units written in words")
    started = time.monotonic()
    try:
        report = learnability.run_check(workdir / "learnability", **learnability.SIZE)
    except Exception as e:  # the DAG run's result still gets printed
        logger.exception("the learnability check failed")
        return [f"Learnability check FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    finally:
        took["learnability"] = time.monotonic() - started
    return [
        f"Learnability: a small model trained from scratch through the same stages ({report['steps']} steps, loss "
        f"{report['first_loss']:.2f} -> {report['final_loss']:.2f}, {report['seconds']:.0f} s), on "
        f"{report['held_out']} held-out problems: writes the trained <think> trace in "
        f"{report['trace_format_before']:.0f}% -> {report['trace_format_after']:.0f}% of its answers, answers right "
        f"(sums it was never trained on) in {report['before']:.1f}% -> {report['after']:.1f}% (before -> after "
        f"fine-tuning; chance: 1 in {len(learnability.ANSWERS)}). Report {workdir / 'learnability' / 'report.json'}, "
        f"loss curve {report['loss_curve']}"
    ]


def _stop_on_signals() -> None:
    """SIGTERM (``kill``), SIGHUP (a closed terminal) and SIGINT (Ctrl-C; also ``kill -INT`` of a demo started in
    the background, whose shell left SIGINT ignored) all raise KeyboardInterrupt, so the demo unwinds and stops what
    it started: the Airflow services (their own sessions, so a terminal's signal reaches only the demo), the teacher,
    and the training jobs its runs launched (detached supervisors that outlive their task by design)."""

    def interrupt(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # one stop at a time: a second signal waits
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)


def stop_training_jobs(output_root: Path) -> None:
    """Stop every fine-tune job under ``output_root`` that still has a process on this machine."""
    from distilled_plugins.finetune import job as jobs

    for job_dir in sorted({record.parent for record in output_root.glob("**/job-*/node-*.json")}):
        if jobs.live_on_this_machine(job_dir):
            outcome = jobs.stop(job_dir, "the demo was stopped", by_user=True)
            logger.info("stopped the training job %s: %s", job_dir, outcome)


if __name__ == "__main__":
    sys.exit(main())
