"""The per-device part of an OS image, written into a root tree: hostname, a sudo user with
the SSH key, systemd-networkd DHCP on wired and wireless interfaces (wpa_supplicant for
--wifi), fresh SSH host keys and machine-id per device, the root partition and filesystem
grown to the disk on first boot, and container images loaded on first boot.

Checked before anything is built (`check_settings`): bad values are bad input, exit 2.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from provision.errors import BadInput, ClawError

HOSTNAME = re.compile(r"^(?=.{1,63}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519", "sk-ecdsa-sha2-")
PRELOAD_DIR = "var/lib/clawforge/preload"
UNIT_DIR = "etc/systemd/system"
MARK = "# Written by ClawForge (claw os): "

GROW_SCRIPT = """#!/bin/sh
{mark}grow the root partition and its ext4 filesystem to the whole disk, once.
set -eu
src=$(findmnt -no SOURCE /)
name=$(basename "$src")
disk=/dev/$(lsblk -no PKNAME "$src")
part=$(cat "/sys/class/block/$name/partition")
# An image written to a bigger disk has its backup GPT in the middle: move it to the end.
sfdisk --label-nested gpt --relocate gpt-bak-std "$disk" 2>/dev/null || true
echo ", +" | sfdisk --force --no-reread --no-tell-kernel -N "$part" "$disk"
partx --update --nr "$part" "$disk"
resize2fs "$src"
rm -f /etc/clawforge/grow-root
"""

GROW_UNIT = """{mark}first boot only (while /etc/clawforge/grow-root exists).
[Unit]
Description=Grow the root partition and filesystem to the disk (ClawForge first boot)
ConditionPathExists=/etc/clawforge/grow-root
After=local-fs.target
Before=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/claw-grow-root
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

HOSTKEYS_UNIT = """{mark}every device gets its own SSH host keys.
[Unit]
Description=Generate this device's SSH host keys (ClawForge first boot)
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
# Ed25519 and ECDSA only: an RSA key takes minutes on a slow or emulated CPU at first boot.
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

PRELOAD_UNIT = """{mark}images saved into the OS image, loaded once.
[Unit]
Description=Load the container images preloaded into this OS image (ClawForge first boot)
ConditionDirectoryNotEmpty=/{dir}
Requires=docker.service
After=docker.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'for f in /{dir}/*.tar; do docker load -i "$f" && rm -f "$f"; done'
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""


@dataclass
class Settings:
    hostname: str = "claw-device"
    user: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    wifi: tuple[str, str] | None = None  # SSID, passphrase
    preload: list[str] = field(default_factory=list)  # image tags on this machine
    console: str | None = None


def read_ssh_key(path: Path) -> str:
    try:
        text = path.expanduser().read_text().strip()
    except OSError as exc:
        raise BadInput(f"--ssh-key {path}: cannot read it ({exc.strerror})") from None
    keys = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not keys or not all(k.startswith(KEY_TYPES) for k in keys):
        raise BadInput(f"--ssh-key {path}: not an OpenSSH public key (expected a line such as "
                       "'ssh-ed25519 AAAA… comment'; pass the .pub file)")
    return "\n".join(keys)


def parse_wifi(value: str) -> tuple[str, str]:
    ssid, sep, psk = value.partition(":")
    if not sep or not 1 <= len(ssid.encode()) <= 32 or not 8 <= len(psk) <= 63:
        raise BadInput(f"--wifi {value!r}: expected SSID:PASSPHRASE (SSID 1 to 32 bytes, "
                       "WPA passphrase 8 to 63 characters)")
    return ssid, psk


def check_settings(settings: Settings) -> None:
    if not HOSTNAME.match(settings.hostname):
        raise BadInput(f"--hostname {settings.hostname!r}: expected lower-case letters, digits "
                       "and '-', 1 to 63 characters")
    if settings.user is not None and (not USERNAME.match(settings.user)
                                      or settings.user == "root"):
        raise BadInput(f"--user {settings.user!r}: expected a login name such as 'claw' "
                       "(lower-case, starting with a letter, not root)")
    if settings.ssh_keys and settings.user is None:
        raise BadInput("--ssh-key needs --user (the account the key logs in to)")
    if settings.preload and shutil.which("docker") is None:
        raise BadInput("--preload-image needs the docker CLI on this machine (apt-get install "
                       "docker.io)")
    for tag in settings.preload:
        done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BadInput(f"--preload-image {tag}: no such image on this machine's Docker "
                           "engine (docker image ls; build or load it first)")


