"""Contracts of the artifacts that stages hand to each other, written down once for writer and reader.

| artifact (stage) | files | read by |
|---|---|---|
| generations (generate, merge) | ``<name>.jsonl``: seed row + GENERATION_COLUMNS + ``prompt``; ``<name>.stats.json`` | reject_sampling |
| filtered (reject_sampling) | ``<name>.jsonl``: kept rows, aligned GENERATION_COLUMNS, ``messages``; ``<name>.verdicts.jsonl``; ``<name>.stats.json`` | handle |
| handled (handle) | folder (``save_to_disk``): HANDLED_COLUMNS; ``stats.json`` with STATS_PAD_TOKEN_ID; ``artifact.json`` | pack |
| packed (pack) | folder (``save_to_disk``): PACKED_COLUMNS; ``stats.json`` with STATS_SEQ_LENGTH; ``artifact.json`` | finetune |

Rows of the JSONL artifacts are keyed by :func:`row_key` of the uuid column; folder artifacts carry a marker
(``io.ARTIFACT_MARKER``) naming their kind, so a stage refuses another stage's output as its input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Stage 1 (generate) -> stage 2: aligned lists, one entry per completion of the row
GENERATION_COLUMNS = ("generations", "finish_reasons", "api_metadata")
PROMPT_COLUMN = "prompt"  # the prompt as sent to the teacher (after the template)
# Stage 2 -> stage 3: the conversation to learn (user prompt + last correct generation)
MESSAGES_COLUMN = "messages"

# stats keys another stage reads
STATS_FILE = "stats.json"  # inside a folder artifact
STATS_PAD_TOKEN_ID = "pad_token_id"  # handle's stats, read by pack
STATS_SEQ_LENGTH = "seq_length"  # pack's stats, read by finetune
# every stage's stats begin with these (written by stats.Stats): rows_in == rows_out + sum(dropped.values())
STATS_ROWS_IN = "rows_in"
STATS_ROWS_OUT = "rows_out"
STATS_DROPPED = "dropped"  # {reason: count}


def row_key(uuid) -> str:
    """The key of a seed row: md5 of its uuid column's text (the tutorial's choice, kept for compatibility).

    >>> row_key("What is 1 + 1?")
    '36e295d83bbd704f1dedc779a92e31a8'
    """
    return hashlib.md5(str(uuid).encode()).hexdigest()


def sibling_path(output: str | Path, suffix: str) -> Path:
    """A file written beside a JSONL artifact: ``out.jsonl`` -> ``out<suffix>`` (``.stats.json``, ``.verdicts.jsonl``).

    >>> str(sibling_path("run/filtered.jsonl", ".stats.json"))
    'run/filtered.stats.json'
    """
    output = Path(output)
    return output.with_name(output.stem + suffix)


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
