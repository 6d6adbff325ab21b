#!/usr/bin/env bash
# The README's test command: install tfcurv with its test and docs extras into a fresh
# virtual environment (.venv) and run the whole suite. Fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,test,docs]"
status=0
.venv/bin/python -m pytest -n 2 --dist loadfile "$@" || status=$?
# pytest exit code 5 means "no tests collected": that is a failure here too.
exit "$status"
