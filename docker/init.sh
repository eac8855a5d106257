#!/usr/bin/env bash
# The airflow-init service: checks the secrets and docker/deployment.json, migrates the database, stores the
# deployment's settings as the Variable distill_deployment, creates the pools it names and, when the
# teacher_api_key secret is given, the teacher connection. Every other Airflow service starts only after it
# succeeded.
set -euo pipefail
bash /opt/distill/docker/check-env.sh
deployment=/opt/distill/docker/deployment.json
# the deployment's settings, checked before anything starts (one line naming the problem)
python -c 'import sys
from operators.dag_helpers.deployment import DeploymentConfigError, parse
try:
    parse(open(sys.argv[1]).read())
except DeploymentConfigError as e:
    sys.exit(f"{sys.argv[1]}: {e}")' "$deployment"
airflow db migrate
# the one place every service and worker reads them: the Variable distill_deployment in the database
# (operators/dag_helpers/deployment.py); the file is the source: an edit made in the UI is replaced at the next start
airflow variables set distill_deployment "$(cat "$deployment")"
# the pools docker/deployment.json names (teacher_pool, training_pool; none when a key is absent); sizes from the
# environment. (Its queues must be the ones the workers serve: --queues in docker-compose.yml.)
named() { python -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$deployment" "$1"; }
teacher_pool=$(named teacher_pool)
training_pool=$(named training_pool)
if [ -n "$teacher_pool" ]; then
    airflow pools set "$teacher_pool" "${TEACHER_POOL_SLOTS:-2}" "generation shards talking to the teacher at once"
fi
if [ -n "$training_pool" ]; then
    airflow pools set "$training_pool" "${TRAINING_POOL_SLOTS:-1}" "trainings at once on the NPU node group" \
        --include-deferred
fi
# the teacher's key lives only in this connection (encrypted with the fernet key), read by the generate tasks
if [ -s /run/secrets/teacher_api_key ]; then
    bash /opt/distill/docker/teacher-connection.sh /run/secrets/teacher_api_key
fi
