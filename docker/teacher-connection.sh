#!/usr/bin/env bash
# Store the teacher Connection teacher_default with the API key read from the file $1 (the teacher_api_key secret).
# The key goes through a private temporary file to `airflow connections import`: never on a command line (where
# `ps` would show it) nor in an environment variable. Host, port and schema come from TEACHER_HOST/PORT/SCHEMA.
set -euo pipefail
key_file=${1:?usage: teacher-connection.sh KEY_FILE}
: "${TEACHER_HOST:?set TEACHER_HOST}"
umask 077
conn_file=$(mktemp --suffix=.json)
trap 'rm -f "$conn_file"' EXIT
python - "$key_file" "$conn_file" <<'PY'
import json
import os
import sys

key_file, conn_file = sys.argv[1:]
with open(key_file) as f:
    key = f.read().strip()
connection = {
    "conn_type": "http",
    "host": os.environ["TEACHER_HOST"],
    "port": int(os.environ.get("TEACHER_PORT", "443")),
    "schema": os.environ.get("TEACHER_SCHEMA", "https"),
    "password": key,
}
with open(conn_file, "w") as f:
    json.dump({"teacher_default": connection}, f)
PY
airflow connections import --overwrite "$conn_file"
