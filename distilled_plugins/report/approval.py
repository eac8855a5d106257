"""The figures the approval gate before fine-tuning shows (``operators/approval.py``), taken from the report's."""

from __future__ import annotations


def data_summary(figures: dict) -> dict:
    """The figures a person approves fine-tuning on (the approval gate's body): kept rows, tokens, truncated share,
    teacher cost."""
    packing, grading, teacher = figures["packing"] or {}, figures["grading"] or {}, figures["teacher"]
    return {
        "kept_rows": dict(figures["funnel"])["kept"],
        "packed_rows": packing.get("packs"),
        "tokens": packing.get("tokens"),
        "truncated_share": grading.get("truncated_share"),
        "teacher_cost": teacher["cost_estimate"],
        "teacher_tokens": teacher.get("prompt_tokens", 0) + teacher.get("completion_tokens", 0),
    }
