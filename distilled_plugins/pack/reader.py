"""Reading stage 3's handled dataset for packing: opened and checked, then read row by row with ``pread`` over
our own memory maps, so resident memory stays at one write's worth however large the input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distilled_plugins.core.cli import one_line
from distilled_plugins.core.errors import DataError, MissingColumn
from distilled_plugins.core.schema import HANDLED_COLUMNS


def load_handled(src: Path):
    """The handled dataset at ``src`` (a ``datasets.Dataset``), refused when it cannot be packed."""
    import datasets

    try:
        handled = datasets.load_from_disk(str(src))
    except (OSError, ValueError) as e:  # a cut-short or foreign folder: pyarrow's message names no file
        raise DataError(f"{src}: cannot be read as a handled dataset ({one_line(e)}); rerun handle") from None
    for column in HANDLED_COLUMNS:
        if column not in handled.column_names:
            raise MissingColumn(
                f"{src}: column {column!r} not found; columns present: {', '.join(handled.column_names)}"
            )
    if "actual_seq_len" in handled.column_names:  # a packed folder from before artifact markers
        raise DataError(f"{src}: is already packed (it has 'actual_seq_len'); --src expects handle's output")
    if len(handled) == 0:
        raise DataError(f"{src}: the handled dataset is empty")
    return handled


class MappedFile(NamedTuple):
    address: int  # where our map of the file starts in memory
    size: int
    fd: int  # the file, open for pread


def mapped_table(src: Path, handled):
    """The handled dataset's table over our own read-only memory maps (same files ``load_from_disk`` maps).

    Only the Arrow metadata and offsets are read through the maps; rows are read with ``pread`` (``ListColumn``).
    The pages of the maps that were touched are dropped from this process after each write (``release``), so
    resident memory stays at one write's worth instead of growing with the input.
    """
    import mmap

    import pyarrow as pa

    maps, tables, files = [], [], []
    for cache in handled.cache_files:
        fd = os.open(cache["filename"], os.O_RDONLY)
        maps.append(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        buffer = pa.py_buffer(maps[-1])
        files.append(MappedFile(buffer.address, buffer.size, fd))
        tables.append(pa.ipc.open_stream(buffer).read_all())
    if not tables:  # an in-memory dataset (not from files): nothing to release
        return handled.data.table, [], []
    return pa.concat_tables(tables).select(list(HANDLED_COLUMNS)), maps, files


def release(maps) -> None:
    import mmap

    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)


class ListColumn:
    """A handled dataset's list column, row by row: offsets as zero-copy NumPy views, values read with ``pread``.

    A row whose values lie in one of ``files`` (our maps of the dataset's files) is read from the file with
    ``os.pread``, not through the map: a fault in a file map makes Linux map the whole page-cache folio around it
    (~1 MB a touch measured on kernel 6.18, up to 2 MB), so the few dozen rows of one write, scattered over the
    files, made ~75 MB resident at 1,000 rows of 16k tokens, and all of a small file: pack's peak grew with the
    input up to that bound. A read copies only the row. Rows of an in-memory table are NumPy views.
    """

    def __init__(self, table, name: str, files: list[MappedFile] = ()):
        chunks = table.column(name).chunks
        self.offsets = [c.offsets.to_numpy() for c in chunks]
        self.first_row = np.cumsum([0] + [len(c) for c in chunks])
        self.sources = []  # per chunk: (fd, file position of value 0, dtype) or (None, NumPy view, dtype)
        for c in chunks:
            values = c.values
            dtype = np.dtype(values.type.to_pandas_dtype())
            start = values.buffers()[1].address + values.offset * dtype.itemsize
            mapped = next((f for f in files if f.address <= start < f.address + f.size), None)
            if mapped is not None:
                self.sources.append((mapped.fd, start - mapped.address, dtype))
            else:
                self.sources.append((None, values.to_numpy(zero_copy_only=False), dtype))

    def _locate(self, index: int) -> tuple[int, int, int]:
        chunk = int(np.searchsorted(self.first_row, index, side="right")) - 1
        local = index - self.first_row[chunk]
        offsets = self.offsets[chunk]
        return chunk, int(offsets[local]), int(offsets[local + 1])

    def read_into(self, index: int, start: int, out: np.ndarray) -> None:
        """Copy ``len(out)`` values of row ``index`` from position ``start`` into ``out`` (a contiguous array)."""
        chunk, first, last = self._locate(index)
        if start + len(out) > last - first:
            raise IndexError(f"row {index} has {last - first} values; asked for {start}:{start + len(out)}")
        fd, where, dtype = self.sources[chunk]
        if fd is None:
            out[:] = where[first + start : first + start + len(out)]
        elif len(out):
            size = os.preadv(fd, [memoryview(out).cast("B")], where + (first + start) * dtype.itemsize)
            if size != out.nbytes:
                raise DataError(
                    f"handled dataset file shorter than its Arrow metadata says (row {index}); rerun handle"
                )

    def row(self, index: int) -> np.ndarray:
        chunk, first, last = self._locate(index)
        fd, where, dtype = self.sources[chunk]
        if fd is None:
            return where[first:last]
        size = (last - first) * dtype.itemsize
        data = os.pread(fd, size, where + first * dtype.itemsize)
        if len(data) != size:
            raise DataError(f"handled dataset file shorter than its Arrow metadata says (row {index}); rerun handle")
        return np.frombuffer(data, dtype)

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self.offsets]) if self.offsets else np.zeros(0, dtype=np.int64)


class Handled(NamedTuple):
    """The handled samples the pieces are read from."""

    ids: ListColumn
    labels: ListColumn
    lengths: np.ndarray  # tokens per sample
