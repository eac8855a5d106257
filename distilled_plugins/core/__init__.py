"""Foundations every stage shares: settings written once (``settings``), artifact contracts (``schema``), formats
and atomic writes (``io``), the command-line error contract (``cli``), drop counting (``stats``), progress lines,
shipped configs and defaults (``configs``), the run's input checks (``preflight``) and math_verify in worker
processes (``grader``). Nothing here imports a stage or Airflow."""
