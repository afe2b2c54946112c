#!/usr/bin/env bash
# Run every test tier this machine can run. pytest's exit 5 ("no tests collected") is a
# failure here: a run that tests nothing must never pass.
#
# With no arguments the e2e tier, then the unit tier, run in a second pytest beside the
# integration and gpu tiers: e2e's time is QEMU emulating one arm64 CPU (one core busy),
# integration's mostly waits on Docker, SSH and Ansible, so on two cores the two overlap instead
# of adding up (unit follows e2e, which finishes first). Its lines are prefixed "[e2e+unit] "
# and it gets a longer per-test limit (a VM boots slower beside the other tiers). Arguments run
# one pytest with them, as before (e.g. `make test PYTEST_ARGS="-m unit"`).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest)

verdict() {  # pytest's exit code, with "no tests collected" a failure
    if [ "$1" = 5 ]; then echo "run-tests: pytest collected no tests${2:+ ($2)}" >&2; return 1; fi
    return "$1"
}

if [ "$#" -gt 0 ]; then
    "${PYTEST[@]}" "$@"
    verdict $?
    exit $?
fi

e2e_rc_file=$(mktemp)
(
    "${PYTEST[@]}" -m "e2e or unit" --timeout 1800 -p no:cacheprovider 2>&1
    echo $? > "$e2e_rc_file"
) | sed -u 's/^/[e2e+unit] /' &
e2e_pid=$!

"${PYTEST[@]}" -m "not e2e and not unit"
rest=$?
wait "$e2e_pid"
e2e=$(cat "$e2e_rc_file"); e2e=${e2e:-1}  # killed before it wrote one: a failure
rm -f "$e2e_rc_file"

verdict "$rest" "integration, gpu"; rest=$?
verdict "$e2e" "e2e, unit"; e2e=$?
echo "run-tests: integration/gpu exit $rest, e2e/unit exit $e2e"
[ "$rest" = 0 ] && [ "$e2e" = 0 ]