def apply(root: Path, settings: Settings, progress=lambda _: None) -> None:
    """Write the per-device settings into the root tree (a copy of a cached root)."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{settings.hostname}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{settings.hostname}\n"
                               "::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "machine-id").write_text("")  # each device makes its own on first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()  # shared by every image built from this cache: made per device instead
    _network(root, settings.wifi)
    if settings.user:
        _user(root, settings.user, settings.ssh_keys)
    sshd = etc / "ssh/sshd_config.d/claw.conf"
    sshd.parent.mkdir(parents=True, exist_ok=True)
    sshd.write_text(f"{MARK}key login only\nPasswordAuthentication no\n"
                    "PermitRootLogin prohibit-password\n")
    masked = etc / "systemd/system/systemd-firstboot.service"  # it would wait on the console
    masked.unlink(missing_ok=True)
    masked.symlink_to("/dev/null")
    (etc / "clawforge").mkdir(exist_ok=True)
    (etc / "clawforge/grow-root").write_text("")
    script = root / "usr/local/sbin/claw-grow-root"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(GROW_SCRIPT.format(mark=MARK))
    script.chmod(0o755)
    units = {"claw-grow-root.service": GROW_UNIT.format(mark=MARK),
             "claw-ssh-hostkeys.service": HOSTKEYS_UNIT.format(mark=MARK)}
    if settings.preload:
        if not (root / "usr/sbin/dockerd").exists():
            raise BadInput("--preload-image needs Docker in the image, and this root has no "
                           "dockerd (the docker_engine role did not install it)")
        units["claw-preload-images.service"] = PRELOAD_UNIT.format(mark=MARK, dir=PRELOAD_DIR)
        _preload(root, settings.preload, progress)
    for name, text in units.items():
        (root / UNIT_DIR / name).write_text(text)
    if settings.wifi and not has_unit(root, "wpa_supplicant@.service"):
        raise ClawError("--wifi: this root has no wpa_supplicant (install wpasupplicant)")
    enable(root, [*units, *(u for u in ("systemd-networkd.service", "systemd-resolved.service")
                            if has_unit(root, u))])
    if settings.wifi:
        # Wanted by the interface, not by multi-user.target: a board without wlan0 would
        # otherwise wait 90 s at every boot for a device that never comes.
        wants = root / UNIT_DIR / "sys-subsystem-net-devices-wlan0.device.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "wpa_supplicant@wlan0.service"
        link.unlink(missing_ok=True)
        link.symlink_to("/lib/systemd/system/wpa_supplicant@.service")
    if has_unit(root, "systemd-resolved.service"):
        resolv = etc / "resolv.conf"  # resolved answers with what DHCP gave
        resolv.unlink(missing_ok=True)
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")


def has_unit(root: Path, unit: str) -> bool:
    return any((root / d / unit).exists() for d in
               ("etc/systemd/system", "lib/systemd/system", "usr/lib/systemd/system"))


def enable(root: Path, units: list[str]) -> None:
    """`systemctl --root`: the host's systemctl links units inside the tree, nothing runs."""
    done = subprocess.run(["systemctl", f"--root={root}", "enable", *units],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ClawError(f"enabling {', '.join(units)} in the image failed: "
                        f"{done.stderr.strip()[-300:]}")


def _network(root: Path, wifi: tuple[str, str] | None) -> None:
    net = root / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    for old in net.glob("*.network"):
        old.unlink()
    (net / "20-wired.network").write_text(
        f"{MARK}DHCP on every wired interface\n[Match]\nName=eth* en*\n\n"
        "[Network]\nDHCP=yes\n")
    if wifi is None:
        return
    ssid, passphrase = wifi
    (net / "25-wireless.network").write_text(
        f"{MARK}DHCP on Wi-Fi\n[Match]\nName=wlan*\n\n[Network]\nDHCP=yes\n")
    # WPA-PSK from the passphrase (IEEE 802.11i: PBKDF2-SHA1, SSID as salt, 4096 rounds):
    # the image carries the key, not the passphrase.
    psk = hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()
    conf = root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    ssid_field = ssid.encode().hex()  # hex: any byte of an SSID, no quoting
    conf.write_text(f"{MARK}--wifi\nctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\n"
                    f"update_config=0\n\nnetwork={{\n\tssid={ssid_field}\n\tpsk={psk}\n}}\n")
    conf.chmod(0o600)


def _chroot(root: Path, *argv: str) -> None:
    done = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise ClawError(f"`{' '.join(argv)}` in the image failed: {done.stderr.strip()[-300:]}")


def _user(root: Path, user: str, keys: list[str]) -> None:
    """A sudo account with the keys; no password (key login only, sudo without one)."""
    passwd = (root / "etc/passwd").read_text()
    if not re.search(rf"^{re.escape(user)}:", passwd, re.M):
        _chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo",
                user)
    sudoers = root / f"etc/sudoers.d/90-claw-{user}"
    sudoers.write_text(f"{MARK}--user\n{user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    line = next(ln for ln in (root / "etc/passwd").read_text().splitlines()
                if ln.startswith(f"{user}:"))
    uid, gid, home = int(line.split(":")[2]), int(line.split(":")[3]), line.split(":")[5]
    ssh = root / home.lstrip("/") / ".ssh"
    ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth = ssh / "authorized_keys"
    auth.write_text("".join(f"{k}\n" for k in keys))
    auth.chmod(0o600)
    for path in (ssh, auth):
        shutil.chown(path, uid, gid)


def _preload(root: Path, tags: list[str], progress) -> None:
    out = root / PRELOAD_DIR
    out.mkdir(parents=True, exist_ok=True)
    for i, tag in enumerate(tags):
        progress(f"saving {tag} into the image")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
        done = subprocess.run(["docker", "save", "-o", str(out / f"{i:02d}-{name}.tar"), tag],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ClawError(f"docker save {tag} failed: {done.stderr.strip()[-300:]}")
