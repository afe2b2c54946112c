#!/usr/bin/env bash
# The main job end to end on this machine, with emulated devices as the embedded default.
# It grows as capabilities land; every step is real, and a failing step stops the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
CLAW=.venv/bin/claw
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "claw doctor: is this controller ready? (knowledge base of known faults)"
$CLAW doctor

step "claw profiles list: the device profiles ClawForge ships"
$CLAW profiles list

step "claw profiles show rk3588: one profile in full"
$CLAW profiles show rk3588 | head -40

step "claw inventory check examples/fleet.yml: an inventory checked against the profiles"
$CLAW inventory check examples/fleet.yml

step "claw devices up 3: three emulated devices (systemd + sshd containers on loopback ports)"
$CLAW devices up 3 --profile qemu-virt --fleet demo
INV="$($CLAW devices list --fleet demo --json >/dev/null && echo "${XDG_STATE_HOME:-$HOME/.local/state}/clawforge/devices/demo-inventory.yml")"

step "claw provision: zram, hugepages, governor, OpenCL (PoCL), Docker, tuning on all three"
$CLAW provision -i "$INV" -e claw_hugepages_mb=64

step "claw provision again: idempotent, nothing changes"
$CLAW provision -i "$INV"

step "claw doctor -i: the devices checked against the knowledge base"
$CLAW doctor -i "$INV" || echo "(device faults reported above: containers have no zram or cpufreq of their own; the demo goes on)"

step "claw runtime: a tiny Llama made here (random weights, a trained tokenizer), converted and run"
.venv/bin/python scripts/make_demo_model.py .demo/tiny-llama
$CLAW runtime convert .demo/tiny-llama -o .demo/tiny-llama-q8_0.gguf --type q8_0
$CLAW runtime info .demo/tiny-llama-q8_0.gguf
$CLAW runtime generate .demo/tiny-llama-q8_0.gguf -p "The edge fleet" -n 24 --seed 1 --backend numpy

printf '\nDemo done (the model has random weights: its text is noise, its speed and plumbing are real).\n'
printf 'The demo devices keep running: `.venv/bin/claw devices down --fleet demo` removes them.\n'
printf 'Still to land: images (#6), OpenCL (#7), serving (#8), rollouts (#9), OS images (#10).\n'
