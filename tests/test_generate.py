"""Stage 1 against a real aiohttp server on 127.0.0.1 that speaks the chat-completions protocol."""

from __future__ import annotations

import gc
import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distilled_plugins.core.errors import DataError, FatalRequestError, GenerationIncomplete
from distilled_plugins.core.schema import row_key, stats_path
from distilled_plugins.generate.config import DEFAULT_PROMPT_TEMPLATE
from distilled_plugins.generate.merge import merge
from distilled_plugins.generate.scheduler import Row
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.teacher.endpoints import base_url
from distilled_plugins.teacher.settings import RetryPolicy
from tests.support import (
    FAST_RETRY,
    SECRET,
    answer_with_solution,
    cli_command,
    cli_env,
    in_memory_merge,
    keys_of,
    line_count,
    math_train_rows,
    read_jsonl,
    run_cli,
    wait_until,
    write_jsonl,
)
from tests.support import generate_config as config


class TestOutput:
    def test_schema_prompt_and_request(self, replay_teacher, seed, tmp_path):
        replay, url = replay_teacher()
        result = generate(config(seed, tmp_path, url, max_tokens=123))
        rows = read_jsonl(result.output_file)
        seed_rows = read_jsonl(seed)
        assert len(rows) == len(seed_rows) == 12
        by_problem = {r["problem"]: r for r in rows}
        for example in seed_rows:
            row = by_problem[example["problem"]]
            assert {k: row[k] for k in example} == example
            assert row["prompt"] == DEFAULT_PROMPT_TEMPLATE.format(prompt=example["problem"])
            assert row["generations"] == [answer_with_solution(example["problem"])] * 2
            assert row["finish_reasons"] == ["stop", "stop"]
            assert all(m["completion_tokens"] > 0 for m in row["api_metadata"])
        payload = replay.seen_payloads[0]
        assert payload["model"] == "teacher"
        assert payload["max_tokens"] == 123 and payload["temperature"] == 0.6 and payload["top_p"] == 0.95
        assert payload["messages"][0]["role"] == "user"
        stats = json.loads(result.stats_file.read_text())
        assert stats["rows_written"] == 12 and stats["completions_ok"] == 24 and stats["requests_sent"] == 24
        assert stats["completion_tokens"] > 0
        assert not Path(str(result.output_file) + ".parts").exists()

    def test_reasoning_content_becomes_think_block(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(faults=["reasoning"] * 100)
        rows = read_jsonl(generate(config(seed, tmp_path, url, num_generations=1)).output_file)
        text = rows[0]["generations"][0]
        assert text.startswith("<think>\nLet me think.\n</think>\n")
        assert text.endswith("\\boxed{42}$.")

    def test_duplicate_uuids_are_generated_once(self, replay_teacher, tmp_path):
        rows = math_train_rows(5)
        seed = write_jsonl(tmp_path / "seed.jsonl", rows + rows[:3])
        replay, url = replay_teacher()
        result = generate(config(seed, tmp_path, url, num_generations=1))
        assert len(read_jsonl(result.output_file)) == 5
        assert replay.requests == 5
        assert result.stats["duplicate_uuids_skipped"] == 3
        assert result.stats["rows_in"] == 8 and result.stats["rows_out"] == 5
        assert result.stats["dropped"] == {"duplicate_uuid": 3, "failed": 0, "unfinished": 0}
        # sharded, each shard counts the repeats of its own keys: together, the same 3
        shards = [
            generate(
                config(
                    seed,
                    tmp_path,
                    url,
                    num_generations=1,
                    num_shards=2,
                    shard_index=i,
                    output_file=str(tmp_path / f"shard-{i}.jsonl"),
                )
            ).stats
            for i in (0, 1)
        ]
        assert sum(s["dropped"]["duplicate_uuid"] for s in shards) == 3 and replay.requests == 5 + 5
        assert sum(s["rows_in"] for s in shards) == 8 and sum(s["rows_out"] for s in shards) == 5

    def test_api_addr_forms(self):
        assert base_url("localhost:8000") == "http://localhost:8000"
        assert base_url("https://api.example.com/v1/") == "https://api.example.com"
        assert base_url("http://10.0.0.1:9000") == "http://10.0.0.1:9000"
        with pytest.raises(ValueError, match="invalid API address"):
            base_url("ftp://host:1")

    def test_verl_chat_prompt_column(self, replay_teacher, tmp_path):
        rows = [
            {"prompt": [{"role": "user", "content": r["problem"]}], "uid": i} for i, r in enumerate(math_train_rows(3))
        ]
        seed = write_jsonl(tmp_path / "seed.jsonl", rows)
        replay, url = replay_teacher()
        generate(config(seed, tmp_path, url, num_generations=1, prompt_column="prompt", uuid_column="uid"))
        assert sorted(replay.seen_problems) == sorted(r["prompt"][0]["content"] for r in rows)


class TestMemory:
    def test_a_row_holds_no_completions_once_written(self, replay_teacher, tmp_path):
        """Observed from the teacher's side: while the run goes on, rows holding completions stay in flight."""
        rows = math_train_rows(60)
        holding = []  # per request: live _Row objects that still hold a completion
        gc.collect()
        # rows some earlier test of this process still holds (a traceback, a fixture) are not this run's
        # type() rather than isinstance(): isinstance() on Airflow's lazy proxies in gc's list would evaluate them
        earlier = {id(o) for o in gc.get_objects() if type(o) is Row}

        def answer(problem: str) -> str:
            if replay.requests % 5 == 0:  # a scan of every object is slow: every 5th request is enough
                live = [o for o in gc.get_objects() if type(o) is Row and id(o) not in earlier]
                holding.append(sum(1 for row in live if row.results and any(r is not None for r in row.results)))
            return answer_with_solution(problem)

        replay, url = replay_teacher(answer)
        seed = write_jsonl(tmp_path / "seed.jsonl", rows)
        result = generate(config(seed, tmp_path, url, num_generations=3, max_concurrent=3))
        assert result.stats["rows_written"] == 60 and len(holding) == 180 // 5
        # without the release every written row would still hold its 3 completions: up to 59 by the last request
        assert max(holding) <= 3, max(holding)
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o) is Row and id(o) not in earlier]


