"""Stage 3: tokenize conversations with the Qwen2.5 chat template, prompt tokens masked out of the labels.

Usage:
    python -m distilled_plugins.handle --src filtered.jsonl --tokenizer ../shared/data/tokenizer/qwen2.5 \\
        --dst handled/

Each example's ``messages`` (stage 2's JSONL, or OpenR1-Math-220k parquet files) get a system message with the
reasoning prompt in front, are rendered with the tokenizer's chat template (no generation prompt) and tokenized
by the fast (Rust) tokenizer in batches. Every label up to and including the first ``<|im_start|>assistant\\n``
is -100; the answer and its closing ``<|im_end|>`` are learned. Writes a ``save_to_disk`` folder with
``input_ids`` and ``labels`` (unshifted), ``stats.json`` and ``lengths.png`` inside ``--dst``.

Modules: :mod:`.config` (the settings, the system prompt, the truncation policies), :mod:`.encoder` (the
tokenizer, the chat template and the label mask, shared with the mindformers handler), :mod:`.stage` (the run:
batches in, dataset, stats and histogram out).
"""

from distilled_plugins.handle.config import HandleConfig

__all__ = ["HandleConfig"]
