"""Stage 2: keep the generations whose final answer math_verify (or an LLM judge) accepts against the gold answer.

Usage:
    python -m distilled_plugins.reject_sampling --src generations.jsonl --dst filtered.jsonl
    # with a judge for what math_verify rejects (OpenR1-Math-220k's recipe), and a difficulty band:
    OPENAI_API_KEY=... python -m distilled_plugins.reject_sampling --src generations.jsonl --dst filtered.jsonl \
        --judge-api-addr localhost:8000 --judge-model meta-llama/Llama-3.3-70B-Instruct \
        --min-pass-rate 0.25 --max-pass-rate 0.75

Writes ``--dst`` (the tutorial's schema: kept examples with only their correct ``generations``,
``finish_reasons`` and ``api_metadata``, still aligned, and ``messages`` = user prompt + last correct
generation; plus OpenR1-Math-220k's ``correctness_math_verify``, ``correctness_judge`` and
``is_reasoning_complete``, aligned with ``generations``, and ``correctness_count`` and ``pass_rate`` per row),
``<dst stem>.verdicts.jsonl`` (one verdict per generation, with the judge's where it was asked, for audit) and
``<dst stem>.stats.json``. Examples whose problem shares a word 8-gram with an evaluation problem (MATH-500 by
default) are dropped. Output rows keep input order, and a rerun writes byte-identical files (written to a
temporary name, renamed).

The judge (``--judge-api-addr``: the teacher client's forms, retries, rate limits and fleet; its request flags are
the teacher's with ``--judge-`` in front) is asked only about generations math_verify graded ``wrong`` or
``no_answer`` (never truncated ones, timeouts or filtered golds), plus ``--judge-audit-sample`` accepted ones.
``--judge-policy recover`` keeps a generation math_verify or the judge accepts; ``audit`` asks and records but
keeps by math_verify alone. Its verdicts are cached (:mod:`.judge`): a rerun asks only new questions.

Modules: :mod:`.config` (settings, drop reasons, the result), :mod:`.stage` (``run``: read, grade, ask, write in
input order), :mod:`.examples` (an example's verdicts, its kept row, its verdict lines), :mod:`.tally` (the stats and
the last log line), :mod:`.judge` (the LLM judge and its cache), ``__main__`` (the command line).
"""

from distilled_plugins.reject_sampling.config import RejectSamplingConfig

__all__ = ["RejectSamplingConfig"]