class TestRetries:
    @pytest.mark.parametrize("fault", ["500", "503", "bad_json", "truncated"])
    def test_transient_fault_is_retried(self, replay_teacher, seed, tmp_path, fault):
        replay, url = replay_teacher(faults=[fault, fault])
        result = generate(config(seed, tmp_path, url, max_concurrent=1))
        assert len(read_jsonl(result.output_file)) == 12
        cause = {"500": "http_500", "503": "http_503", "bad_json": "bad_json", "truncated": "truncated_body"}[fault]
        assert result.stats["retries"] == {cause: 2}
        assert replay.requests == 24 + 2

    def test_429_honours_retry_after(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(faults=["429"], retry_after="1")
        started = time.monotonic()
        result = generate(config(seed, tmp_path, url, max_concurrent=1, num_generations=1))
        assert time.monotonic() - started >= 1.0  # backoff alone would have waited at most 0.05 s
        assert result.stats["retries"] == {"http_429": 1}
        assert len(read_jsonl(result.output_file)) == 12

    def test_slow_reply_times_out_and_is_retried(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(faults=["slow"])
        policy = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_max=0.05, request_timeout=0.5)
        result = generate(config(seed, tmp_path, url, max_concurrent=1, num_generations=1, retry=policy))
        assert result.stats["retries"] == {"timeout": 1}
        assert len(read_jsonl(result.output_file)) == 12

    def test_backoff_grows_and_respects_bounds(self):
        policy = RetryPolicy(backoff_base=1.0, backoff_max=8.0)
        for failed, ceiling in {1: 1, 2: 2, 3: 4, 4: 8, 9: 8}.items():
            delays = [policy.delay(failed) for _ in range(200)]
            assert all(0 <= d <= ceiling for d in delays), (failed, max(delays))
            assert max(delays) > ceiling / 2  # jitter spreads over the whole range
        assert policy.delay(1, retry_after=30) == 30

    @pytest.mark.parametrize(
        ("status", "hint"),
        [("400", "rejected the request"), ("401", "OPENAI_API_KEY"), ("404", "no such endpoint or model")],
    )
    def test_client_errors_fail_at_once(self, replay_teacher, seed, tmp_path, status, hint):
        replay, url = replay_teacher(faults=[status])
        with pytest.raises(FatalRequestError, match=hint) as info:
            generate(config(seed, tmp_path, url, max_concurrent=1))
        assert f"HTTP {status}" in str(info.value)
        assert replay.requests == 1

    def test_unreachable_endpoint_is_one_clear_error(self, seed, tmp_path):
        import socket

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(FatalRequestError, match=f"cannot reach the teacher endpoint http://127.0.0.1:{port}"):
            generate(config(seed, tmp_path, f"127.0.0.1:{port}"))


class TestNothingLost:
    def test_sibling_success_is_kept_and_resume_requests_only_missing(self, replay_teacher, seed, tmp_path):
        # the first problem's second generation fails on every attempt: its row stays incomplete, its sibling is kept
        from aiohttp import web

        first_problem = read_jsonl(seed)[0]["problem"]
        calls = []

        def flaky(problem):
            if problem == first_problem:
                calls.append(problem)
                if 1 < len(calls) <= 1 + FAST_RETRY.max_attempts:
                    raise web.HTTPInternalServerError(text='{"error": "boom"}', content_type="application/json")
            return answer_with_solution(problem)

        replay, url = replay_teacher(answer=flaky)
        cfg = config(seed, tmp_path, url, max_concurrent=1)
        with pytest.raises(GenerationIncomplete, match="1 of 12 rows still miss completions") as info:
            generate(cfg)
        assert "run again to resume" in str(info.value)
        assert len(read_jsonl(cfg.output_file)) == 11
        parts = read_jsonl(cfg.output_file + ".parts")
        failed_key = row_key(first_problem)
        assert [p["i"] for p in parts if p["key"] == failed_key] == [0]
        stats = json.loads(stats_path(cfg.output_file).read_text())
        assert stats["rows_failed"] == 1 and stats["failed_requests"] == {"http_500": 1}
        assert stats["rows_in"] == 12 and stats["rows_out"] == 11
        assert stats["dropped"] == {"duplicate_uuid": 0, "failed": 1, "unfinished": 0}

        before = replay.requests
        result = generate(cfg)
        assert replay.requests - before == 1  # only the failed generation is requested again
        rows = read_jsonl(result.output_file)
        assert len(rows) == 12 and len(set(keys_of(result.output_file))) == 12
        assert all(len(r["generations"]) == 2 for r in rows)
        assert result.stats["generations_resumed"] == 1 and result.stats["rows_already_done"] == 11
        assert result.stats["rows_in"] == result.stats["rows_out"] == 12  # 11 already done + 1 written
        # what the shard cost over both tries; a third (a cleared task finding every row done) sends nothing and
        # still reports it
        first_sent = stats["requests_sent"]
        assert result.stats["requests_sent"] == 1 and result.stats["spent_before"]["requests_sent"] == first_sent
        assert result.stats["spent_total"]["requests_sent"] == first_sent + 1
        again = generate(cfg)
        assert again.stats["requests_sent"] == 0 and again.stats["spent_total"] == result.stats["spent_total"]

    def test_half_written_last_line_is_repaired_not_appended_onto(self, replay_teacher, seed, tmp_path):
        replay, url = replay_teacher()
        cfg = config(seed, tmp_path, url)
        generate(cfg)
        lines = Path(cfg.output_file).read_bytes().splitlines(keepends=True)
        # keep 5 whole lines and half of the sixth, as a kill in the middle of a write could leave
        Path(cfg.output_file).write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
        before = replay.requests
        generate(cfg)
        assert replay.requests - before == 2 * 7
        rows = read_jsonl(cfg.output_file)  # every line parses
        assert len(rows) == 12 and all(len(r["generations"]) == 2 for r in rows)
        assert sorted(keys_of(cfg.output_file)) == sorted(row_key(r["problem"]) for r in read_jsonl(seed))

    def test_sigkill_at_any_moment_then_resume(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(60))
        replay, url = replay_teacher(delay=0.05)
        output = tmp_path / "gen.jsonl"
        cmd = cli_command(
            "generate",
            "--model",
            "teacher",
            "--dataset-name",
            str(seed),
            "--output-file",
            str(output),
            "--api-addr",
            url,
            "--num-generations",
            "3",
            "--max-concurrent",
            "4",
            "--backoff-base",
            "0.01",
        )
        for rows in (8, 25, 42):  # killed at three points of the run, each while it is writing
            proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda rows=rows: line_count(output) >= rows, 60, f"the CLI writing its row {rows}")
                assert proc.poll() is None, f"the CLI ended (status {proc.returncode}) before it could be killed"
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
            assert proc.returncode == -signal.SIGKILL
        done = run_cli("generate", *cmd[3:], timeout=120)
        assert done.returncode == 0, done.stderr
        rows = read_jsonl(output)
        keys = keys_of(output)
        assert len(keys) == len(set(keys)) == 60
        assert all(len(r["generations"]) == 3 for r in rows)
        # completions were resumed, not all requested again: at most the in-flight ones were lost per kill
        assert replay.requests <= 60 * 3 + 3 * 4


