#!/usr/bin/env bash
# Run every test tier this machine can run. pytest's exit 5 ("no tests collected") is a
# failure here: a run that tests nothing must never pass.
#
# With no arguments the tests run in two pytest processes side by side, each file in exactly
# one of them:
#   A: tests/gpu and tests/integration, less the files B takes;
#   B: tests/e2e, then the integration files in LATER, then tests/unit.
# e2e's time is QEMU emulating one arm64 CPU (one core busy) and integration's mostly waits on
# Docker, SSH and Ansible, so on two cores they overlap instead of adding up; e2e finishes
# first, so B then takes some integration files and the unit tier off A's path. B's lines are
# prefixed "[B] " and it gets longer limits for a test and a VM's boot (a VM boots slower
# beside A: a reboot took over the default 240 s in a trial run).
# Arguments run one pytest with them, as before (e.g. `make test PYTEST_ARGS="-m unit"`).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest)
LATER=(tests/integration/test_quantize_trained.py tests/integration/test_roles.py
       tests/integration/test_runtime_service.py)

verdict() {  # pytest's exit code, with "no tests collected" a failure
    if [ "$1" = 5 ]; then echo "run-tests: pytest collected no tests${2:+ ($2)}" >&2; return 1; fi
    return "$1"
}

if [ "$#" -gt 0 ]; then
    "${PYTEST[@]}" "$@"
    verdict $?
    exit $?
fi

b_rc_file=$(mktemp)
start=$SECONDS
(
    CLAW_VM_BOOT_TIMEOUT=900 "${PYTEST[@]}" tests/e2e "${LATER[@]}" tests/unit --timeout 1800 \
        -p no:cacheprovider 2>&1
    echo "$? $((SECONDS - start))" > "$b_rc_file"
) | sed -u 's/^/[B] /' &
b_pid=$!

"${PYTEST[@]}" tests/gpu tests/integration "${LATER[@]/#/--ignore=}"
a=$?
a_s=$((SECONDS - start))
wait "$b_pid"
read -r b b_s < "$b_rc_file"; b=${b:-1}  # killed before it wrote one: a failure
rm -f "$b_rc_file"

verdict "$a" "A: gpu, integration"; a=$?
verdict "$b" "B: e2e, later integration files, unit"; b=$?
echo "run-tests: A (gpu, integration) exit $a after ${a_s} s," \
     "B (e2e, ${#LATER[@]} integration files, unit) exit $b after ${b_s:-?} s"
[ "$a" = 0 ] && [ "$b" = 0 ]
