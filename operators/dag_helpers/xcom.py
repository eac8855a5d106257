"""XCom glue shared by the operators."""

from __future__ import annotations


def with_fields(context, result: dict) -> dict:
    """Push each field of a returned dict as its own XCom too, so ``task.output["field"]`` works downstream."""
    for key, value in result.items():
        context["ti"].xcom_push(key=key, value=value)
    return result
