"""Bounded-memory paths keep the output: the streamed save_to_disk layout, handle's size-capped batches."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets.arrow_writer import ArrowWriter

from distilled_plugins.core import artifacts, io
from distilled_plugins.core.schema import HANDLED_COLUMNS, features
from distilled_plugins.handle import stage as handle_stage
from distilled_plugins.handle.config import HandleConfig
from distilled_plugins.pack import reader as pack_reader
from distilled_plugins.pack.config import PackConfig
from distilled_plugins.pack.stage import run as pack_run
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
            dst = handle_stage.run(
                HandleConfig(src=[str(src)], tokenizer=str(TOKENIZER_DIR), dst=str(tmp_path / name), batch_chars=chars)
            )
            runs[name] = (datasets.load_from_disk(str(dst)), json.loads((dst / "stats.json").read_text()))
        (one, one_stats), (many, many_stats) = runs["one"], runs["many"]
        assert len(one) == 30 and one.data.table.equals(many.data.table)
        for key in ("rows", "tokens", "answer_tokens", "length_percentiles", "dropped"):
            assert one_stats[key] == many_stats[key]

    def test_chunks_respect_the_size_and_keep_order(self):
        rows = [[{"role": "user", "content": "x" * n}] for n in (5, 5, 20, 1, 1, 1)]
        chunks = list(handle_stage._chunks_by_size(rows, 10))
        assert [[len(r[0]["content"]) for r in c] for c in chunks] == [[5, 5], [20], [1, 1, 1]]


def write_handled(dst, rows: int, tokens: int, pad_token_id: int = 151643):
    """A handled dataset as handle writes it (files, marker, stats): ``rows`` samples of ~``tokens`` tokens."""
    rng = np.random.default_rng(0)

    def tables():
        for first in range(0, rows, 10):
            sizes = rng.integers(tokens // 2, tokens, min(10, rows - first))
            offsets = pa.array(np.cumsum([0, *sizes]).astype(np.int32))
            ids = rng.integers(0, 150_000, int(sizes.sum())).astype(np.int32)
            labels = ids.astype(np.int64)
            for start in np.cumsum([0, *sizes[:-1]]):
                labels[start : start + 100] = -100  # the prompt
            yield pa.table(
                {
                    "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
                    "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                }
            )

    io.save_tables_to_disk(tables(), dst, features(HANDLED_COLUMNS))
    (dst / artifacts.ARTIFACT_MARKER).write_text(json.dumps({"kind": "handled"}))
    (dst / "stats.json").write_text(json.dumps({"pad_token_id": pad_token_id}))
    return dst


def resident_mb(paths) -> float:
    """Resident memory of this process's maps of ``paths`` (from /proc/self/smaps)."""
    names, total, inside = {str(p) for p in paths}, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
                inside = fields[-1] in names
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total / 1024


class TestPackMemory:
    def test_rows_are_read_not_mapped(self, tmp_path, monkeypatch):
        # pack reads the rows of each write with pread: a fault in a file map makes Linux map the whole page-cache
        # folio around it, so rows read through the maps made most of the input resident
        src = write_handled(tmp_path / "handled", rows=80, tokens=24_000)
        files = sorted(src.glob("data-*.arrow"))
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        resident = []
        release = pack_reader.release

        def measured(maps):
            resident.append(resident_mb(files))
            release(maps)

        monkeypatch.setattr(pack_reader, "release", measured)
        dst = pack_run(PackConfig(src=str(src), dst=str(tmp_path / "packed"), seq_length=32_768, rows_per_write=8))
        assert len(resident) >= 3 and size_mb > 10
        assert max(resident) < 0.2 * size_mb, (resident, size_mb)
        # the same rows as packing the table in memory (rows as NumPy views of it, no file reads)
        in_memory = datasets.Dataset(datasets.load_from_disk(str(src)).data.table.combine_chunks())
        monkeypatch.setattr(pack_reader, "mapped_table", lambda src, handled: (in_memory.data.table, [], []))
        ref = pack_run(PackConfig(src=str(src), dst=str(tmp_path / "ref"), seq_length=32_768, rows_per_write=8))
        assert datasets.load_from_disk(str(dst)).data.table.equals(datasets.load_from_disk(str(ref)).data.table)
