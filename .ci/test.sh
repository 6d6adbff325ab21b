#!/usr/bin/env bash
# The README's test command: install tfcurv with its test and docs extras into a fresh
# virtual environment (.venv) and run the whole suite; then check that a wheel builds
# and works in a clean environment with only the core requirements and TensorFlow for
# the CPU. Fails when any test or the wheel check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,test,docs]"
status=0
# pytest exit code 5 means "no tests collected": that is a failure here too.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@" || status=$?

if [ "$#" -eq 0 ]; then
  wheel_check=$(mktemp -d)
  trap 'rm -rf "$wheel_check"' EXIT
  .venv/bin/python -m pip wheel -q --no-deps -w "$wheel_check/dist" .
  python3 -m venv "$wheel_check/venv"
  "$wheel_check/venv/bin/python" -m pip install -q "$wheel_check"/dist/tfcurv-*.whl "tensorflow-cpu>=2.20"
  (cd "$wheel_check" && TF_CPP_MIN_LOG_LEVEL=2 KERAS_HOME="$wheel_check/keras" \
    "$wheel_check/venv/bin/python" "$OLDPWD/.ci/wheel_check.py") || status=$?
fi
exit "$status"
