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

step "claw doctor -i examples/local.yml: device checks over Ansible (this machine as the device)"
$CLAW doctor -i examples/local.yml || echo "(device faults reported above; the demo goes on)"

step "claw runtime: a tiny Llama made here (random weights, a trained tokenizer), converted and run"
.venv/bin/python scripts/make_demo_model.py .demo/tiny-llama
$CLAW runtime convert .demo/tiny-llama -o .demo/tiny-llama-q8_0.gguf --type q8_0
$CLAW runtime info .demo/tiny-llama-q8_0.gguf
$CLAW runtime generate .demo/tiny-llama-q8_0.gguf -p "The edge fleet" -n 24 --seed 1 --backend numpy

printf '\nDemo done (the model has random weights: its text is noise, its speed and plumbing are real).\nStill to land: provisioning (#5), images (#6), OpenCL (#7), serving (#8), rollouts (#9), OS images (#10).\n'
