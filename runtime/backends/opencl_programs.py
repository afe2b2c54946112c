"""Compiled OpenCL programs cached on disk, so that a warm start compiles nothing.

An entry is keyed by the device's identity (platform, device, driver version), the kernel
source's hash and the build options (the tuned knobs are -D defines). The file holds a small
header with the SHA-256 of the binary; a truncated or corrupted entry fails that check (or the
driver refuses the binary), is counted in `stats["rebuilt"]`, and is compiled and written again
(temp file + rename, so a crash never leaves half an entry).

Cache directory: $CLAW_OPENCL_CACHE, else $XDG_CACHE_HOME/clawforge/opencl, else
~/.cache/clawforge/opencl.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.backends.opencl_device import Device

MAGIC = b"CLAWCLB1"


def cache_dir() -> Path:
    if os.environ.get("CLAW_OPENCL_CACHE"):
        return Path(os.environ["CLAW_OPENCL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clawforge" / "opencl"


def kernel_source(name: str) -> str:
    """runtime/kernels/<name>.cl, from the installed package."""
    return resources.files("runtime").joinpath("kernels", f"{name}.cl").read_text()


def _options(defines: dict[str, int]) -> list[str]:
    return ["-cl-mad-enable"] + [f"-D{k}={v}" for k, v in sorted(defines.items())]


class ProgramCache:
    """Builds programs for one device, from the disk cache when it can."""

    def __init__(self, dev: Device, directory: Path | None = None):
        self.dev = dev
        self.dir = directory or cache_dir()
        self.stats = {"compiled": 0, "loaded": 0, "rebuilt": 0}
        self._built: dict[str, Any] = {}

    def key(self, name: str, defines: dict[str, int]) -> str:
        ident = json.dumps({"device": self.dev.identity(), "options": _options(defines),
                            "source": hashlib.sha256(kernel_source(name).encode()).hexdigest()},
                           sort_keys=True)
        return f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:24]}"

    def get(self, name: str, defines: dict[str, int]) -> Any:
        """The built program `name` with these -D defines (memoized for this process)."""
        key = self.key(name, defines)
        if key not in self._built:
            self._built[key] = self._load(key) or self._compile(name, defines, key)
        return self._built[key]

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def _load(self, key: str) -> Any:
        path = self._path(key)
        if not path.exists():
            return None
        cl = self.dev.cl
        data = path.read_bytes()
        digest, binary = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        if not data.startswith(MAGIC) or hashlib.sha256(binary).digest() != digest:
            self.stats["rebuilt"] += 1
            return None
        try:
            program = cl.Program(self.dev.context, [self.dev.device], [binary]).build()
        except cl.Error:  # the driver refused it (e.g. a driver update kept the version)
            self.stats["rebuilt"] += 1
            return None
        self.stats["loaded"] += 1
        return program

    def _compile(self, name: str, defines: dict[str, int], key: str) -> Any:
        cl = self.dev.cl
        program = cl.Program(self.dev.context, kernel_source(name)).build(
            options=_options(defines), devices=[self.dev.device])
        self.stats["compiled"] += 1
        binary = program.get_info(cl.program_info.BINARIES)[0]
        if binary:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{key}.")
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + hashlib.sha256(binary).digest() + binary)
                os.replace(tmp, self._path(key))
            except OSError as e:  # a read-only home: run uncached rather than not at all
                self.stats["unwritable"] = str(e)
        return program
