"""What emulated devices and the VM share: loopback ports, SSH banners, and an inventory
that reaches them with the devices' key."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

from provision.paths import state_dir
from provision.yamlsource import dump_yaml_atomic


def ssh_key() -> Path:
    """The key every emulated device and VM trusts (made on first use)."""
    key = state_dir() / "devices" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clawforge-devices",
                        "-f", str(key)], check=True)
    return key


def ssh_banner(port: int) -> bool:
    """sshd answers on 127.0.0.1:port. A forwarder (QEMU's) may accept connections while
    nothing is behind it, so only the banner tells that sshd is there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
            conn.settimeout(5)
            return conn.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As a server binds it: old TIME_WAIT connections don't make a port busy, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def free_ports(first: int, n: int, taken: set[int]) -> list[int]:
    ports, port = [], first
    while len(ports) < n:
        if port not in taken and port_free(port):
            ports.append(port)
        port += 1
    return ports


def write_inventory(path: Path, group: str, hosts: dict[str, dict[str, Any]],
                    group_vars: dict[str, Any]) -> Path:
    """An inventory of loopback devices; their host keys change with every start, so they
    are not pinned (real fleets keep Ansible's default host-key checking)."""
    dump_yaml_atomic(path, {"all": {"children": {group: {
        "vars": {
            "ansible_host": "127.0.0.1",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(ssh_key()),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            **group_vars,
        },
        "hosts": hosts,
    }}}})
    return path
