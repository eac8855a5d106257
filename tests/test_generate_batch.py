"""Stage 1 in batch mode against the local Batch API (``devtools/batch_server.py``): the same rows as online mode,
re-attached after a kill, failed/expired requests sent again alone, split at the provider's limits, the budget's
worst case refused; and the trigger the operator defers on."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest

from distilled_plugins.core.errors import BatchError, BudgetReached, DataError, GenerationIncomplete
from distilled_plugins.core.schema import parts_path, stats_path
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.report.collect import teacher_figures
from distilled_plugins.teacher.batch_api import BatchesRunning, BatchSettings, BatchState, batch_folder
from distilled_plugins.teacher.settings import RequestSettings
from tests.support import (
    SECRET,
    cli_command,
    cli_env,
    keys_of,
    read_jsonl,
    wait_until,
)
from tests.support import generate_config as config

PRICES = {"price_per_mtok_in": 0.55, "price_per_mtok_out": 2.19}


def batch_config(seed, tmp_path, url, retry=None, api_key=None, **batch) -> GenerateConfig:
    """Stage 1 settings of a test in batch mode: a quick poll, 3 attempts, DeepSeek-R1's online prices."""
    settings = BatchSettings("batch", **{"batch_poll_seconds": 0.05, **batch})
    retry = retry or RequestSettings(max_attempts=3, **PRICES)
    return config(seed, tmp_path, url, batch=settings, retry=retry, api_key=api_key)


def comparable(path) -> dict:
    """Rows by key, with what the teacher said (usage aside: the two servers count total tokens apart)."""
    rows = read_jsonl(path)
    return {k: (r["prompt"], r["generations"], r["finish_reasons"]) for k, r in zip(keys_of(path), rows, strict=True)}


