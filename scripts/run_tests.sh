#!/usr/bin/env bash
# Run the whole CPU suite in .venv. pytest's exit code 5 (no test collected) is a failure, never a pass.
set -uo pipefail
py=${VENV:-.venv}/bin/python
"$py" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no test (exit 5): failing" >&2
  exit 1
fi
exit "$rc"
