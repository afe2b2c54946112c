"""Where llama-cpp-python (a benchmark/test-only peer) is built, and with which CPU flags.

Its native build crashes on some hosts' AMX path, so it is built with explicit flags: AVX2,
FMA and F16C always, AVX-512 and VNNI only where this CPU has them (a build with AVX-512 dies
with SIGILL on a CPU without). The flags are stamped into the venv, so a venv built on another
CPU (a machine handed over with its cache) is rebuilt by the benchmark and skipped by tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("LLAMACPP_VENV",
                           Path.home() / ".cache" / "clawforge" / "llamacpp-venv"))
VERSION = "0.3.36"
STAMP = "clawforge-cmake-args.txt"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:
        return set()


def cmake_args(flags: set[str] | None = None) -> str:
    """ggml's CPU options for this host: no native detection, no AMX."""
    flags = cpu_flags() if flags is None else flags
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= flags
    vnni = avx512 and "avx512_vnni" in flags
    on = lambda yes: "ON" if yes else "OFF"  # noqa: E731
    return (f"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
            f"-DGGML_AVX512={on(avx512)} -DGGML_AVX512_VNNI={on(vnni)} "
            "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def usable() -> Path | None:
    """The venv's python when llama_cpp imports there and was built for this CPU, else None."""
    python = VENV / "bin" / "python"
    stamp = VENV / STAMP
    if not python.exists() or not stamp.exists() or stamp.read_text() != cmake_args():
        return None
    done = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return python if done.returncode == 0 else None


def build() -> Path:
    """usable(), building the venv first (~9 min on 2 cores) when it is missing or stale."""
    python = usable()
    if python is not None:
        return python
    args = cmake_args()
    print(f"building llama-cpp-python {VERSION} into {VENV} ({args}; ~9 min on 2 cores)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    python = VENV / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir",
                    f"llama-cpp-python=={VERSION}"], check=True,
                   env={**os.environ, "CMAKE_ARGS": args,
                        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    (VENV / STAMP).write_text(args)
    return python
