"""Schemas of the artifacts that stages hand to each other, written down once for writer and reader."""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a token that does not count in the loss (mindformers' ignore_token_id)

# Stage 3 (handle) -> stage 4 (pack): one tokenized conversation per row, labels NOT shifted
HANDLED_COLUMNS = {"input_ids": "int32", "labels": "int64"}

# Stage 4 (pack) -> stage 5 (fine-tune): mindformers' packed format. Each sample's labels are shifted
# (labels[1:] + [pad_id]); the row is padded with pad_id in input_ids and IGNORE_INDEX in labels;
# actual_seq_len holds the cumulative end offset of each sample in the row.
PACKED_COLUMNS = {"input_ids": "int32", "labels": "int64", "actual_seq_len": "int32"}


def features(columns: dict[str, str]):
    """``datasets.Features`` of list-of-integer columns."""
    import datasets

    return datasets.Features({name: datasets.Sequence(datasets.Value(dtype)) for name, dtype in columns.items()})
