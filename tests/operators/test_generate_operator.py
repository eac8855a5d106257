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


class TestRequestSettingsPrecedence:
    """A request setting given to the operator wins over the connection's extra, which wins over the default."""

    @staticmethod
    def fleet_settings(monkeypatch, extra: dict) -> dict:
        from operators.hooks import TeacherEndpointHook

        conn = {"conn_type": "http", "host": "127.0.0.1", "port": 9, "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_TEACHER_PRECEDENCE", json.dumps(conn))
        return TeacherEndpointHook("teacher_precedence").get_fleet().settings

    @staticmethod
    def operator(**kwargs):
        from operators import GenerateReasoningOperator

        return GenerateReasoningOperator(task_id="g", dataset_name="d", model="m", output_file="o", **kwargs)

    def test_the_connection_extra_decides_what_the_operator_leaves_unset(self, monkeypatch):
        extra = {"stream": True, "request_timeout": 600, "max_rpm": 120}
        settings = self.operator().request_settings(self.fleet_settings(monkeypatch, extra))
        assert (settings.stream, settings.request_timeout, settings.max_rpm) == (True, 600.0, 120.0)

    def test_values_given_to_the_operator_win_even_when_they_are_the_defaults(self, monkeypatch):
        extra = {"stream": True, "request_timeout": 600, "max_rpm": 120}
        # as the DAG's templates render them: text
        op = self.operator(stream="False", request_timeout="1800", max_rpm="30")
        settings = op.request_settings(self.fleet_settings(monkeypatch, extra))
        assert (settings.stream, settings.request_timeout, settings.max_rpm) == (False, 1800.0, 30.0)

    def test_empty_params_and_an_empty_extra_leave_the_defaults(self, monkeypatch):
        from distilled_plugins.teacher.settings import RequestSettings

        op = self.operator(stream="None", request_timeout="None", max_rpm="None")
        assert op.request_settings(self.fleet_settings(monkeypatch, {})) == RequestSettings()

    def test_a_bad_extra_value_names_the_connection(self, monkeypatch):
        with pytest.raises(ValueError, match="connection 'teacher_precedence': extra stream: expected true or false"):
            self.fleet_settings(monkeypatch, {"stream": "sometimes"})


def test_the_connections_extra_stream_reaches_the_requests(airflow_db, replay_teacher, tmp_path, monkeypatch):
    """The stage DAG sets no request settings: the connection's ``"stream": true`` makes every request stream."""
    from tests.dags.stage_dags import generate_dag

    teacher = replay_teacher(lambda problem: "so $\\boxed{1}$")
    replay = teacher.replay
    conn = {"conn_type": "http", "host": teacher.host, "port": teacher.port, "extra": {"stream": True}}
    monkeypatch.setenv("AIRFLOW_CONN_TEACHER_TEST", json.dumps(conn))
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(3))
    run = generate_dag.test(run_conf={"seed": str(seed), "out": str(tmp_path), "n": 1})
    assert run.state == "success"
    assert len(replay.seen_payloads) == 3 and all(p.get("stream") is True for p in replay.seen_payloads)