class TestBatchRun:
    def test_a_batch_run_writes_what_online_mode_writes_at_half_the_cost(
        self, batch_teacher, replay_teacher, seed, tmp_path
    ):
        provider, url = batch_teacher(api_key=SECRET)
        batch = generate(batch_config(seed, tmp_path / "batch", url, api_key=SECRET))
        _replay, online_url = replay_teacher()
        online = generate(config(seed, tmp_path / "online", online_url, retry=RequestSettings(**PRICES)))
        assert comparable(batch.output_file) == comparable(online.output_file)
        assert len(provider.batches) == 1 and provider.statuses() == ["completed"]
        assert sorted(provider.completed.values()) == [1] * 24
        first = json.loads(provider.files["file-1"]["content"].splitlines()[0])
        assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
        assert first["body"]["model"] == "teacher" and first["body"]["max_tokens"] == 16384
        assert first["body"]["messages"][0]["content"].startswith("You will be given a problem.")
        stats = batch.stats
        assert stats["teacher_mode"] == "batch" and online.stats["teacher_mode"] == "online"
        assert stats["batches"] == [
            {"batch_id": "batch_1", "input_file_id": "file-1", "status": "completed", "requests": 24, "completed": 24}
        ]
        assert stats["rows_written"] == 12 and stats["completions_ok"] == 24 and stats["requests_sent"] == 24
        assert stats["completion_tokens"] == online.stats["completion_tokens"]
        assert stats["cost_estimate"] == pytest.approx(online.stats["cost_estimate"] / 2, rel=0.01)
        assert not parts_path(batch.output_file).exists()
        assert not list(batch_folder(batch.output_file).glob("*.jsonl"))  # inputs and results gone once read
        teacher = teacher_figures([stats])  # the run's report says so
        assert (teacher["mode"], teacher["batches"], teacher["cost_estimate"]) == (
            "batch",
            ["batch_1"],
            stats["cost_estimate"],
        )

    def test_a_killed_run_reattaches_to_its_batch(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(hold=True)
        out = tmp_path / "gen.jsonl"
        command = cli_command(
            "generate", "--batch", "--batch-poll-seconds", "0.1", "--model", "teacher", "--dataset-name", seed,
            "--output-file", out, "--api-addr", url, "--num-generations", 2,
        )  # fmt: skip
        first = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: provider.statuses() == ["in_progress"], 60, "the batch to run")
            wait_until(lambda: BatchState.load(batch_folder(out)).running_ids(), 30, "the batch id recorded")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        looks = provider.looks["batch_1"]
        second = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: provider.looks["batch_1"] > looks + 2, 60, "the rerun to look at the batch")
            provider.release()
            log, _ = second.communicate(timeout=120)
        finally:
            second.kill()
        assert second.returncode == 0, log
        assert list(provider.batches) == ["batch_1"] and len(provider.files) == 2  # one input, one output file
        assert sorted(provider.submitted.values()) == sorted(provider.completed.values()) == [1] * 24
        assert len(read_jsonl(out)) == 12 and "submitted batch" not in log and "collected batch batch_1" in log
        assert "batch mode: 0 row(s) written, 12 left, 0 failed; 1 batch(es) running (batch_1)" in log
        stats = json.loads(stats_path(out).read_text())  # the killed process's submission counted once
        assert stats["requests_sent"] == stats["spent_total"]["requests_sent"] == 24

    def test_the_spend_of_a_batch_run_over_deferrals_and_a_rerun_is_counted_once(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(hold=True)
        cfg = batch_config(seed, tmp_path, url)
        with pytest.raises(BatchesRunning):  # the operator's first step: submit, write the stats, defer
            generate(cfg, wait_for_batches=False)
        provider.release()
        collected = generate(cfg)  # the step after the deferral goes on with the same run's figures
        assert collected.stats["requests_sent"] == collected.stats["spent_total"]["requests_sent"] == 24
        assert collected.stats["spent_before"]["requests_sent"] == 0
        again = generate(cfg)  # a cleared task: every row is done, nothing is sent, the cost is still told
        assert again.stats["requests_sent"] == 0
        assert again.stats["spent_total"] == collected.stats["spent_total"]
        assert again.stats["spent_total"]["cost_estimate"] > 0

    def test_a_batch_created_but_not_recorded_is_found_by_its_input_file(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(hold=True)
        cfg = batch_config(seed, tmp_path, url)
        with pytest.raises(BatchesRunning):
            generate(cfg, wait_for_batches=False)
        state = BatchState.load(batch_folder(cfg.output_file))
        del state.batches[0]["batch_id"]  # as a kill between the provider's reply and the record's write leaves it
        state.save()
        provider.release()
        result = generate(cfg)
        assert list(provider.batches) == ["batch_1"] and result.stats["rows_written"] == 12
        assert sorted(provider.completed.values()) == [1] * 24


class TestResubmission:
    def test_failed_requests_go_again_alone_in_a_follow_up_batch(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(fail_first=3)
        result = generate(batch_config(seed, tmp_path, url))
        assert list(provider.batches) == ["batch_1", "batch_2"]
        errors = provider.files[provider.batches["batch_1"]["error_file_id"]]["content"].splitlines()
        failed = sorted(json.loads(line)["custom_id"] for line in errors)
        assert len(failed) == 3 and sorted(provider.inputs["batch_2"]) == failed
        assert sorted(provider.completed.values()) == [1] * 24
        assert result.stats["rows_written"] == 12 and result.stats["retries"] == {"server_error": 2, "http_500": 1}

    def test_requests_out_of_attempts_fail_their_rows_and_a_rerun_completes_them(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(fail_first=3)
        cfg = batch_config(seed, tmp_path, url, retry=RequestSettings(max_attempts=1))
        with pytest.raises(GenerationIncomplete, match="still miss completions"):
            generate(cfg)
        stats = json.loads(stats_path(cfg.output_file).read_text())
        assert stats["rows_failed"] == stats["dropped"]["failed"] >= 2 and len(provider.batches) == 1
        result = generate(cfg)
        assert result.stats["rows_written"] == stats["rows_failed"] and len(read_jsonl(result.output_file)) == 12
        assert sorted(provider.completed.values()) == [1] * 24

    def test_an_expired_batch_is_completed_by_a_follow_up(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(seconds_per_request=0.02, expire_after=[0.2])
        result = generate(batch_config(seed, tmp_path, url))
        first = provider.batches["batch_1"]
        assert first["status"] == "expired" and 0 < first["request_counts"]["completed"] < 24
        assert len(provider.inputs["batch_2"]) == 24 - first["request_counts"]["completed"]
        assert sorted(provider.completed.values()) == [1] * 24  # nothing answered twice
        assert result.stats["retries"] == {"batch_expired": len(provider.inputs["batch_2"])}
        assert len(read_jsonl(result.output_file)) == 12


class TestLimits:
    def test_requests_over_the_limit_are_split_with_each_row_in_one_batch(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher(max_requests=5)
        result = generate(batch_config(seed, tmp_path, url, batch_max_requests=5))
        assert len(provider.batches) == 6 and set(provider.statuses()) == {"completed"}
        for ids in provider.inputs.values():
            assert len(ids) == 4 and len({cid.rpartition("-")[0] for cid in ids}) == 2
        assert len(result.stats["batches"]) == 6 and result.stats["rows_written"] == 12

    def test_bytes_over_the_limit_are_split(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher()
        result = generate(batch_config(seed, tmp_path, url, batch_max_bytes=3000))
        sizes = [provider.files[b["input_file_id"]]["bytes"] for b in provider.batches.values()]
        assert len(sizes) > 1 and max(sizes) <= 3000 and result.stats["rows_written"] == 12

    def test_a_batch_whose_worst_case_passes_the_budget_is_not_submitted(self, batch_teacher, seed, tmp_path):
        provider, url = batch_teacher()
        # 24 requests x 1000 tokens x $2.19/M x 0.5 = $0.026 at worst
        retry = RequestSettings(max_cost=0.02, **PRICES)
        cfg = batch_config(seed, tmp_path, url, retry=retry)
        cfg.max_tokens = 1000
        with pytest.raises(BudgetReached, match="could cost up to 0.02"):
            generate(cfg)
        assert provider.batches == {} and provider.files == {}
        stats = json.loads(stats_path(cfg.output_file).read_text())
        assert stats["requests_not_sent_budget"] == 24 and stats["budget_reached"]
        cfg.retry = RequestSettings(max_cost=0.03, **PRICES)
        assert generate(cfg).stats["rows_written"] == 12


class TestTeacherBatchTrigger:
    def test_serialization(self):
        from operators.triggers.teacher_batch import TeacherBatchTrigger

        trigger = TeacherBatchTrigger("/x/shard-0.batches", "teacher_default", 5.0)
        assert trigger.serialize() == (
            "operators.triggers.teacher_batch.TeacherBatchTrigger",
            {"batch_folder": "/x/shard-0.batches", "teacher_conn_id": "teacher_default", "poll_seconds": 5.0},
        )

    def test_it_logs_each_change_and_fires_when_a_batch_ends(self, batch_teacher, seed, tmp_path, monkeypatch, capsys):
        from operators.triggers.teacher_batch import TeacherBatchTrigger

        provider, url = batch_teacher(hold=True, api_key=SECRET)
        conn = {"conn_type": "http", "host": "127.0.0.1", "port": int(url.rpartition(":")[2]), "password": SECRET}
        monkeypatch.setenv("AIRFLOW_CONN_TEACHER_BATCH", json.dumps(conn))
        cfg = batch_config(seed, tmp_path, url, api_key=SECRET)
        with pytest.raises(BatchesRunning):
            generate(cfg, wait_for_batches=False)
        trigger = TeacherBatchTrigger(str(batch_folder(cfg.output_file)), "teacher_batch", 0.05)

        async def watch():
            event = asyncio.ensure_future(anext(trigger.run()))
            await asyncio.sleep(0.5)
            assert not event.done()
            provider.release()
            return await asyncio.wait_for(event, 30)

        event = asyncio.run(watch())
        assert event.payload["status"] == "ended"
        log = capsys.readouterr().out  # the trigger's log (structlog, as in the triggerer)
        assert "batch batch_1 in_progress: 0/24 completed" in log
        assert "batch batch_1 completed: 24/24 completed, 0 failed" in log
        assert SECRET not in log
        stats = generate(cfg).stats  # the step after the deferral reports the whole run
        assert stats["rows_written"] == 12 and stats["requests_sent"] == stats["completions_ok"] == 24
        assert stats["cost_estimate"] > 0


class TestErrors:
    def test_an_endpoint_without_a_batch_api_fails_with_one_line(self, replay_teacher, seed, tmp_path):
        _replay, url = replay_teacher()  # chat completions only
        with pytest.raises(BatchError, match="no Batch API .* use teacher mode online"):
            generate(batch_config(seed, tmp_path, url))

    def test_a_record_of_another_provider_is_not_attached_to(self, batch_teacher, seed, tmp_path):
        _held, url = batch_teacher(hold=True)
        cfg = batch_config(seed, tmp_path, url)
        with pytest.raises(BatchesRunning):
            generate(cfg, wait_for_batches=False)
        _other, other_url = batch_teacher()
        with pytest.raises(DataError, match="were submitted to"):
            generate(batch_config(seed, tmp_path, other_url))
