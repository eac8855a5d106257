#!/usr/bin/env bash
# Writes docker/.env with fresh random secrets (never overwrites an existing one). Needs only openssl.
set -euo pipefail
env_file="$(dirname "$0")/.env"
if [ -e "$env_file" ]; then
    echo "$env_file exists: not overwritten (delete it first to generate new secrets)" >&2
    exit 1
fi
secret() { openssl rand -hex 24; }
umask 077
cat >"$env_file" <<EOT
POSTGRES_PASSWORD=$(secret)
REDIS_PASSWORD=$(secret)
AIRFLOW_FERNET_KEY=$(openssl rand -base64 32 | tr '+/' '-_')
AIRFLOW_JWT_SECRET=$(openssl rand -hex 32)
AIRFLOW_SECRET_KEY=$(openssl rand -hex 32)
AIRFLOW_USERS=admin:admin
EOT
# the teacher's API key: put it in docker/secrets/teacher_api_key (read by airflow-init only); empty: no connection
mkdir -p "$(dirname "$0")/secrets"
touch "$(dirname "$0")/secrets/teacher_api_key"
echo "wrote $env_file (mode 600); keep it out of version control"
