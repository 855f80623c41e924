#!/usr/bin/env bash
# See fp-collect work, in one command, from any directory:
#
#   bash examples/run.sh            # the Starlette example on http://127.0.0.1:8000
#   bash examples/run.sh flask      # the Flask example on http://127.0.0.1:5000
#
# Creates .venv in the repository if it is missing and installs fp-collect into it
# (editable, with the starlette and flask extras), then runs the example site. Events go
# to SQLite, examples/example.db unless FP_COLLECT_STORAGE says otherwise.
# Environment: VENV (the virtualenv to use or create, default .venv in the repository),
# PYTHON (makes the venv, default python3), PORT, FP_COLLECT_STORAGE, FP_COLLECT_WRITE_KEY.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE="${1:-starlette}"
case "$SITE" in
  starlette) DEFAULT_PORT=8000 ;;
  flask) DEFAULT_PORT=5000 ;;
  *)
    echo "usage: $0 [starlette|flask]" >&2
    exit 2
    ;;
esac
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "Creating $VENV ..."
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# Install only when needed, so later runs start at once (and work offline). -I keeps
# the current directory off sys.path: a checkout's fp_collect/ must not pass for installed.
if ! "$PY" -I - "$ROOT" >/dev/null 2>&1 <<'PYCHECK'
import os, sys
import flask, starlette, uvicorn
import fp_collect.adapters.asgi, fp_collect.adapters.wsgi
root = os.path.realpath(sys.argv[1]) + os.sep
sys.exit(not os.path.realpath(fp_collect.__file__).startswith(root))
PYCHECK
then
  echo "Installing fp-collect with its starlette and flask extras into $VENV ..."
  (cd "$ROOT" && "$PY" -m pip install -q --disable-pip-version-check -e '.[starlette,flask]')
fi

export PORT="${PORT:-$DEFAULT_PORT}"
export FP_COLLECT_STORAGE="${FP_COLLECT_STORAGE:-sqlite:///$ROOT/examples/example.db}"
export FP_COLLECT_WRITE_KEY="${FP_COLLECT_WRITE_KEY:-example-write-key}"
URL="http://127.0.0.1:$PORT"
TRACK='{"userId":"user-1","event":"Example Tried","properties":{"from":"curl"}}'

cat <<INFO

  fp-collect, $SITE example
  open:        $URL/
  write key:   $FP_COLLECT_WRITE_KEY
  storage:     $FP_COLLECT_STORAGE

  try:         curl -u $(printf '%q' "$FP_COLLECT_WRITE_KEY:") -H 'Content-Type: application/json' -d '$TRACK' $URL/collect/v1/track
  then look:   $VENV/bin/fp-collect events --storage $(printf '%q' "$FP_COLLECT_STORAGE")
               $VENV/bin/fp-collect rejections --storage $(printf '%q' "$FP_COLLECT_STORAGE")
  stop:        Ctrl-C

INFO
exec "$PY" "$ROOT/examples/${SITE}_site.py"
