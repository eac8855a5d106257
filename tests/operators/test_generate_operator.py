"""GenerateReasoningOperator inside a real ``dag.test()`` with a connection and a local teacher."""

from __future__ import annotations

import json
import logging

import pytest

from tests.support import math_train_rows, read_jsonl, write_jsonl

SECRET = "sk-operator-secret-5521"


@pytest.fixture
def teacher_conn(replay_teacher, monkeypatch):
    server = replay_teacher(lambda problem: "so $\\boxed{1}$", api_key=SECRET)
    conn = {"conn_type": "http", "host": server.host, "port": server.port, "schema": "http", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_TEACHER_TEST", json.dumps(conn))
    return server.replay


def test_operator_generates_and_returns_paths(airflow_db, teacher_conn, tmp_path, caplog):
    from tests.dags.stage_dags import generate_dag

    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(6))
    caplog.set_level(logging.INFO)
    run = generate_dag.test(run_conf={"seed": str(seed), "out": str(tmp_path), "n": 2})
    assert run.state == "success"
    result = run.get_task_instance("generate").xcom_pull(task_ids="generate")
    assert result["output"] == f"{tmp_path}/test_generate_operator/{run.run_id}/gen.jsonl"
    rows = read_jsonl(result["output"])
    assert len(rows) == 6 and all(len(r["generations"]) == 2 for r in rows)
    stats = json.loads(open(result["stats"]).read())
    assert stats["rows_written"] == 6 and stats["rows_in"] == stats["rows_out"] == 6
    assert teacher_conn.seen_authorization[0] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps(result)
