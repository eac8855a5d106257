"""The distill_r1 DAG: its definition, and real runs in a private Airflow (api-server, scheduler, dag-processor,
triggerer on 127.0.0.1, SQLite) driven through the REST API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distilled_plugins.devtools.demo import airflow_for_demo, demo_settings, make_seed
from distilled_plugins.devtools.local_airflow import AirflowError, free_port
from distilled_plugins.devtools.teacher_server import judge_answer, load_answers, replay_answer
from operators.triggers.seed_change import STATE_KEY
from tests.support import MATH_TRAIN_SOLUTIONS, REPO, TOKENIZER_DIR, read_jsonl, wait_until, write_jsonl

DAG_FILE = REPO / "dags" / "distill_r1.py"
DAG_ID = "distill_r1"
JUDGE_KEY = "sk-judge-key"


# parsing the DAG file (every few seconds, in the dag-processor) must not load the ML frameworks
HEAVY_MODULES = ("mindspore", "mindformers", "torch", "transformers", "datasets", "matplotlib", "pyarrow", "sympy")
SECTIONS = ["Data", "Teacher", "Processing", "Fine-tune", "Multi-node (rarely changed)", "Evaluation", "Output"]


def test_dag_parses_light_and_every_param_is_a_labelled_form_field():
    code = (
        "import sys, json, importlib.util as u; "
        f"s = u.spec_from_file_location('d', {str(DAG_FILE)!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
        f"heavy = [n for n in {HEAVY_MODULES!r} if n in sys.modules]; m.dag.params.validate(); "
        "print(json.dumps({'heavy': heavy, 'tasks': [x.task_id for x in m.dag.tasks], 'doc': m.dag.doc_md, "
        "'asset': {'uri': m.SEED.asset.uri, 'extra': m.SEED.asset.extra}, "
        "'params': {k: [p.description, p.schema, p.value] for k, p in m.params.items()}}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr  # includes: the defaults validate against their schemas
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["heavy"] == []
    assert info["tasks"] == [
        "choose_source",
        "seed",
        "from_openr1",
        "from_packed",
        "shard_plan",
        "generate",
        "merge",
        "reject_sampling",
        "handle",
        "pack",
        "node_ranks",
        "finetune",
        "evaluate",
        "approve_finetune",
        "report",
        "fail_if_stopped",
    ]
    titles = set()
    for name, (description, schema, _) in info["params"].items():
        assert description and len(description) > 10, name
        assert schema.get("title") and schema["title"] != name and "_" not in schema["title"], name
        titles.add(schema["title"])
        assert schema.get("section") in SECTIONS, name
        kinds = schema["type"] if isinstance(schema.get("type"), list) else [schema.get("type")]
        assert set(kinds) <= {"string", "integer", "number", "boolean", "null"}, name
        if "enum" in schema:
            assert set(schema["values_display"]) == set(schema["enum"]), name
    assert len(titles) == len(info["params"])  # no two fields share a label
    sections = [info["params"][k][1]["section"] for k in info["params"]]
    assert [s for i, s in enumerate(sections) if s not in sections[:i]] == SECTIONS  # each section in one block
    assert {k for k in info["params"] if info["params"][k][1]["section"].startswith("Multi-node")} == {
        "master_addr",
        "master_port",
    }
    assert info["params"]["finetune_config"][1]["enum"] == ["finetune_qwen_2_5_7b.yaml", "finetune_tiny_cpu.yaml"]
    assert info["params"]["finetune_config"][1]["values_display"]["finetune_tiny_cpu.yaml"] == "Tiny CPU model (demo)"
    assert info["params"]["shards"][1]["minimum"] == 1
    # optional by meaning: null is a valid value, and the default, so the form submits as it is
    assert info["params"]["base_checkpoint"][1]["type"] == ["null", "string"]
    assert info["params"]["base_checkpoint"][2] is None
    assert "```\nshard_plan -> generate" in info["doc"] and "/api/v2/assets/events" in info["doc"]
    assert "Create Event" in info["doc"]
    assert info["asset"]["uri"].startswith("file://") and info["asset"]["extra"]["uri"] == info["asset"]["uri"]
    assert "description" in info["asset"]["extra"]


@pytest.mark.slow
@pytest.mark.airflow
def test_rest_trigger_retry_and_seed_refresh_in_a_real_airflow(replay_teacher, tmp_path):
    seed = make_seed(tmp_path / "seed" / "seed.jsonl", 16)
    settings = {
        **demo_settings(tmp_path, seed),
        "eval_limit": 2,
        "eval_max_new_tokens": 8,
        "request_attempts": 1,  # one attempt per request: a teacher error fails the task, the retry resumes
        "judge_conn_id": "judge_default",
    }
    # answers briefly with the right answer (short texts: few training steps), except one in words that math_verify
    # cannot read (the judge can); its first 2 requests get HTTP 500
    answers = {
        p: f"Step by step, the answer is $\\boxed{{{a}}}$."
        for p, a in load_answers(MATH_TRAIN_SOLUTIONS, "problem", "answer").items()
    }
    worded = read_jsonl(seed)[3]["problem"]
    answers[worded] = "Working through the cases, the answer comes out as the number I name in words at the end."
    teacher, url = replay_teacher(replay_answer(answers), fail_first=2)
    judge = replay_teacher(judge_answer({worded: "yes"}), api_key=JUDGE_KEY)
    airflow = airflow_for_demo(tmp_path, url, free_port(), settings, retry_delay_seconds=1)
    with airflow:
        airflow.wait_for_dag(DAG_ID)
        connection = {"connection_id": "judge_default", "conn_type": "http", "host": judge.host, "port": judge.port}
        airflow.api("POST", "/api/v2/connections", {**connection, "password": JUDGE_KEY})

        with pytest.raises(AirflowError, match="HTTP 400.*shards"):  # refused before any task runs
            airflow.trigger(DAG_ID, {**settings, "shards": 0})
        assert airflow.runs(DAG_ID) == []

        run_id = airflow.trigger(DAG_ID, settings)
        assert airflow.wait_for_run(DAG_ID, run_id, timeout=900) == "success"
        tries = {(ti["task_id"], ti["map_index"]): ti["try_number"] for ti in airflow.task_instances(DAG_ID, run_id)}
        assert max(tries[("generate", 0)], tries[("generate", 1)]) == 2  # failed once, then resumed
        assert teacher.requests == 16 * 2 + 2  # only the two failed requests were sent again
        merged = airflow.xcom(DAG_ID, run_id, "merge")
        assert merged == f"{tmp_path}/output/{DAG_ID}/{run_id}/merge/generations.jsonl"
        rows = read_jsonl(merged)
        assert len(rows) == 16 and len({r["problem"] for r in rows}) == 16  # nothing lost, nothing twice
        # the judge, from its Connection (key included), kept the worded answer's two generations
        rejection = airflow.xcom(DAG_ID, run_id, "reject_sampling")
        judged = json.loads(Path(rejection["stats"]).read_text())["judge"]
        asked = judge.replay.requests  # 1 or 2: the second, identical generation may find the first's verdict
        assert judged["requests_sent"] == asked and judged["requests"] + judged["from_cache"] == 2, judged
        assert (judged["recovered"], judged["rows_added"]) == (2, 1), judged
        assert judge.replay.seen_authorization == [f"Bearer {JUDGE_KEY}"] * asked
        filtered = read_jsonl(rejection["output"])
        assert [r["correctness_judge"] for r in filtered if r["problem"] == worded] == [[True, True]]
        finetuned = airflow.xcom(DAG_ID, run_id, "finetune", map_index=0)  # mapped over node ranks
        assert Path(finetuned["checkpoint_dir"], "rank_0").is_dir() and Path(finetuned["metrics"]).exists()
        report = json.loads(Path(airflow.xcom(DAG_ID, run_id, "evaluate")).read_text())
        assert report["problems"] == 2 and report["protocol"]["n_samples"] == 1
        for task in (
            "reject_sampling/filtered.jsonl",
            "handle/stats.json",
            "pack/stats.json",
            "evaluate/report.md",
            "evaluate/accuracy.png",
        ):
            assert (tmp_path / "output" / DAG_ID / run_id / task).exists(), task

        # the seed refreshes with 3 new problems; the seed watcher notices and starts a run (no REST call). Once it
        # recorded the seed as it was: a change before its first look would be its baseline, not a refresh
        seed_asset = airflow.api("GET", "/api/v2/assets?name_pattern=distill_seed")["assets"][0]["id"]

        def baseline():
            try:
                return airflow.api("GET", f"/api/v2/assets/{seed_asset}/state-store/{STATE_KEY}")["value"]
            except AirflowError as e:  # HTTP 404 until the watcher stored one
                if "HTTP 404" not in str(e):
                    raise
                return None

        wait_until(baseline, 120, "the seed watcher to record its baseline", interval=1)
        before = teacher.requests
        extra = [json.loads(line) for line in open(MATH_TRAIN_SOLUTIONS)][200:203]
        write_jsonl(seed, read_jsonl(seed) + [{"problem": r["problem"], "answer": r["answer"]} for r in extra])
        new = wait_until(
            lambda: [r for r in airflow.runs(DAG_ID) if r["run_type"] == "asset_triggered"],
            120,
            "the asset event to start a run",
            interval=2,
        )
        second = new[0]["dag_run_id"]
        assert airflow.wait_for_run(DAG_ID, second, timeout=900) == "success"
        assert teacher.requests - before == 3 * 2  # only the new problems went to the teacher
        reused = sum(
            json.loads(Path(airflow.xcom(DAG_ID, second, "generate", map_index=i)["stats"]).read_text())[
                "rows_reused_from_store"
            ]
            for i in range(2)
        )
        assert reused == 16
        # the second run's judge (its settings the deployment's defaults) read its verdicts from the cache
        rejection = airflow.xcom(DAG_ID, second, "reject_sampling")
        judged = json.loads(Path(rejection["stats"]).read_text())["judge"]
        assert (judged["requests"], judged["from_cache"], judged["rows_added"]) == (0, 2, 1), judged
        assert judge.replay.requests == asked
        filtered = read_jsonl(rejection["output"])
        assert [r["correctness_judge"] for r in filtered if r["problem"] == worded] == [[True, True]]


class _TaskInstance:
    """The task instance fields the failure summary reads (a real one needs a running Airflow task)."""

    def __init__(self, task_id: str, try_number: int = 1, max_tries: int = 2, map_index: int = -1):
        self.task_id, self.run_id, self.try_number, self.max_tries, self.map_index = (
            task_id,
            "manual__1",
            try_number,
            max_tries,
            map_index,
        )


def test_an_error_no_retry_can_fix_fails_at_once_with_a_specific_line(tmp_path, capsys):
    from airflow.sdk.exceptions import AirflowFailException

    from operators import HandleDatasetOperator

    op = HandleDatasetOperator(
        task_id="handle", src=str(tmp_path / "missing.jsonl"), tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / "out")
    )
    with pytest.raises(AirflowFailException) as raised:
        op.execute({"ti": _TaskInstance("handle")})
    line = str(raised.value)
    assert line.startswith("FAILED handle (run manual__1, try 1): ") and "missing.jsonl" in line
    assert "what to do: fix the file or folder named in the error" in line
    assert "retries" not in line
    assert line in capsys.readouterr().out  # logged by the task itself: at the top level of the task log
    from operators.dag_helpers.failures import log_failure_summary

    capsys.readouterr()
    log_failure_summary({"ti": _TaskInstance("handle"), "task": op, "exception": raised.value})
    assert "FAILED" not in capsys.readouterr().out  # not repeated in the callback's collapsed group


def test_errors_are_told_apart_by_kind_and_task():
    from airflow.sdk.exceptions import AirflowNotFoundException

    from distilled_plugins.core import errors
    from operators.dag_helpers.failures import classify

    cases = {
        ("finetune", errors.CheckpointMissing("load_checkpoint /x does not exist")): (False, "'Base checkpoint'"),
        ("finetune", errors.SeqLengthMismatch("packed rows hold 128 tokens")): (False, "pack with the model's"),
        ("finetune", errors.FinetuneFailed("worker 0 exited with 1")): (True, "worker log tail"),
        ("finetune", errors.FinetuneStoppedByUser("stopped by a user")): (False, "a user stopped"),
        ("generate", errors.FatalRequestError("HTTP 401 from http://t/v1 (model 'm'): bad key")): (False, "API key"),
        ("generate", errors.EndpointUnreachable("cannot reach the teacher endpoint http://t")): (False, "start the"),
        ("generate", errors.GenerationIncomplete("3 rows failed")): (True, "missing rows"),
        ("generate", errors.BudgetReached("budget reached")): (False, "Budget per run"),
        ("generate", errors.BatchError("POST http://t/v1/files: HTTP 404 -- no Batch API")): (False, "online"),
        ("generate", AirflowNotFoundException("The conn_id `teacher_default` isn't defined")): (False, "Connections"),
        ("reject_sampling", errors.MissingColumn("seed.jsonl: column 'answer' not found")): (False, "Gold answer"),
        # decided by type, not by words: a plain DataError that speaks of a column or a checkpoint is data to fix
        ("finetune", errors.DataError("load_checkpoint: column 'x'")): (False, "fix the file or folder"),
        ("pack", ValueError("overlong must be one of split, truncate, drop")): (False, "setting is invalid"),
        ("evaluate", OSError("connection reset")): (True, "evaluation source"),
        ("evaluate", RuntimeError("a bug")): (True, "evaluation source"),
    }
    for (task_id, error), (retryable, hint) in cases.items():
        got = classify(task_id, error)
        assert got[0] == retryable and hint in got[1], (task_id, error, got)


def test_a_retryable_error_is_retried_and_says_so(tmp_path, capsys):
    from operators import MsrunFinetuneOperator
    from operators.dag_helpers.failures import fails_clearly

    class Flaky(MsrunFinetuneOperator):
        @fails_clearly
        def execute(self, context):
            raise OSError("disk busy")

    op = Flaky(task_id="finetune", config="c.yaml", dataset_path="d", output_dir=str(tmp_path))
    with pytest.raises(OSError):
        op.execute({"ti": _TaskInstance("finetune", try_number=1, max_tries=2)})
    out = capsys.readouterr().out
    assert "FAILED finetune (run manual__1, try 1): disk busy -- what to do: Airflow retries it" in out
    with pytest.raises(OSError):
        op.execute({"ti": _TaskInstance("finetune", try_number=3, max_tries=2)})
    out = capsys.readouterr().out
    assert "try 3): disk busy -- what to do: read the worker log tail above" in out and "retries it" not in out
