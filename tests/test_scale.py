"""Bounded-memory paths keep the output: the streamed save_to_disk layout, handle's size-capped batches."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pytest
from datasets.arrow_writer import ArrowWriter

from distilled_plugins import handle, io
from distilled_plugins.handle import HandleConfig
from distilled_plugins.schema import HANDLED_COLUMNS, features
from tests.support import TOKENIZER_DIR, conversation_rows, write_jsonl


def handled_tables(sizes: list[int]) -> list[pa.Table]:
    tables, start = [], 0
    for size in sizes:
        ids = [list(range(start + i, start + 2 * i + 3)) for i in range(size)]
        labels = [[-100, *row[1:]] for row in ids]
        tables.append(
            pa.table(
                {
                    "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                    "labels": pa.array(labels, pa.list_(pa.int64())),
                }
            )
        )
        start += size
    return tables


class TestStreamedSaveToDisk:
    @pytest.mark.parametrize("shards", [1, 3])
    def test_same_files_and_rows_as_save_to_disk(self, tmp_path, monkeypatch, shards):
        tables = handled_tables([4, 5, 6])
        if shards > 1:
            monkeypatch.setattr(io, "MAX_SHARD_BYTES", 1)  # every table closes its shard
        rows = io.save_tables_to_disk(iter(tables), tmp_path / "ours", features(HANDLED_COLUMNS))
        # the old way: one staging Arrow file, mapped and copied by save_to_disk
        with ArrowWriter(features=features(HANDLED_COLUMNS), path=str(tmp_path / "staging.arrow")) as writer:
            for table in tables:
                writer.write_table(table)
            writer.finalize()
        datasets.Dataset.from_file(str(tmp_path / "staging.arrow")).save_to_disk(
            str(tmp_path / "ref"), num_shards=shards
        )
        assert rows == 15
        ours, ref = tmp_path / "ours", tmp_path / "ref"
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in ref.iterdir())
        assert (ours / "dataset_info.json").read_bytes() == (ref / "dataset_info.json").read_bytes()
        state, ref_state = (json.loads((d / "state.json").read_text()) for d in (ours, ref))
        assert state.pop("_fingerprint") != ref_state.pop("_fingerprint") and state == ref_state
        loaded, ref_loaded = datasets.load_from_disk(str(ours)), datasets.load_from_disk(str(ref))
        assert loaded.features == ref_loaded.features
        assert loaded.data.table.equals(ref_loaded.data.table)
        assert not list(ours.glob(".part-*"))

    def test_no_rows_is_one_empty_shard(self, tmp_path):
        assert io.save_tables_to_disk(iter([]), tmp_path / "empty", features(HANDLED_COLUMNS)) == 0
        assert len(datasets.load_from_disk(str(tmp_path / "empty"))) == 0


class TestHandleBatches:
    def test_size_capped_batches_give_the_same_dataset(self, tmp_path):
        src = write_jsonl(tmp_path / "filtered.jsonl", conversation_rows(30))
        runs = {}
        for name, chars in (("one", 10**9), ("many", 2_000)):  # one batch, or a few rows per batch
            dst = handle.run(
                HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / name), batch_chars=chars)
            )
            runs[name] = (datasets.load_from_disk(str(dst)), json.loads((dst / "stats.json").read_text()))
        (one, one_stats), (many, many_stats) = runs["one"], runs["many"]
        assert len(one) == 30 and one.data.table.equals(many.data.table)
        for key in ("rows", "tokens", "answer_tokens", "length_percentiles", "dropped"):
            assert one_stats[key] == many_stats[key]

    def test_chunks_respect_the_size_and_keep_order(self):
        rows = [[{"role": "user", "content": "x" * n}] for n in (5, 5, 20, 1, 1, 1)]
        chunks = list(handle._chunks_by_size(rows, 10))
        assert [[len(r[0]["content"]) for r in c] for c in chunks] == [[5, 5], [20], [1, 1, 1]]
