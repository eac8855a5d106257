"""The classpath the seed watcher's trigger was serialised under before ``operators/triggers/seed_change.py``: a
deployment upgraded while a DAG schedules on the seed asset may still have it stored."""

from operators.triggers.seed_change import SeedChangeTrigger

__all__ = ["SeedChangeTrigger"]