class TestShards:
    def test_shards_partition_and_merge_equals_unsharded(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(30))
        replay, url = replay_teacher()
        shards = [
            generate(
                config(
                    seed,
                    tmp_path,
                    url,
                    num_generations=1,
                    num_shards=3,
                    shard_index=i,
                    output_file=str(tmp_path / f"shard-{i}.jsonl"),
                )
            ).output_file
            for i in range(3)
        ]
        shard_keys = [set(keys_of(p)) for p in shards]
        assert sum(map(len, shard_keys)) == 30 and len(set().union(*shard_keys)) == 30
        assert all(shard_keys)
        merged = merge(shards, tmp_path / "merged.jsonl", "problem")
        single = generate(config(seed, tmp_path, url, num_generations=1, output_file=str(tmp_path / "one.jsonl")))
        merge([single.output_file], tmp_path / "one-merged.jsonl", "problem")
        assert merged.read_bytes() == (tmp_path / "one-merged.jsonl").read_bytes()
        assert replay.requests == 60

    def test_streaming_merge_equals_the_in_memory_merge(self, replay_teacher, tmp_path):
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(40))
        _replay, url = replay_teacher()
        shards = [
            generate(
                config(seed, tmp_path, url, num_shards=n, shard_index=i, output_file=str(tmp_path / f"s{n}-{i}.jsonl"))
            ).output_file
            for n, i in ((3, 0), (3, 1), (3, 2), (2, 0))  # the last overlaps the others: 2-shard 0 repeats keys
        ]
        overlap = len(set(keys_of(shards[3])))
        assert overlap > 0
        merged = merge(shards, tmp_path / "merged.jsonl", "problem")
        assert merged.read_bytes() == in_memory_merge(shards, "problem")
        assert len(read_jsonl(merged)) == 40
        stats = json.loads(stats_path(merged).read_text())
        assert stats["rows_in"] == 40 + overlap and stats["rows_out"] == 40
        assert stats["dropped"] == {"duplicate_key": overlap} and stats["shards"] == 4
        # the first shard given wins a duplicated key, as in the old merge: reorder and compare again
        reordered = merge(shards[::-1], tmp_path / "reordered.jsonl", "problem")
        assert reordered.read_bytes() == in_memory_merge(shards[::-1], "problem")

    def test_merge_refuses_a_missing_shard(self, tmp_path):
        shard = write_jsonl(tmp_path / "shard-0.jsonl", [{"problem": "a", "generations": ["x"]}])
        with pytest.raises(DataError, match="shard-1.jsonl: no such shard file"):
            merge([shard, tmp_path / "shard-1.jsonl"], tmp_path / "merged.jsonl", "problem")
        assert not (tmp_path / "merged.jsonl").exists()
        done = run_cli(
            "generate", "--merge", shard, tmp_path / "shard-1.jsonl", "--output-file", tmp_path / "merged.jsonl"
        )
        assert done.returncode == 1
        assert "no such shard file" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

    def test_merge_refuses_an_unfinished_shard(self, tmp_path):
        shard = tmp_path / "shard.jsonl"
        shard.write_text('{"problem": "a", "generations": []}\n{"problem": "b", "gener')
        with pytest.raises(DataError, match="cut-short"):
            merge([shard], tmp_path / "merged.jsonl", "problem")


