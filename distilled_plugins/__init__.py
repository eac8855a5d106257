"""Engine of the distillation pipeline: one module per stage, importable and runnable without Airflow."""

__version__ = "0.1.0"
