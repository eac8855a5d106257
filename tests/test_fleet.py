"""Several teacher endpoints behind one client: spread, weights, an endpoint dying mid-run, probing back in."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest

from distilled_plugins.core.schema import stats_path
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.teacher.endpoints import Endpoint
from distilled_plugins.teacher.settings import RequestSettings
from tests.support import (
    answer_with_solution,
    keys_of,
    line_count,
    math_train_rows,
    read_jsonl,
    run_cli,
    wait_until,
    write_jsonl,
)
from tests.support import generate_config as config

POLICY = RequestSettings(max_attempts=6, backoff_base=0.01, backoff_max=0.5, connect_timeout=2, request_timeout=10)


def check_complete(output: Path, seed: Path, num_generations: int) -> list[dict]:
    rows = read_jsonl(output)
    keys = keys_of(output)
    assert len(keys) == len(set(keys)) == len(read_jsonl(seed)), "rows lost or written twice"
    assert all(len(r["generations"]) == num_generations for r in rows)
    assert all(g == answer_with_solution(r["problem"]) for r in rows for g in r["generations"])
    assert not Path(str(output) + ".parts").exists()
    return rows


def test_one_of_three_endpoints_killed_mid_run_loses_and_duplicates_nothing(replay_teacher, tmp_path):
    rows = math_train_rows(90)
    seed = write_jsonl(tmp_path / "seed.jsonl", rows)
    doomed = replay_teacher(problems=[r["problem"] for r in rows], process=True, delay=0.1)  # SIGKILLed midway
    first, url1 = replay_teacher(delay=0.1)
    second, url2 = replay_teacher(delay=0.1)
    doomed_url = doomed.url
    output = tmp_path / "gen.jsonl"
    at_kill, doomed_was_alive = {}, []

    def kill_when_a_third_is_written():
        try:
            wait_until(lambda: line_count(output) >= 30, 120, "a third of the rows written")
            at_kill.update(first=first.requests, second=second.requests)
            doomed_was_alive.append(doomed.process.poll() is None)
        finally:
            doomed.process.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_when_a_third_is_written)
    killer.start()
    cfg = config(
        seed, tmp_path, ",".join([url1, url2, doomed_url]), output_file=str(output), max_concurrent=6, retry=POLICY
    )
    result = generate(cfg)
    killer.join()
    assert at_kill, "the run never wrote a third of its rows"
    assert doomed_was_alive == [True], "the doomed teacher had already stopped when it was to be killed"
    check_complete(output, seed, 2)
    per = result.stats["endpoints"]
    assert set(per) == {url1, url2, doomed_url}
    # exactly one successful completion per generation: nothing done twice
    assert sum(p["ok"] for p in per.values()) == result.stats["completions_ok"] == 180
    assert per[url1]["ok"] == first.requests and per[url2]["ok"] == second.requests
    # while all three lived, the doomed one took its share
    assert min(at_kill.values()) >= 5
    assert per[doomed_url]["ok"] >= 0.3 * min(at_kill.values()), (per[doomed_url], at_kill)
    # then it was taken out (and probed in vain) while the others did the rest
    assert per[doomed_url]["times_taken_out"] >= 1
    assert set(per[doomed_url]["failures"]) <= {"connect_failed", "connection", "truncated_body"}
    assert per[doomed_url]["failures"]
    assert per[url1]["latency_p50_s"] >= 0.1 and per[url1]["latency_p95_s"] >= per[url1]["latency_p50_s"]
    assert per[url1]["completion_tokens"] > 0
    assert result.stats["rows_failed"] == 0


def test_failing_endpoint_is_taken_out_then_probed_back_in(replay_teacher, tmp_path):
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(60))
    flaky, flaky_url = replay_teacher(faults=["500"] * 5, delay=0.05)
    steady, steady_url = replay_teacher(delay=0.05)
    policy = RequestSettings(max_attempts=6, backoff_base=0.02, backoff_max=1.0)  # cool-down 0.2 s
    result = generate(config(seed, tmp_path, f"{flaky_url},{steady_url}", num_generations=1, retry=policy))
    check_complete(result.output_file, seed, 1)
    per = result.stats["endpoints"]
    assert per[flaky_url]["failures"] == {"http_500": 5}
    assert per[flaky_url]["times_taken_out"] == 1
    assert per[flaky_url]["ok"] >= 5  # back in after its cool-down
    assert per[flaky_url]["ok"] + per[steady_url]["ok"] == 60 == flaky.requests - 5 + steady.requests


def test_weights_share_the_load(replay_teacher, tmp_path):
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(40))
    big, big_url = replay_teacher(delay=0.05)
    small, small_url = replay_teacher(delay=0.05)
    endpoints = [Endpoint(big_url, weight=3), Endpoint(small_url, weight=1)]
    result = generate(config(seed, tmp_path, None, endpoints=endpoints, num_generations=2, max_concurrent=8))
    check_complete(result.output_file, seed, 2)
    assert big.requests + small.requests == 80
    assert big.requests >= 2 * small.requests, (big.requests, small.requests)
    assert small.requests >= 10


def test_cli_takes_a_comma_separated_list_and_writes_per_endpoint_stats(replay_teacher, tmp_path):
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(10))
    a, url_a = replay_teacher()
    b, url_b = replay_teacher()
    output = tmp_path / "o.jsonl"
    done = run_cli(
        "generate",
        "--model",
        "m",
        "--dataset-name",
        seed,
        "--output-file",
        output,
        "--api-addr",
        f"{url_a}, {url_b}",
        "--num-generations",
        2,
        "--max-concurrent",
        4,
        "--price-per-mtok-out",
        2.5,
        "--progress-interval",
        0.01,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    stats = json.loads(stats_path(output).read_text())
    assert set(stats["endpoints"]) == {url_a, url_b}
    assert a.requests > 0 and b.requests > 0 and a.requests + b.requests == 20
    assert stats["cost_estimate"] == round(stats["completion_tokens"] * 2.5 / 1e6, 6) > 0


@pytest.mark.slow  # dag.test() in a real Airflow database
def test_operator_reads_endpoints_keys_and_price_from_the_connection(
    airflow_db, replay_teacher, monkeypatch, tmp_path, caplog
):
    import logging

    from tests.dags.stage_dags import generate_dag

    key_a, key_b = "sk-fleet-a-8812", "sk-fleet-b-2290"
    a, b = replay_teacher(api_key=key_a), replay_teacher(api_key=key_b)
    first, second = a.replay, b.replay
    conn = {
        "conn_type": "http",
        "host": a.host,
        "port": a.port,
        "password": key_a,
        "extra": {"endpoints": [{"addr": b.url, "api_key": key_b}], "price_per_mtok_out": 2.0, "max_rpm": 6000},
    }
    monkeypatch.setenv("AIRFLOW_CONN_TEACHER_TEST", json.dumps(conn))
    seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(8))
    caplog.set_level(logging.INFO)
    run = generate_dag.test(run_conf={"seed": str(seed), "out": str(tmp_path), "n": 2})
    assert run.state == "success"
    result = run.get_task_instance("generate").xcom_pull(task_ids="generate")
    check_complete(Path(result["output"]), seed, 2)
    assert set(first.seen_authorization) == {f"Bearer {key_a}"}
    assert set(second.seen_authorization) == {f"Bearer {key_b}"}
    assert first.requests > 0 and second.requests > 0 and first.requests + second.requests == 16
    stats = json.loads(Path(result["stats"]).read_text())
    assert stats["cost_estimate"] == round(stats["completion_tokens"] * 2.0 / 1e6, 6) > 0
    assert key_a not in caplog.text and key_b not in caplog.text