class TestBadInput:
    def test_missing_column_names_it_and_lists_present(self, replay_teacher, seed, tmp_path):
        with pytest.raises(DataError, match=r"column 'question' not found; columns present: problem, answer"):
            generate(config(seed, tmp_path, "127.0.0.1:9", prompt_column="question"))

    def test_empty_seed(self, tmp_path):
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        with pytest.raises(DataError, match="seed dataset is empty"):
            generate(config(empty, tmp_path, "127.0.0.1:9"))

    @pytest.mark.parametrize(
        ("template", "message"),
        [("Solve this.", "must contain {prompt}"), ("Put it in \\boxed{}: {prompt}", "write literal braces")],
    )
    def test_bad_template(self, seed, tmp_path, template, message):
        with pytest.raises(ValueError, match=message):
            config(seed, tmp_path, "127.0.0.1:9", prompt_template=template)

    def test_parquet_seed_and_missing_file(self, replay_teacher, tmp_path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = math_train_rows(4)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "seed.parquet")
        _replay, url = replay_teacher()
        result = generate(config(tmp_path / "seed.parquet", tmp_path, url, num_generations=1))
        assert len(read_jsonl(result.output_file)) == 4
        with pytest.raises(DataError, match="no such file"):
            generate(config(tmp_path / "nope.parquet", tmp_path, url))

    def test_cli_bad_template_is_one_clear_line(self, tmp_path, seed):
        done = run_cli(
            "generate",
            "--model",
            "m",
            "--dataset-name",
            seed,
            "--output-file",
            tmp_path / "o.jsonl",
            "--prompt-template",
            "nothing",
        )
        assert done.returncode == 1
        assert "must contain {prompt}" in done.stderr and "Traceback" not in done.stderr


