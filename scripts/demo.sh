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

step "claw runtime generate --backend opencl: the same model on OpenCL kernels (PoCL on this CPU)"
$CLAW runtime generate .demo/tiny-llama-q8_0.gguf -p "The edge fleet" -n 24 --seed 1 --backend opencl

step "claw provision --tags claw_runtime: the runtime as a service on the first device, serving the model"
FIRST=claw-demo-1
$CLAW provision -i "$INV" --tags claw_runtime --limit "$FIRST" \
  -e claw_runtime_model=.demo/tiny-llama-q8_0.gguf -e claw_runtime_backend=numpy
.venv/bin/python - "$INV" "$FIRST" <<'PY'
import sys, httpx, yaml
hosts = yaml.safe_load(open(sys.argv[1]))["all"]["children"]["emulated"]["hosts"]
url = f"http://127.0.0.1:{hosts[sys.argv[2]]['claw_runtime_port']}"
print("GET /health ->", httpx.get(url + "/health", timeout=10).json())
chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
    "model": "tiny-llama-q8_0", "max_tokens": 16, "temperature": 0,
    "messages": [{"role": "user", "content": "Hello, device"}]}).json()
print("POST /v1/chat/completions ->", repr(chat["choices"][0]["message"]["content"]),
      chat["usage"])
PY

printf '\nDemo done (the model has random weights: its text is noise, its speed and plumbing are real).\n'
printf 'The demo devices keep running: `.venv/bin/claw devices down --fleet demo` removes them.\n'
printf 'Images: `claw image build runtime --profile rpi5` (see README). Still to land: rollouts (#9), OS images (#10).\n'
