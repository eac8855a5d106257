"""Airflow glue: thin operators that read their settings, call one ``distilled_plugins`` function and return
artifact paths through XCom."""

from operators.evaluate import Math500EvalOperator
from operators.finetune import MsrunFinetuneOperator
from operators.generate import GenerateReasoningOperator, MergeShardsOperator
from operators.handle import HandleDatasetOperator
from operators.pack import PackDatasetOperator
from operators.reject_sampling import RejectSamplingOperator

__all__ = [
    "GenerateReasoningOperator",
    "HandleDatasetOperator",
    "Math500EvalOperator",
    "MergeShardsOperator",
    "MsrunFinetuneOperator",
    "PackDatasetOperator",
    "RejectSamplingOperator",
]
