#!/usr/bin/env bash
# The test command: builds a virtualenv in .venv (once), installs fp-collect with its
# test and lint extras, then runs ruff, mypy --strict and the test suite.
# Extra arguments go to pytest, e.g.  bash tests/run.sh -k segment
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
"$VENV/bin/ruff" check fp_collect adapters tests examples benchmarks
"$VENV/bin/ruff" format --check fp_collect adapters tests examples benchmarks
"$VENV/bin/mypy" fp_collect adapters
# The tests and examples, as strictly; tests/mypy_path lets mypy find adapters/ under the
# name it is published as, fp_collect.adapters (see setup.cfg's [mypy]).
MYPYPATH=tests/mypy_path "$VENV/bin/mypy" tests examples
# The benchmarks import their neighbours by plain name (core_pipeline, common), as the
# scripts and the servers they start do.
MYPYPATH=tests/mypy_path:benchmarks:benchmarks/apps "$VENV/bin/mypy" benchmarks
exec "$VENV/bin/python" -m pytest "$@"
