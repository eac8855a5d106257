#!/usr/bin/env bash
# Refuses to start a deployment whose secrets are missing, empty or still the placeholders of .env.example.
# Run by the airflow-init service with the services' environment; exits 1 with one line per problem.
set -uo pipefail
status=0
for name in POSTGRES_PASSWORD REDIS_PASSWORD AIRFLOW__CORE__FERNET_KEY AIRFLOW__API_AUTH__JWT_SECRET \
    AIRFLOW__API__SECRET_KEY; do
    value="${!name:-}"
    if [ -z "$value" ]; then
        echo "$name is empty: set it in docker/.env (bash docker/generate-env.sh writes one)" >&2
        status=1
    elif [[ "$value" == *change-me* ]]; then
        echo "$name is still the placeholder of docker/.env.example: set a secret (bash docker/generate-env.sh)" >&2
        status=1
    fi
done
key="${AIRFLOW__CORE__FERNET_KEY:-}"
if [ -n "$key" ] && [[ "$key" != *change-me* ]] && [ "$(printf %s "$key" | tr '_-' '/+' | base64 -d 2>/dev/null | wc -c)" != 32 ]; then
    echo "AIRFLOW__CORE__FERNET_KEY is not a Fernet key (32 bytes, url-safe base64): openssl rand -base64 32 | tr '+/' '-_'" >&2
    status=1
fi
exit $status
