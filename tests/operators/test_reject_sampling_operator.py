"""RejectSamplingOperator inside a real ``dag.test()``."""

from __future__ import annotations

import json

from tests.support import contaminated_row, generation_rows, read_jsonl, write_jsonl


def test_operator_filters_and_returns_paths(airflow_db, tmp_path):
    from tests.dags.stage_dags import reject_dag

    src = write_jsonl(tmp_path / "gen.jsonl", [*generation_rows(), contaminated_row()])
    run = reject_dag.test(run_conf={"src": str(src), "out": str(tmp_path)})
    assert run.state == "success"
    result = run.get_task_instance("reject_sampling").xcom_pull(task_ids="reject_sampling")
    assert result["output"] == f"{tmp_path}/{run.run_id}/filtered.jsonl"
    assert len(read_jsonl(result["output"])) == 2
    stats = json.loads(open(result["stats"]).read())
    assert (
        stats["dropped"]["contaminated"] == 1 and stats["rows_in"] == 8 and stats["rows_out"] == 2
    )  # MATH-500 is the default evaluation set
    assert len(read_jsonl(result["verdicts"])) == 12


def test_a_judge_connection_recovers_what_math_verify_rejects(airflow_db, tmp_path, replay_teacher, monkeypatch):
    from distilled_plugins.devtools.teacher_server import judge_answer
    from tests.dags.stage_dags import reject_dag

    problem = "Is 1234 even or odd?"
    judge = replay_teacher(judge_answer({problem: "yes"}), api_key="sk-judge-conn")
    replay = judge.replay
    conn = {"conn_type": "http", "host": judge.host, "port": judge.port, "password": "sk-judge-conn"}
    conn["extra"] = {"request_timeout": 10}
    monkeypatch.setenv("AIRFLOW_CONN_JUDGE_TEST", json.dumps(conn))
    row = {"problem": problem, "answer": "\\text{even}", "generations": ["Even number"], "finish_reasons": ["stop"]}
    src = write_jsonl(tmp_path / "gen.jsonl", [row])
    run = reject_dag.test(run_conf={"src": str(src), "out": str(tmp_path), "judge": "judge_test"})
    assert run.state == "success"
    result = run.get_task_instance("reject_sampling").xcom_pull(task_ids="reject_sampling")
    [kept] = read_jsonl(result["output"])
    assert kept["correctness_math_verify"] == [False] and kept["correctness_judge"] == [True]
    stats = json.loads(open(result["stats"]).read())
    assert stats["judge"]["recovered"] == 1 and stats["judge"]["rows_added"] == 1
    assert replay.seen_authorization == ["Bearer sk-judge-conn"]
    assert (tmp_path / "judge_cache" / "judge_verdicts.sqlite").exists()
