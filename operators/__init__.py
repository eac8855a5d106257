"""Airflow glue: thin operators that read their settings, call one ``distilled_plugins`` function and return
artifact paths through XCom."""

from operators.generate import GenerateReasoningOperator

__all__ = ["GenerateReasoningOperator"]
