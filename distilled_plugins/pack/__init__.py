"""Stage 4: pack tokenized samples into fixed-length rows in mindformers' packed format.

Usage:
    python -m distilled_plugins.pack --src handled/ --dst packed/ --overlong split
    # seq_length defaults to model.model_config.seq_length of configs/finetune_qwen_2_5_7b.yaml

The plan is best-fit-decreasing over the whole dataset (deterministic); samples longer than ``seq_length`` are
truncated, split into ``seq_length`` pieces, or dropped, and each case is counted. A piece that would hold no
trainable token (a split sample's prompt-only head, a truncated sample cut before its answer) is not emitted:
it would add a loss step over nothing; such pieces are counted by reason in ``stats.json``. Output rows hold
``input_ids`` (int32), ``labels`` (int64, each sample's labels shifted: ``labels[1:] + [pad]``) and
``actual_seq_len`` (cumulative end offsets), padded with the pad id / -100: what mindformers' ``HFDataLoader``
reads with ``create_attention_mask: True``. ``stats.json`` (packs, efficiency, samples per pack, overlong
samples by policy) is written inside ``--dst``.

Modules: :mod:`.config` (the settings, the overlong policies), :mod:`.plan` (pieces, the trainable-token check,
best-fit-decreasing), :mod:`.reader` (the handled dataset, read row by row with ``pread``), :mod:`.rows` (packed
rows as Arrow tables), :mod:`.stage` (the run and its stats).
"""

from distilled_plugins.pack.config import PackConfig

__all__ = ["PackConfig"]
