"""Triggers: the asynchronous watchers that run in Airflow's triggerer while a task is deferred (the fine-tune's
training job, a generate shard's teacher batches) or while a DAG schedules on the seed asset (its change watcher).
Each module must stay importable in the triggerer: Airflow and the standard library at the top, the engine inside
the methods that use it."""
