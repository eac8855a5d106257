"""The generation store: one entry per (settings, key), lookups by key, safe with concurrent publishers."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from distilled_plugins.core.errors import DataError
from distilled_plugins.core.schema import row_key, stats_path
from distilled_plugins.generate import GenerateConfig, prepare
from distilled_plugins.generate.config import GenerateResult
from distilled_plugins.generate.journal import reused_path
from distilled_plugins.generate.merge import merge
from distilled_plugins.generate.stage import run as generate
from distilled_plugins.generate.store import STORE_FILE, GenerationStore
from tests.support import (
    FAST_RETRY,
    REPO,
    cli_env,
    in_memory_merge,
    math_train_rows,
    read_jsonl,
    wait_until,
    write_jsonl,
)


def gen_config(seed, output, url, store, **overrides) -> GenerateConfig:
    settings = {
        "dataset_name": str(seed),
        "output_file": str(output),
        "model": "teacher",
        "api_addr": url,
        "num_generations": 2,
        "max_concurrent": 4,
        "retry": FAST_RETRY,
        "store_dir": str(store),
    }
    settings.update(overrides)
    return GenerateConfig(**settings)


def entries(store_dir) -> list[tuple[str, str]]:
    with sqlite3.connect(store_dir / STORE_FILE) as db:
        return db.execute("SELECT settings, key FROM generations").fetchall()


class TestKeyedStore:
    def test_one_copy_per_key_after_three_reruns(self, replay_teacher, tmp_path):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(15))
        runs = [generate(gen_config(seed, tmp_path / f"run{i}" / "gen.jsonl", url, store)) for i in range(3)]
        assert replay.requests == 15 * 2  # only the first run asked the teacher
        assert [r.stats["store"]["rows_written"] for r in runs] == [15, 0, 0]
        assert [r.stats["rows_reused_from_store"] for r in runs] == [0, 15, 15]
        stored = entries(store)
        assert len(stored) == len(set(stored)) == 15
        assert {key for _, key in stored} == {row_key(r["problem"]) for r in read_jsonl(seed)}
        # the file does not grow with reruns (the old store copied every shard file in again)
        assert runs[1].stats["store"]["bytes"] == runs[2].stats["store"]["bytes"]
        # the reruns generated nothing: their shard files are empty and their reused lists name every row
        assert [len(read_jsonl(r.output_file)) for r in runs] == [15, 0, 0]
        assert [len(read_jsonl(r.reused_file)) - 1 for r in runs] == [0, 15, 15]
        merged = [merge([r.output_file], tmp_path / f"merged{i}.jsonl", "problem") for i, r in enumerate(runs)]
        assert merged[0].read_bytes() == merged[1].read_bytes() == merged[2].read_bytes()
        assert len(read_jsonl(merged[0])) == 15

    def test_rerun_reads_and_writes_in_proportion_to_the_shard_and_new_rows(self, replay_teacher, tmp_path):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        rows = math_train_rows(90)
        # the store already holds 60 rows of another seed and 20 of this one
        generate(gen_config(write_jsonl(tmp_path / "other.jsonl", rows[:60]), tmp_path / "a.jsonl", url, store))
        generate(gen_config(write_jsonl(tmp_path / "old.jsonl", rows[60:80]), tmp_path / "b.jsonl", url, store))
        assert len(entries(store)) == 80
        before = replay.requests
        rerun = generate(gen_config(write_jsonl(tmp_path / "new.jsonl", rows[60:90]), tmp_path / "c.jsonl", url, store))
        counts = rerun.stats["store"]
        assert replay.requests - before == 10 * 2
        # this shard's keys, not the 80 stored; no stored row is read (merge reads them)
        assert counts["keys_checked"] == 30 and counts["keys_looked_up"] == counts["rows_read"] == 0
        assert counts["rows_written"] == 10
        assert rerun.stats["rows_reused_from_store"] == 20 and len(read_jsonl(rerun.output_file)) == 10
        assert len(entries(store)) == 90
        merged = merge([rerun.output_file], tmp_path / "merged.jsonl", "problem")
        assert len(read_jsonl(merged)) == 30
        assert json.loads(stats_path(merged).read_text())["rows_from_store"] == 20

    def test_a_row_written_by_a_killed_run_is_published_on_resume(self, replay_teacher, tmp_path):
        _replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(5))
        first = generate(gen_config(seed, tmp_path / "gen.jsonl", url, tmp_path / "elsewhere"))
        # as if killed after writing the lines but before their batch reached this store
        resumed = generate(gen_config(seed, first.output_file, url, store))
        assert resumed.stats["rows_already_done"] == 5 and resumed.stats["rows_republished_to_store"] == 5
        assert len(entries(store)) == 5

    def test_settings_are_kept_apart(self, tmp_path):
        with GenerationStore(tmp_path, "a") as a, GenerationStore(tmp_path, "b") as b:
            assert a.publish([("k", b'{"generations": ["from a"]}')]) == 1
            assert b.publish([("k", b'{"generations": ["from b"]}')]) == 1
            assert a.publish([("k", b'{"generations": ["again"]}')]) == 0  # not replaced
            assert dict(a.lookup(["k"])) == {"k": b'{"generations": ["from a"]}'}
            assert dict(b.lookup(["k", "missing"])) == {"k": b'{"generations": ["from b"]}'}
            assert a.entries_by_settings() == {"a": 1, "b": 1}

    def test_bad_journal_mode_lists_the_valid_ones(self, tmp_path, monkeypatch):
        monkeypatch.setenv("DISTILL_STORE_JOURNAL", "memory")
        with pytest.raises(
            ValueError, match=r"Invalid store journal mode 'memory', must be one of \('wal', 'delete'\)"
        ):
            GenerationStore(tmp_path, "s")


_PUBLISHER = """
import json, sys
from distilled_plugins.generate import GenerateConfig
from distilled_plugins.generate.stage import run
from distilled_plugins.teacher.client import RetryPolicy
settings = json.loads(sys.argv[1])
settings["retry"] = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_max=0.05, request_timeout=30)
run(GenerateConfig(**settings))
"""


class TestConcurrentPublishers:
    @pytest.mark.parametrize("journal", ["wal", "delete"])
    def test_two_processes_publish_the_same_rows_at_once(self, replay_teacher, tmp_path, journal):
        _replay, url = replay_teacher(delay=0.01)  # both runs stay in flight together
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(150))
        settings = {
            "dataset_name": str(seed),
            "model": "teacher",
            "api_addr": url,
            "num_generations": 1,
            "max_concurrent": 8,
            "store_dir": str(store),
        }
        env = cli_env(DISTILL_STORE_JOURNAL=journal)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _PUBLISHER,
                    json.dumps({**settings, "output_file": str(tmp_path / f"p{i}")}),
                ],
                cwd=REPO,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        stats = [json.loads(stats_path(tmp_path / f"p{i}").read_text()) for i in range(2)]
        written = [s["store"]["rows_written"] for s in stats]
        stored = entries(store)
        assert len(stored) == len(set(stored)) == 150
        # every row was published by exactly one of them; the other found it already stored
        assert sum(written) == 150
        assert sum(s["store"].get("rows_already_stored", 0) for s in stats) == 300 - 150 - sum(
            s["rows_reused_from_store"] for s in stats
        )
        for i in range(2):
            merged = merge([tmp_path / f"p{i}"], tmp_path / f"merged{i}.jsonl", "problem")
            assert len(read_jsonl(merged)) == 150


def shard_runs(seed, out, url, store, shards=2, **overrides) -> list[GenerateResult]:
    return [
        generate(gen_config(seed, out / f"shard-{i}.jsonl", url, store, shard_index=i, num_shards=shards, **overrides))
        for i in range(shards)
    ]


class TestReusedRows:
    """A rerun's shard writes only its new rows; merge fills in the stored ones and writes what copying wrote."""

    @pytest.mark.parametrize("seed_has_prompt", [False, True])
    def test_rerun_writes_only_new_rows_and_merges_as_copying_did(self, replay_teacher, tmp_path, seed_has_prompt):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        rows = math_train_rows(46)
        if seed_has_prompt:  # a seed column that the generated "prompt" replaces (verl-style seeds)
            rows = [{**row, "prompt": "seed's own"} for row in rows]
        shard_runs(write_jsonl(tmp_path / "old.jsonl", rows[:40]), tmp_path / "first", url, store)
        seed = write_jsonl(tmp_path / "seed.jsonl", rows)  # 6 new problems
        before = replay.requests
        rerun = shard_runs(seed, tmp_path / "rerun", url, store)
        assert replay.requests - before == 6 * 2
        # the shard files hold the 6 new rows only; the reused lists name the other 40; no stored row was read
        assert sum(len(read_jsonl(r.output_file)) for r in rerun) == 6
        assert sum(len(read_jsonl(r.reused_file)) - 1 for r in rerun) == 40
        assert sum(r.stats["rows_reused_from_store"] for r in rerun) == 40
        assert all(r.stats["store"]["rows_read"] == 0 for r in rerun)
        # the behaviour before: every reused row copied into its shard file, then merged
        copied = shard_runs(seed, tmp_path / "copy", url, store, reused_rows="copy")
        assert replay.requests - before == 6 * 2
        assert all(r.reused_file is None for r in copied)
        assert sum(len(read_jsonl(r.output_file)) for r in copied) == 46
        # the reused lists carry seed rows only, never a completion
        listed = [row for r in rerun for row in read_jsonl(r.reused_file)[1:]]
        assert not any(column in row for row in listed for column in ("generations", "api_metadata"))
        merged = merge([r.output_file for r in rerun], tmp_path / "merged.jsonl", "problem")
        old = merge([r.output_file for r in copied], tmp_path / "old-merged.jsonl", "problem")
        assert merged.read_bytes() == old.read_bytes() == in_memory_merge([r.output_file for r in copied], "problem")
        merged_rows = read_jsonl(merged)
        assert len(merged_rows) == 46 and all(len(r["generations"]) == 2 for r in merged_rows)
        assert all(r["prompt"] != "seed's own" for r in merged_rows)
        stats = json.loads(stats_path(merged).read_text())
        assert stats["rows_from_store"] == 40 and stats["rows_out"] == 46

    def test_sigkill_then_resume_keeps_every_row_once(self, replay_teacher, tmp_path):
        replay, url = replay_teacher(delay=0.05)
        store = tmp_path / "store"
        rows = math_train_rows(60)
        generate(gen_config(write_jsonl(tmp_path / "old.jsonl", rows[:30]), tmp_path / "a.jsonl", url, store))
        seed = write_jsonl(tmp_path / "seed.jsonl", rows)
        output = tmp_path / "gen.jsonl"
        settings = {
            "dataset_name": str(seed),
            "model": "teacher",
            "api_addr": url,
            "num_generations": 2,
            "max_concurrent": 2,
            "store_dir": str(store),
            "output_file": str(output),
        }
        proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, json.dumps(settings)], cwd=REPO, env=cli_env())
        # the reused list is out and new rows arrive: kill the shard while it is alive and writing
        wait_until(
            lambda: proc.poll() is not None or (output.exists() and output.stat().st_size > 0),
            120,
            "the shard's first new row",
        )
        assert proc.poll() is None, "the shard ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reused_path(output).is_file()
        before = replay.requests
        resumed = generate(gen_config(seed, output, url, store, max_concurrent=2))
        # only what was missing went out again (at most the two requests in flight were lost)
        assert replay.requests - before <= 30 * 2 - resumed.stats["rows_already_done"] * 2 + 2
        assert resumed.stats["rows_already_done"] >= 1 and resumed.stats["rows_reused_from_store"] == 30
        assert len(read_jsonl(output)) == 30
        merged = read_jsonl(merge([output], tmp_path / "merged.jsonl", "problem"))
        assert sorted(row_key(r["problem"]) for r in merged) == sorted(row_key(r["problem"]) for r in rows)
        assert all(len(r["generations"]) == 2 for r in merged)

    def test_merge_refuses_rows_the_store_lost(self, replay_teacher, tmp_path):
        _replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(8))
        generate(gen_config(seed, tmp_path / "a.jsonl", url, store))
        rerun = generate(gen_config(seed, tmp_path / "b.jsonl", url, store))
        with sqlite3.connect(store / STORE_FILE) as db:
            db.execute("DELETE FROM generations WHERE rowid IN (SELECT rowid FROM generations LIMIT 3)")
        with pytest.raises(DataError, match=r"b\.reused\.jsonl: 3 row\(s\) it lists .* not in the generation store"):
            merge([rerun.output_file], tmp_path / "merged.jsonl", "problem")
        # keyed by another column than the shard's: refused by name, not as rows missing from the store
        with pytest.raises(DataError, match=r"keyed its rows by column 'problem', the merge by 'solution'"):
            merge([rerun.output_file], tmp_path / "merged.jsonl", "solution")
        assert not (tmp_path / "merged.jsonl").exists()
        shutil.rmtree(store)
        with pytest.raises(DataError, match="which does not exist here"):
            merge([rerun.output_file], tmp_path / "merged.jsonl", "problem")

    def test_a_run_that_copies_removes_an_earlier_reused_list(self, replay_teacher, tmp_path):
        _replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(8))
        generate(gen_config(seed, tmp_path / "a.jsonl", url, store))
        listed = generate(gen_config(seed, tmp_path / "b.jsonl", url, store))
        assert listed.reused_file is not None
        copied = generate(gen_config(seed, tmp_path / "b.jsonl", url, store, reused_rows="copy"))
        assert copied.reused_file is None and not reused_path(copied.output_file).exists()
        assert len(read_jsonl(copied.output_file)) == 8

    def test_many_new_rows_stream_the_seed_again(self, replay_teacher, tmp_path, monkeypatch):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        rows = math_train_rows(24)
        generate(gen_config(write_jsonl(tmp_path / "old.jsonl", rows[:4]), tmp_path / "a.jsonl", url, store))
        seed = write_jsonl(tmp_path / "seed.jsonl", rows)
        monkeypatch.setattr(prepare, "KEEP_EXAMPLES", 3)  # 20 new rows: too many to keep, streamed again
        streamed = generate(gen_config(seed, tmp_path / "b.jsonl", url, store))
        monkeypatch.undo()
        kept = generate(gen_config(seed, tmp_path / "c.jsonl", url, tmp_path / "other-store"))
        assert streamed.stats["rows_reused_from_store"] == 4 and streamed.stats["rows_written"] == 20
        assert replay.requests == (4 + 20 + 24) * 2
        merged = [merge([r.output_file], tmp_path / f"m{i}.jsonl", "problem") for i, r in enumerate((streamed, kept))]
        assert merged[0].read_bytes() == merged[1].read_bytes()

    def test_a_list_of_nothing_needs_no_store(self, replay_teacher, tmp_path):
        _replay, url = replay_teacher()
        store = tmp_path / "store"
        first = generate(
            gen_config(write_jsonl(tmp_path / "seed.jsonl", math_train_rows(5)), tmp_path / "a.jsonl", url, store)
        )
        assert len(read_jsonl(first.reused_file)) == 1  # the header alone: nothing was reused
        shutil.rmtree(store)
        assert len(read_jsonl(merge([first.output_file], tmp_path / "merged.jsonl", "problem"))) == 5
