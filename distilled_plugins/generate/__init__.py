"""Stage 1: generate chain-of-thought completions from an OpenAI-compatible teacher endpoint.

Usage:
    OPENAI_API_KEY=... python -m distilled_plugins.generate \\
        --model deepseek-ai/DeepSeek-R1 --dataset-name ../shared/data/math_train/math12k_train.parquet \\
        --output-file generations.jsonl --prompt-column problem --uuid-column problem \\
        --api-addr localhost:39876 --num-generations 4 --max-tokens 16384 --max-concurrent 100

    # join shard outputs (rows sorted by key, each seed row once):
    python -m distilled_plugins.generate --merge shard-0.jsonl shard-1.jsonl --output-file generations.jsonl

Each output line is ``{**example, "generations", "finish_reasons", "api_metadata", "prompt"}``, one per seed
row, keyed by ``md5(str(row[uuid_column]))``. Work is never lost: every successful completion whose row is
not yet complete is journalled in ``<output>.parts``, a resumed run requests only what is missing, and a
half-written last line left by a killed process is cut off before appending.

With a generation store (``--store-dir``), rows the store already holds are not copied into the output: the
seed rows of those keys are listed in ``<output stem>.reused.jsonl`` (see ``schema.REUSED_SUFFIX``) and
``--merge`` fills in their generated columns from the store, so a rerun's shard work is proportional to its new
rows (``--reused-rows copy`` writes them into the output instead, a complete file without ``--merge``).

With ``--batch`` the requests go to the teacher's Batch API instead, at about half the price (see
``distilled_plugins/generate/batch.py``): the same output, journal, store and stats.

Modules: :mod:`.config` (settings, result, row keys and prompts), :mod:`.prepare` (the first pass over the seed),
:mod:`.journal` (the output, ``.parts`` and what earlier tries left), :mod:`.scheduler` (the online request loop),
:mod:`.batch` (the Batch API mode), :mod:`.stage` (:func:`~.stage.run`: one shard), :mod:`.merge` (``--merge``),
:mod:`.store` (the generation store).
"""

from distilled_plugins.generate.config import GenerateConfig

__all__ = ["GenerateConfig"]
