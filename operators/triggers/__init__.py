"""Triggers: the asynchronous watchers that run in Airflow's triggerer while a task is deferred (the fine-tune's
training job, a generate shard's teacher batches) or while a DAG schedules on the seed asset (its change watcher).
Each module must stay importable in the triggerer: Airflow and the standard library at the top, the engine inside
the methods that use it."""

from operators.triggers.msrun_job import MsrunJobTrigger
from operators.triggers.teacher_batch import TeacherBatchTrigger

# The classpaths these triggers were serialised under before they had modules of their own: a deployment upgraded
# while a task is deferred (a fine-tune, a day-long batch) has them in its trigger table, and the triggerer
# must still load them.
__all__ = ["MsrunJobTrigger", "TeacherBatchTrigger"]
