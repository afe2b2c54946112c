# Written for ClawForge: the roles applied to a root filesystem being baked into an OS image.
"""Ansible connection to a directory holding a root filesystem, through chroot(8).

ansible-core no longer ships a chroot connection (it lives in community.general, which is not
installed with ansible-core). This one is what `claw os build` needs and no more: commands run
under `chroot ROOT /bin/sh -c`, files go in and out through the chroot too, so a path with a
symlink inside the root (/var/run -> /run) resolves inside the root, never on the controller.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
    name: chroot
    short_description: run tasks inside a root filesystem directory with chroot(8)
    description:
        - Runs every command as C(chroot ROOT /bin/sh -c CMD) on the controller, as root.
        - For an OS image being built; the ClawForge roles detect it and apply only the
          persistent part of their settings.
    author: ClawForge
    options:
        remote_addr:
            description: The root filesystem directory.
            default: inventory_hostname
            type: str
            vars:
                - name: inventory_hostname
                - name: ansible_host
    extends_documentation_fragment:
        - connection_pipelining
"""


class Connection(ConnectionBase):
    transport = "chroot"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def _root(self) -> str:
        return os.path.abspath(self.get_option("remote_addr"))

    def _connect(self) -> Connection:
        root = self._root()
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure("the chroot connection needs root on the controller")
        if not os.path.isdir(root) or not os.path.lexists(os.path.join(root, "bin/sh")):
            raise AnsibleConnectionFailure(f"{root} is not a root filesystem (no /bin/sh)")
        if shutil.which("chroot") is None:
            raise AnsibleConnectionFailure("chroot(8) is not installed on the controller")
        if not self._connected:
            super()._connect()
            self._connected = True
        return self

    def _run(self, argv: list[str], in_data: bytes | None) -> tuple[int, bytes, bytes]:
        done = subprocess.run(["chroot", self._root(), *argv], input=in_data or b"",
                              capture_output=True)
        return done.returncode, done.stdout, done.stderr

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = False) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        return self._run(["/bin/sh", "-c", cmd], in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as src:
            data = src.read()
        code, _, err = self._run(["/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"], data)
        if code != 0:
            raise AnsibleError(f"cannot write {out_path} in {self._root()}: {err.decode()}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        code, out, err = self._run(["cat", in_path], None)
        if code != 0:
            raise AnsibleError(f"cannot read {in_path} in {self._root()}: {err.decode()}")
        with open(out_path, "wb") as dst:
            dst.write(out)

    def close(self) -> None:
        self._connected = False
