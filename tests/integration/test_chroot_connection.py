"""The chroot connection plugin (playbooks/connection_plugins/chroot.py) with a real
ansible-playbook: commands, a module's files going in (copy, script) and out (fetch), all
inside the root directory. The root here is a small copy of the host's shell, coreutils and
Python (amd64, fast); `claw os` uses it on arm64 roots under qemu-user the same way."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provision.ansible import playbooks_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
]
PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.copy: {content: "inside\\n", dest: /etc/claw-test}
    - ansible.builtin.command: cat /etc/claw-test
      register: out
    - ansible.builtin.assert: {that: out.stdout == 'inside'}
    - ansible.builtin.fetch: {src: /etc/claw-test, dest: "{{ fetched }}/", flat: true}
    - ansible.builtin.file: {path: /var/run, state: link, src: /run}
    - ansible.builtin.copy: {content: "via link\\n", dest: /var/run/claw-link-test}
"""


TOOLS = ["sh", "dash", "mkdir", "cat", "echo", "rm", "chmod", "ln", "env", "cp", "mv", "ls",
         "sleep", "python3"]


def host_copy(root: Path, path: str) -> None:
    real = Path(os.path.realpath(path))
    dst = root / str(real).lstrip("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(real, dst)
    link = root / path.lstrip("/")
    if not os.path.lexists(link):  # the name it is called by (python3 -> python3.11)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(real)


def small_root(root: Path) -> None:
    """The host's shell, a few coreutils and Python with their libraries (ldd), no more."""
    for top in ("etc", "run", "var", "tmp", "root", "usr/bin", "usr/lib"):
        (root / top).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):  # merged /usr as on the host
        if Path(f"/{link}").is_symlink():
            target = os.readlink(f"/{link}")
            (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
            (root / link).symlink_to(target)
    for name in ("ld.so.cache", "passwd", "group"):  # the loader's search list, accounts
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    binaries = [f"/usr/bin/{t}" for t in TOOLS]  # the system Python, not a pyenv shim
    for binary in binaries:
        host_copy(root, f"/usr/bin/{Path(binary).name}")
        libs = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for lib in re.findall(r"(/\S+\.so[.\d]*)", libs):
            host_copy(root, lib)
    version = Path(os.path.realpath("/usr/bin/python3")).name
    shutil.copytree(f"/usr/lib/{version}", root / f"usr/lib/{version}", symlinks=True,
                    ignore=shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter"))


def test_chroot_connection_stays_inside_the_root(tmp_path):
    root = tmp_path / "root"
    small_root(root)
    (tmp_path / "site.yml").write_text(PLAYBOOK)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    env = {**os.environ, "ANSIBLE_CONNECTION_PLUGINS": str(playbooks_dir() / "connection_plugins"),
           "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "img,", "-c", "chroot",
         "-e", f"ansible_host={root}", "-e", "ansible_python_interpreter=/usr/bin/python3",
         "-e", f"fetched={fetched}", str(tmp_path / "site.yml")],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (root / "etc/claw-test").read_text() == "inside\n"
    assert (fetched / "claw-test").read_text() == "inside\n"
    # /var/run -> /run resolved inside the root, not on the controller.
    assert (root / "run/claw-link-test").read_text() == "via link\n"
    assert not Path("/run/claw-link-test").exists()
