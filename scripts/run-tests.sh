#!/usr/bin/env bash
# Run every test tier this machine can run. pytest's exit 5 ("no tests collected") is a
# failure here: a run that tests nothing must never pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "run-tests: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
