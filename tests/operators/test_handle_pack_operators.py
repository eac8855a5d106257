"""HandleDatasetOperator -> PackDatasetOperator inside a real ``dag.test()``, the path passed through XCom."""

from __future__ import annotations

import json

import datasets

from tests.support import TOKENIZER_DIR, conversation_rows, write_jsonl


def test_handle_then_pack(airflow_db, tmp_path):
    from tests.dags.stage_dags import handle_pack_dag

    src = write_jsonl(tmp_path / "filtered.jsonl", conversation_rows(20))
    run = handle_pack_dag.test(
        run_conf={"src": str(src), "tokenizer": str(TOKENIZER_DIR), "out": str(tmp_path), "seq_length": 1024}
    )
    assert run.state == "success"
    handled = run.get_task_instance("handle").xcom_pull(task_ids="handle")
    packed = run.get_task_instance("pack").xcom_pull(task_ids="pack")
    assert handled == f"{tmp_path}/{run.run_id}/handled" and packed == f"{tmp_path}/{run.run_id}/packed"
    assert len(datasets.load_from_disk(handled)) == 20
    stats = json.loads(open(f"{packed}/stats.json").read())
    assert stats["seq_length"] == 1024 and stats["samples_in"] == 20
    assert len(datasets.load_from_disk(packed)) == stats["packs"]
