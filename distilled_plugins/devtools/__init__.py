"""Tools for developing and demonstrating the pipeline, kept apart from the stage modules.

Nothing here runs in production: a replay teacher (``teacher_server``), a private Airflow (``local_airflow``),
local Postgres and Redis servers for the cluster test (``cluster_services``), the embedded demo (``demo``) and
the learnability check (``learnability``). The stage modules never import this package.
"""
