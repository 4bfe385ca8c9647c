#!/usr/bin/env bash
# A team MLflow tracking server without Docker, on Debian or Ubuntu: runs and metrics in the
# machine's PostgreSQL, artifacts in a local folder, the server on port 5000 of every interface.
#
#   MLFLOW_DB_PASSWORD=choose-one bash deploy/tracking-server/run-without-docker.sh
#
# Run it as a user who may use sudo (or as root). It installs PostgreSQL, creates the database
# and its role (again and again without harm: a second run only sets the password), installs
# MLflow in its own virtual environment and starts the server in the foreground (Ctrl-C stops
# it; to keep it running, put the last command in a systemd unit). Clients then use
#   kithara-ops train --tracking-uri http://THIS_HOST:5000
set -euo pipefail

# --- Settings: each can be set in the environment ----------------------------------------
DB_PASSWORD="${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD to the database password}"
DB_USER="${MLFLOW_DB_USER:-mlflow}"
DB_NAME="${MLFLOW_DB_NAME:-mlflow}"
DB_PORT="${MLFLOW_DB_PORT:-5432}"  # the port of Debian's first PostgreSQL cluster
PORT="${MLFLOW_PORT:-5000}"
ARTIFACT_DIR="${MLFLOW_ARTIFACT_DIR:-$HOME/mlflow-server/artifacts}"
VENV_DIR="${MLFLOW_VENV:-$HOME/mlflow-server/venv}"
# Host headers the server answers (MLflow 3.5+ refuses others): localhost, this machine's
# names and private IP addresses. Add the name clients use if it is not one of these.
SHORT_NAME="$(hostname)"
FULL_NAME="$(hostname -f 2>/dev/null || echo "$SHORT_NAME")"
HOST_NAMES="$SHORT_NAME:*"
if [[ "$FULL_NAME" != "$SHORT_NAME" ]]; then HOST_NAMES+=",$FULL_NAME:*"; fi
ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1:*,$HOST_NAMES,10.*,192.168.*,172.1[6-9].*,172.2[0-9].*,172.3[01].*}"

# Names and password go into SQL below: keep them to plain characters.
if [[ ! "$DB_USER" =~ ^[a-z_][a-z0-9_]*$ || ! "$DB_NAME" =~ ^[a-z_][a-z0-9_]*$ ]]; then
  echo "MLFLOW_DB_USER and MLFLOW_DB_NAME: lower-case letters, digits and _ only" >&2
  exit 2
fi
if [[ ! "$DB_PASSWORD" =~ ^[A-Za-z0-9._~-]{8,}$ ]]; then
  echo "MLFLOW_DB_PASSWORD: at least 8 letters, digits or - . _ ~" >&2
  exit 2
fi

# Commands that need root: run directly as root, else through sudo.
as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# --- 1. PostgreSQL, from Debian's packages ----------------------------------------------
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends postgresql python3-venv
if [[ -d /run/systemd/system ]]; then
  as_root systemctl enable --now postgresql
else
  as_root service postgresql start  # a machine without systemd, e.g. a container
fi

# --- 2. The role and the database, created by the postgres superuser ---------------------
# Sent on standard input, so the password never shows in the process list.
as_root runuser -u postgres -- psql --port "$DB_PORT" --quiet -v ON_ERROR_STOP=1 <<SQL
SELECT 'CREATE ROLE $DB_USER LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER')\gexec
ALTER ROLE $DB_USER WITH LOGIN PASSWORD '$DB_PASSWORD';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
SQL

# --- 3. MLflow and the PostgreSQL drivers, in their own virtual environment ---------------
# Both drivers: SQLAlchemy 2.1+ opens postgresql:// with psycopg (3), earlier with psycopg2.
python3 -m venv "$VENV_DIR"
"$VENV_DIR/bin/pip" install --quiet --upgrade pip
"$VENV_DIR/bin/pip" install --quiet "mlflow>=3.5,<4" "psycopg[binary]>=3.1" "psycopg2-binary>=2.9"
mkdir -p "$ARTIFACT_DIR"

# --- 4. The server ------------------------------------------------------------------------
# The password reaches PostgreSQL's client library through PGPASSWORD, not the command line.
echo "MLflow tracking server on http://$FULL_NAME:$PORT (artifacts in $ARTIFACT_DIR)"
export PGPASSWORD="$DB_PASSWORD"
exec "$VENV_DIR/bin/mlflow" server \
  --host 0.0.0.0 \
  --port "$PORT" \
  --backend-store-uri "postgresql://$DB_USER@127.0.0.1:$DB_PORT/$DB_NAME" \
  --artifacts-destination "$ARTIFACT_DIR" \
  --serve-artifacts \
  --allowed-hosts "$ALLOWED_HOSTS"
