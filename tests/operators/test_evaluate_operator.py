"""Math500EvalOperator inside a real ``dag.test()``: report path through XCom, failing below a baseline."""

from __future__ import annotations

import json

from distilled_plugins.evaluate.config import MATH500


def test_operator_reports_and_fails_below_baseline(airflow_db, replay_teacher, tmp_path, monkeypatch):
    from tests.dags.stage_dags import evaluate_dag

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"label": "base", "pass@1": 50.0}))
    server = replay_teacher(solutions=MATH500)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_ENDPOINT", json.dumps({"conn_type": "http", "host": server.host, "port": server.port})
    )
    run = evaluate_dag.test(run_conf={"out": str(tmp_path), "baseline": str(baseline)})
    assert run.state == "success"
    report_path = run.get_task_instance("evaluate").xcom_pull(task_ids="evaluate")
    report = json.loads(open(report_path).read())
    assert report["pass@1"] == 100.0 and report["baseline"]["difference"] == 50.0

    baseline.write_text(json.dumps({"label": "better", "pass@1": 100.5}))
    failed = evaluate_dag.test(run_conf={"out": str(tmp_path / "again"), "baseline": str(baseline)})
    assert failed.state == "failed"
