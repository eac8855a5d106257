#!/usr/bin/env bash
# The airflow-init service: checks the secrets, migrates the database, creates the pools the routing Variable
# names and, when the teacher_api_key secret is given, the teacher connection. Every other Airflow service
# starts only after it succeeded.
set -euo pipefail
bash /opt/distill/docker/check-env.sh
airflow db migrate
# pools named by AIRFLOW_VAR_DISTILL_DEPLOYMENT (operators/deployment.py); sizes from the environment
airflow pools set teacher "${TEACHER_POOL_SLOTS:-2}" "generation shards talking to the teacher at once"
airflow pools set npu_training "${TRAINING_POOL_SLOTS:-1}" "trainings at once on the NPU node group" \
    --include-deferred
# the teacher's key lives only in this connection (encrypted with the fernet key), read by the generate tasks
if [ -s /run/secrets/teacher_api_key ]; then
    airflow connections delete teacher_default >/dev/null 2>&1 || true
    airflow connections add teacher_default --conn-type http --conn-host "${TEACHER_HOST:?set TEACHER_HOST}" \
        --conn-port "${TEACHER_PORT:-443}" --conn-schema "${TEACHER_SCHEMA:-https}" \
        --conn-password "$(cat /run/secrets/teacher_api_key)"
fi
