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
