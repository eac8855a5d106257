"""The generation store: one entry per (settings, key), lookups by key, safe with concurrent publishers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from distilled_plugins import generate
from distilled_plugins.store import STORE_FILE, GenerationStore
from tests.support import FAST_RETRY, REPO, cli_env, math_train_rows, read_jsonl, write_jsonl


def gen_config(seed, output, url, store, **overrides) -> generate.GenerateConfig:
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
    return generate.GenerateConfig(**settings)


def entries(store_dir) -> list[tuple[str, str]]:
    with sqlite3.connect(store_dir / STORE_FILE) as db:
        return db.execute("SELECT settings, key FROM generations").fetchall()


class TestKeyedStore:
    def test_one_copy_per_key_after_three_reruns(self, replay_teacher, tmp_path):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(15))
        runs = [generate.run(gen_config(seed, tmp_path / f"run{i}" / "gen.jsonl", url, store)) for i in range(3)]
        assert replay.requests == 15 * 2  # only the first run asked the teacher
        assert [r.stats["store"]["rows_written"] for r in runs] == [15, 0, 0]
        assert [r.stats["rows_reused_from_store"] for r in runs] == [0, 15, 15]
        stored = entries(store)
        assert len(stored) == len(set(stored)) == 15
        assert {key for _, key in stored} == {generate.row_key(r, "problem") for r in read_jsonl(seed)}
        # the file does not grow with reruns (the old store copied every shard file in again)
        assert runs[1].stats["store"]["bytes"] == runs[2].stats["store"]["bytes"]
        lines = [sorted(read_jsonl(r.output_file), key=lambda row: row["problem"]) for r in runs]
        assert lines[0] == lines[1] == lines[2]

    def test_rerun_reads_and_writes_in_proportion_to_the_shard_and_new_rows(self, replay_teacher, tmp_path):
        replay, url = replay_teacher()
        store = tmp_path / "store"
        rows = math_train_rows(90)
        # the store already holds 60 rows of another seed and 20 of this one
        generate.run(gen_config(write_jsonl(tmp_path / "other.jsonl", rows[:60]), tmp_path / "a.jsonl", url, store))
        generate.run(gen_config(write_jsonl(tmp_path / "old.jsonl", rows[60:80]), tmp_path / "b.jsonl", url, store))
        assert len(entries(store)) == 80
        before = replay.requests
        rerun = generate.run(
            gen_config(write_jsonl(tmp_path / "new.jsonl", rows[60:90]), tmp_path / "c.jsonl", url, store)
        )
        counts = rerun.stats["store"]
        assert replay.requests - before == 10 * 2
        assert counts["keys_checked"] == 30 and counts["keys_looked_up"] == 20  # this shard, not the 80 stored
        assert counts["rows_read"] == 20 and counts["rows_written"] == 10
        assert rerun.stats["rows_reused_from_store"] == 20 and len(read_jsonl(rerun.output_file)) == 30
        assert len(entries(store)) == 90

    def test_a_row_written_by_a_killed_run_is_published_on_resume(self, replay_teacher, tmp_path):
        _replay, url = replay_teacher()
        store = tmp_path / "store"
        seed = write_jsonl(tmp_path / "seed.jsonl", math_train_rows(5))
        first = generate.run(gen_config(seed, tmp_path / "gen.jsonl", url, tmp_path / "elsewhere"))
        # as if killed after writing the lines but before their batch reached this store
        resumed = generate.run(gen_config(seed, first.output_file, url, store))
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
from distilled_plugins import generate
from distilled_plugins.client import RetryPolicy
settings = json.loads(sys.argv[1])
settings["retry"] = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_max=0.05, request_timeout=30)
generate.run(generate.GenerateConfig(**settings))
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
        stats = [json.loads(generate.stats_path(tmp_path / f"p{i}").read_text()) for i in range(2)]
        written = [s["store"]["rows_written"] for s in stats]
        stored = entries(store)
        assert len(stored) == len(set(stored)) == 150
        # every row was published by exactly one of them; the other found it already stored
        assert sum(written) == 150
        assert sum(s["store"].get("rows_already_stored", 0) for s in stats) == 300 - 150 - sum(
            s["rows_reused_from_store"] for s in stats
        )
        assert all(len(read_jsonl(tmp_path / f"p{i}")) == 150 for i in range(2))