class TestSecrets:
    def test_key_is_sent_but_never_logged_or_written(self, replay_teacher, seed, tmp_path, caplog):
        replay, url = replay_teacher(api_key=SECRET, faults=["500", "bad_json"])
        caplog.set_level(logging.DEBUG)
        cfg = config(seed, tmp_path, url, api_key=SECRET, progress_interval=0.01)
        generate(cfg)
        assert replay.seen_authorization[-1] == f"Bearer {SECRET}"
        assert SECRET not in repr(cfg)
        assert SECRET not in caplog.text
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path

    def test_key_refused_error_does_not_echo_it(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(api_key="sk-the-right-one")
        with pytest.raises(FatalRequestError, match="API key was refused") as info:
            generate(config(seed, tmp_path, url, api_key=SECRET))
        assert SECRET not in str(info.value)

    def test_cli_reads_key_from_environment(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher(api_key=SECRET)
        done = run_cli(
            "generate",
            "--model",
            "m",
            "--dataset-name",
            seed,
            "--output-file",
            tmp_path / "o.jsonl",
            "--api-addr",
            url,
            "--num-generations",
            1,
            "--api-key-env",
            "TEACHER_KEY",
            env=cli_env(TEACHER_KEY=SECRET),
        )
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stderr + done.stdout
        assert len(read_jsonl(tmp_path / "o.jsonl")) == 12


class TestGenerationStore:
    def test_a_second_run_generates_only_new_rows(self, replay_teacher, tmp_path):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        first_seed = write_jsonl(tmp_path / "seed1.jsonl", math_train_rows(10))
        generate(
            config(first_seed, tmp_path, url, output_file=str(tmp_path / "run1" / "gen.jsonl"), store_dir=str(store))
        )
        assert replay.requests == 20
        refreshed = write_jsonl(tmp_path / "seed2.jsonl", math_train_rows(13))  # 3 new problems
        second = generate(
            config(refreshed, tmp_path, url, output_file=str(tmp_path / "run2" / "gen.jsonl"), store_dir=str(store))
        )
        assert replay.requests == 20 + 3 * 2
        assert second.stats["rows_reused_from_store"] == 10
        assert len(read_jsonl(second.output_file)) == 3  # the new rows; merge adds the 10 reused from the store
        merged = merge([second.output_file], tmp_path / "merged.jsonl", "problem")
        assert len(read_jsonl(merged)) == 13 and len(set(keys_of(merged))) == 13
        other = generate(
            config(
                refreshed,
                tmp_path,
                url,
                output_file=str(tmp_path / "run3" / "gen.jsonl"),
                store_dir=str(store),
                temperature=1.0,
            )
        )  # other settings: nothing reused
        assert other.stats["rows_reused_from_store"] == 0 and replay.requests == 26 + 13 * 2
