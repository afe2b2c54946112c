"""A real image registry for tests: Debian's docker-registry (the CNCF distribution server,
installed by scripts/setup.sh) on a free loopback port, storing into a folder of the test's.

Emulated devices share this machine's network, so their engines reach it at the same address;
dockerd treats 127.0.0.0/8 as an insecure (plain HTTP) registry without being told.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provision.loopback import free_ports


@contextmanager
def local_registry(root: Path, first_port: int = 5100, timeout: float = 15.0) -> Iterator[str]:
    """Serve a registry from `root` on the first free port from `first_port`; yields its
    address, "127.0.0.1:PORT". Stopped on exit (its storage stays under `root`)."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry is not installed (scripts/setup.sh installs it)")
    (port,) = free_ports(first_port, 1, set())
    address = f"127.0.0.1:{port}"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{root / 'store'}\nhttp:\n  addr: {address}\n")
    log = root / "registry.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    pytest.fail(f"docker-registry on {address} did not answer /v2/ "
                                f"(exit {server.poll()}): {' | '.join(tail)}")
                time.sleep(0.1)
        yield address
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
