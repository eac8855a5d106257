"""The seed watcher, the outlet assets and the three entry points in a real Airflow (api-server, scheduler,
dag-processor, triggerer on 127.0.0.1, SQLite), with the replay teacher on 127.0.0.1.

One Airflow serves both tests (starting one takes a minute on this machine); they run in file order.
"""

from __future__ import annotations

import functools
import json
import os
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distilled_plugins.devtools.airflow_rest import ti_name
from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import free_port
from operators.triggers.seed_change import STATE_KEY
from tests.support import MATH_TRAIN_SOLUTIONS, conversation_rows, read_jsonl, wait_until

DAG_ID = "distill_r1"
pytestmark = [pytest.mark.slow, pytest.mark.airflow]


wait_until = functools.partial(wait_until, interval=1.0)  # the REST API polled once a second


class Env:
    def __init__(self, airflow, teacher, seed, settings, tmp):
        self.airflow, self.teacher, self.seed, self.settings, self.tmp = airflow, teacher, seed, settings, tmp

    def asset_id(self, name: str) -> int:
        return self.airflow.api("GET", f"/api/v2/assets?name_pattern={name}")["assets"][0]["id"]

    def fingerprint(self) -> dict | None:
        try:
            return self.airflow.api("GET", f"/api/v2/assets/{self.asset_id('distill_seed')}/state-store/{STATE_KEY}")[
                "value"
            ]
        except Exception:
            return None

    def states(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, str]:
        return {ti_name(ti): ti["state"] for ti in self.airflow.task_instances(dag_id, run_id)}

    def events(self, asset: str, run_id: str) -> list[dict]:
        query = urllib.parse.urlencode({"asset_id": self.asset_id(asset), "source_run_id": run_id})
        path = f"/api/v2/assets/events?{query}"
        return self.airflow.api("GET", path)["asset_events"]

    def seed_events(self) -> list[dict]:
        return self.airflow.api("GET", f"/api/v2/assets/events?asset_id={self.asset_id('distill_seed')}")[
            "asset_events"
        ]

    def refresh_runs(self) -> list[str]:
        """Asset-triggered runs, oldest first."""
        runs = [r for r in self.airflow.runs(DAG_ID) if r["run_type"] == "asset_triggered"]
        return [r["dag_run_id"] for r in sorted(runs, key=lambda r: r["run_after"])]

    def run_state(self, run_id: str) -> str:
        return self.airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]

    def generated(self, run_id: str) -> bool:
        states = self.states(run_id)
        assert "failed" not in {states.get("generate[0]"), states.get("generate[1]")}, states
        return states.get("generate[0]") == states.get("generate[1]") == "success"

    def append(self, start: int, n: int) -> None:
        """Append ``n`` MATH training problems (from line ``start``) to the seed, as a producer would."""
        with open(MATH_TRAIN_SOLUTIONS) as f:
            rows = [json.loads(line) for line in f][start : start + n]
        with open(self.seed, "a") as f:
            f.write("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows))

    def stop(self, run_id: str) -> None:
        self.airflow.set_run_state(DAG_ID, run_id, "failed")


@pytest.fixture(scope="module")
def env(tmp_path_factory, module_replay_teacher):
    tmp = tmp_path_factory.mktemp("seed-airflow")
    seed = make_seed(tmp / "seed" / "seed.jsonl", 8)
    settings = {**demo_settings(tmp, seed), "eval_limit": 1, "eval_max_new_tokens": 8}
    teacher, url = module_replay_teacher(solutions=MATH_TRAIN_SOLUTIONS)
    airflow = airflow_for_demo(tmp, url, free_port(), settings, seed_poll_seconds=1)
    with airflow:
        airflow.wait_for_dag(DAG_ID)
        airflow.wait_for_dag("publish_model")
        yield Env(airflow, teacher, seed, settings, tmp)


def test_seed_refresh_starts_a_run_by_itself_with_only_new_problems(env):
    airflow, seed = env.airflow, env.seed
    baseline = wait_until(env.fingerprint, 120, "the seed watcher to record a baseline fingerprint")

    # touch alone: the watcher sees the new mtime, finds the same content and fires nothing
    st = os.stat(seed)
    os.utime(seed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
    touched = wait_until(
        lambda: (fp := env.fingerprint())["files"]["seed.jsonl"][1] == os.stat(seed).st_mtime_ns and fp,
        60,
        "the seed watcher to look at the touched seed",
    )
    assert touched["digest"] == baseline["digest"]
    assert airflow.runs(DAG_ID) == []
    assert env.seed_events() == []

    # a manual run generates the 8 problems into the store (the rest of it is not needed here)
    manual = airflow.trigger(DAG_ID, env.settings)
    wait_until(lambda: env.generated(manual), 300, "the manual run's generation to finish", interval=2)
    env.stop(manual)
    # the teardowns run before the run ends (report: what the stopped run wrote); with a teardown pending, Airflow
    # ends the run by its last task, evaluate, now skipped: "success" but for fail_if_stopped
    wait_until(lambda: env.run_state(manual) in ("failed", "success"), 240, "the manual run to stop")
    assert env.run_state(manual) == "failed", env.states(manual)

    # the seed grows by 2 problems: a run starts by itself, and asks the teacher only for those 2
    before = env.teacher.requests
    env.append(300, 2)
    appended = time.monotonic()
    refresh = wait_until(lambda: env.refresh_runs(), 60, "appending to the seed to start a run")[0]
    assert time.monotonic() - appended < 60  # no REST call, no UI action
    wait_until(lambda: env.generated(refresh), 300, "the refresh run's generation to finish", interval=2)
    assert env.teacher.requests - before == 2 * 2  # 2 new problems x 2 generations; 8 came from the store
    stats = [
        json.loads(Path(airflow.xcom(DAG_ID, refresh, "generate", map_index=i)["stats"]).read_text()) for i in range(2)
    ]
    assert sum(s["rows_reused_from_store"] for s in stats) == 8
    # the run read its seed from the triggering event: path, fingerprint and row count
    seed_info = airflow.xcom(DAG_ID, refresh, "seed")
    assert seed_info["seed"] == str(seed) and seed_info["rows"] == 10
    (event,) = env.seed_events()
    assert event["extra"]["payload"]["fingerprint"] == seed_info["fingerprint"] != baseline["digest"]
    assert event["extra"]["payload"]["rows"] == 10 and event["extra"]["payload"]["uri"] == f"file://{seed}"

    # a refresh while that run is active is not lost: it is queued and starts the next run
    env.append(310, 1)
    wait_until(lambda: len(env.seed_events()) == 2, 60, "the second refresh to fire an event")
    assert env.run_state(refresh) == "running"
    wait_until(
        lambda: env.states(refresh).get("reject_sampling") in ("success", "failed"),
        300,
        "the refresh run to get through rejection sampling",
        interval=2,
    )
    states = env.states(refresh)
    assert states["reject_sampling"] == "success", states
    assert states["from_openr1"] == "skipped" and states["from_packed"] == "skipped"
    assert len(read_jsonl(airflow.xcom(DAG_ID, refresh, "merge"))) == 10
    (filtered,) = env.events("distill_filtered_dataset", refresh)
    assert filtered["extra"]["kept"] + filtered["extra"]["rejected"] == 10
    assert filtered["extra"]["path"] == airflow.xcom(DAG_ID, refresh, "reject_sampling", key="output")
    before = env.teacher.requests
    env.stop(refresh)  # the rest of the pipeline is the entry-point test's business
    queued = wait_until(
        lambda: [r for r in env.refresh_runs() if r != refresh], 120, "the queued refresh to start its run"
    )[0]
    wait_until(lambda: env.generated(queued), 300, "the queued run's generation to finish", interval=2)
    assert airflow.xcom(DAG_ID, queued, "seed")["rows"] == 11
    assert env.teacher.requests - before == 1 * 2
    env.stop(queued)
    wait_until(lambda: env.run_state(queued) in ("failed", "success"), 240, "the queued run to stop")
    assert env.run_state(queued) == "failed", env.states(queued)


def test_entry_points_run_only_their_stages_and_announce_their_assets(env):
    airflow = env.airflow
    wait_until(
        lambda: all(r["state"] in ("success", "failed") for r in airflow.runs(DAG_ID)), 120, "earlier runs to end"
    )

    openr1 = env.tmp / "openr1" / "data" / "train-00000-of-00001.parquet"
    openr1.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(conversation_rows(4, start=400)), openr1)
    requests = env.teacher.requests
    run = airflow.trigger(DAG_ID, {**env.settings, "source": "openr1_dataset", "openr1_dataset": str(openr1.parent)})
    assert airflow.wait_for_run(DAG_ID, run, timeout=900) == "success"
    states = env.states(run)
    skipped = {"seed", "shard_plan", "generate", "merge", "reject_sampling", "from_packed", "approve_finetune"}
    assert {t for t, s in states.items() if s == "skipped"} == skipped, states
    assert {t for t, s in states.items() if s == "success"} == {
        "choose_source",
        "from_openr1",
        "handle",
        "pack",
        "node_ranks",
        "finetune[0]",
        "evaluate",
        "report",
        "fail_if_stopped",
    }, states
    assert env.teacher.requests == requests
    handle_stats = json.loads((Path(airflow.xcom(DAG_ID, run, "handle")) / "stats.json").read_text())
    assert handle_stats["src"] == [str(openr1.parent)]
    packed_dir = airflow.xcom(DAG_ID, run, "pack")
    finetuned = airflow.xcom(DAG_ID, run, "finetune", map_index=0)

    # the outlet assets' events carry the figures
    (packed_event,) = env.events("distill_packed_dataset", run)
    assert packed_event["extra"]["path"] == packed_dir and packed_event["extra"]["seq_length"] == 256
    assert packed_event["extra"]["rows"] == json.loads((Path(packed_dir) / "stats.json").read_text())["packs"] > 0
    (model_event,) = env.events("distill_model", run)
    metrics = json.loads(Path(finetuned["metrics"]).read_text())
    assert model_event["extra"]["checkpoint_uri"] == f"file://{finetuned['checkpoint_dir']}"
    assert model_event["extra"]["steps"] == finetuned["steps"] > 0
    assert model_event["extra"]["final_loss"] == metrics["final_loss"]
    (report_event,) = env.events("distill_eval_report", run)
    report = json.loads(Path(airflow.xcom(DAG_ID, run, "evaluate")).read_text())
    assert report_event["extra"]["pass@1"] == report["pass@1"] and report_event["extra"]["n"] == 1
    assert report_event["extra"]["ci95"] == report["ci95"]

    # publish_model is scheduled on the model asset: it ran on its own and recorded the model
    published = wait_until(
        lambda: [r for r in airflow.runs("publish_model") if r["state"] in ("success", "failed")],
        120,
        "the model event to start a publish_model run",
    )
    assert published[0]["state"] == "success"
    registry = read_jsonl(Path(env.settings["output_root"]) / "published" / "models.jsonl")
    assert [r["checkpoint_uri"] for r in registry] == [model_event["extra"]["checkpoint_uri"]]
    assert registry[0]["source_run_id"] == run

    # straight to fine-tuning from the packed dataset the previous run wrote
    run = airflow.trigger(DAG_ID, {**env.settings, "source": "packed_dataset", "packed_dataset": packed_dir})
    assert airflow.wait_for_run(DAG_ID, run, timeout=900) == "success"
    states = env.states(run)
    assert {t for t, s in states.items() if s == "success"} == {
        "choose_source",
        "from_packed",
        "node_ranks",
        "finetune[0]",
        "evaluate",
        "report",
        "fail_if_stopped",
    }
    assert {t for t, s in states.items() if s == "skipped"} == skipped - {"from_packed"} | {
        "from_openr1",
        "handle",
        "pack",
    }, states
    assert airflow.xcom(DAG_ID, run, "finetune", map_index=0)["checkpoint_dir"].startswith(
        f"{env.settings['output_root']}/{DAG_ID}/{run}/"
    )
    assert env.events("distill_packed_dataset", run) == [] and len(env.events("distill_model", run)) == 1
