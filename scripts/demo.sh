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

step "claw runtime: a tiny Llama made here (random weights, a trained tokenizer), converted and run"
.venv/bin/python scripts/make_demo_model.py .demo/tiny-llama
$CLAW runtime convert .demo/tiny-llama -o .demo/tiny-llama-q8_0.gguf --type q8_0
$CLAW runtime info .demo/tiny-llama-q8_0.gguf
$CLAW runtime generate .demo/tiny-llama-q8_0.gguf -p "The edge fleet" -n 24 --seed 1 --backend numpy

step "claw runtime generate --backend opencl: the same model on OpenCL kernels (PoCL on this CPU)"
$CLAW runtime generate .demo/tiny-llama-q8_0.gguf -p "The edge fleet" -n 24 --seed 1 --backend opencl

step "claw devices up 3 --engine: three emulated devices (systemd + sshd + their own Docker engine)"
$CLAW devices down --fleet demo >/dev/null  # a fresh demo fleet each time
$CLAW devices up 3 --engine --profile qemu-virt --fleet demo
INV="${XDG_STATE_HOME:-$HOME/.local/state}/clawforge/devices/demo-inventory.yml"
MODEL=.demo/tiny-llama-q8_0.gguf
# The runtime runs as a container on every device, serving the demo model with numpy.
RUNTIME_VARS=(-e claw_runtime_model=$MODEL -e claw_runtime_install=container
              -e claw_runtime_backend=numpy -e claw_runtime_threads=1)

step "claw provision: zram, hugepages, governor, OpenCL, Docker engine, tuning, runtime service on all three"
$CLAW provision -i "$INV" -e claw_hugepages_mb=64 "${RUNTIME_VARS[@]}"

step "claw provision again: idempotent, nothing changes"
$CLAW provision -i "$INV" -e claw_hugepages_mb=64 "${RUNTIME_VARS[@]}"

step "claw doctor -i: the devices checked against the knowledge base"
$CLAW doctor -i "$INV" || echo "(device faults reported above: containers have no zram or cpufreq of their own; the demo goes on)"

step "claw image build runtime: the runtime image from the offline base (numpy-only, self-tested)"
$CLAW image build runtime --profile qemu-virt --arch amd64 --opencl none --tag clawforge/runtime:demo

step "claw fleet rollout --dry-run: the plan (a canary, then batches)"
$CLAW fleet rollout -i "$INV" --image clawforge/runtime:demo --canary 1 --batch 2 --dry-run "${RUNTIME_VARS[@]}"

step "claw fleet rollout: deliver, switch, health-check (/health + a completion), commit; rollback on failure"
$CLAW fleet rollout -i "$INV" --image clawforge/runtime:demo --canary 1 --batch 2 "${RUNTIME_VARS[@]}"

step "A chat completion from each device's server"
.venv/bin/python - "$INV" <<'PY'
import sys, httpx, yaml
hosts = yaml.safe_load(open(sys.argv[1]))["all"]["children"]["emulated"]["hosts"]
for name, host in sorted(hosts.items()):
    url = f"http://127.0.0.1:{host['claw_runtime_port']}"
    model = httpx.get(url + "/health", timeout=10).json()["model"]
    chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": f"Hello, {name}"}]}).json()
    print(f"{name}: {chat['choices'][0]['message']['content']!r}  {chat['usage']}")
PY

step "claw fleet status: what every device runs, its health and memory, its last rollout"
$CLAW fleet status -i "$INV" "${RUNTIME_VARS[@]}"

step "claw fleet history: every rollout, who/when/what and how each device ended"
$CLAW fleet history --last 3

printf '\nDemo done (the model has random weights: its text is noise, its speed and plumbing are real).\n'
printf 'The demo devices keep running: `.venv/bin/claw devices down --fleet demo` removes them.\n'
printf 'Also here: claw os build|customize and claw flash (OS images, see README), claw fleet dashboard.\n'
printf 'Federated fine-tuning: claw fed run|runs|export, and claw fleet rollout --model (README).\n'
