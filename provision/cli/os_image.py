"""`claw os build` and `claw os customize`: bootable arm64 images with provisioning baked in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from provision.output import console, err_console, print_json

app = typer.Typer(help="Build or customise bootable arm64 OS images (flash them with "
                  "`claw flash`).", no_args_is_help=True)

HOSTNAME = typer.Option("claw-device", "--hostname", help="The device's hostname.")
USER = typer.Option(None, "--user", help="A sudo account (key login, no password).")
SSH_KEY = typer.Option([], "--ssh-key", help="OpenSSH public key file for --user (repeatable).")
WIFI = typer.Option(None, "--wifi", help="SSID:PASSPHRASE for wlan0 (WPA-PSK, DHCP).")
PRELOAD = typer.Option([], "--preload-image", help="Local Docker image to load on first boot "
                       "(repeatable).")
VARS = typer.Option([], "-e", "--var", help="Host variable for the roles, key=value (as in an "
                    "inventory, e.g. claw_hugepages_mb=64).")
COMPRESS = typer.Option(None, "--compress", help="Also write IMAGE.zst or IMAGE.xz (zst|xz).")
TAGS = typer.Option(None, "--tags", help="Only these roles (comma-separated, as in `claw "
                    "provision`).")
JSON = typer.Option(False, "--json", help="Print the result as JSON.")


class StepDisplay:
    """A line per finished step with its time; a spinner with the step (and the Ansible task)
    in progress."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.status = err_console.status("", spinner="dots")
        self.step, self.started = "", time.monotonic()

    def __enter__(self) -> StepDisplay:
        if not self.quiet:
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.stop()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        err_console.print(f"[dim]{time.monotonic() - self.started:7.1f} s[/] {message}",
                          highlight=False)
        self.step = message
        self.status.update(message)

    def event(self, event: dict[str, Any]) -> None:
        data = event.get("event_data", {})
        if not self.quiet and event.get("event") == "runner_on_start":
            self.status.update(f"{self.step}: {data.get('task', '')}")


def _settings(hostname: str, user: str | None, ssh_key: list[Path], wifi: str | None,
              preload: list[str]):
    from provision.osimage import firstboot

    return firstboot.Settings(
        hostname=hostname, user=user,
        ssh_keys=[firstboot.read_ssh_key(path) for path in ssh_key],
        wifi=firstboot.parse_wifi(wifi) if wifi is not None else None, preload=preload)


def _host_vars(items: list[str]) -> dict[str, Any]:
    from provision.errors import BadInput
    from provision.provisioning import parse_extravars

    out = parse_extravars(items)
    if any(item.startswith("@") for item in items):
        raise BadInput("-e/--var takes key=value (host variables for the roles)")
    return out


def _tags(tags: str | None) -> list[str] | None:
    return [t.strip() for t in tags.split(",") if t.strip()] if tags else None


def _report(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(record)
        return
    console.print(f"[bold]{record['image']}[/] ({record['size'] / 2**30:.1f} GiB) in "
                  f"{record['seconds']:.0f} s", highlight=False)
    for path in record["files"]:
        console.print(f"  {path}", highlight=False)
    if "boot" in record:
        console.print(f"  boot: {record['boot']}; cmdline: {record['cmdline']}",
                      highlight=False)
    console.print(f"  flash it: claw flash {record['files'][0]} /dev/sdX", highlight=False)


@app.command("build")
def build_cmd(
    profile: str = typer.Argument(..., help="Device profile (claw profiles list)."),
    output: Path = typer.Option(..., "-o", "--output", help="The raw image to write."),
    size: str = typer.Option("4G", "--size", help="Disk image size (e.g. 4G); the root grows "
                             "to the device's disk on first boot."),
    hostname: str = HOSTNAME, user: str | None = USER, ssh_key: list[Path] = SSH_KEY,
    wifi: str | None = WIFI, preload_image: list[str] = PRELOAD, var: list[str] = VARS,
    tags: str | None = TAGS, compress: str | None = COMPRESS,
    u_boot: str | None = typer.Option(
        None, "--u-boot", help="U-Boot profiles (rk3588): the board's u-boot-rockchip.bin, "
        "written at sector 64 (Debian has none for RK3588), or 'none' when U-Boot is in the "
        "board's SPI flash."),
    as_json: bool = JSON,
) -> None:
    """Build a bootable arm64 disk image for PROFILE: GPT (MBR for the Raspberry Pi 5) with a
    FAT boot partition and an ext4 root made with debootstrap, the profile's kernel, the
    provisioning roles applied offline (persistent part only) and first-boot settings. Writes
    IMAGE, IMAGE.bmap and IMAGE.sha256 (and IMAGE.zst/.xz with --compress). Roots are cached
    by their inputs: the first build takes minutes under qemu-user, later ones much less.
    U-Boot boards (rk3588) get an extlinux.conf and the board's U-Boot from --u-boot; the Pi 5
    (rpi5) config.txt and cmdline.txt for its EEPROM bootloader. A kernel hook keeps the boot
    partition's copy of the kernel current.

    Example: [bold]claw os build qemu-virt -o dev.img --user claw --ssh-key id.pub[/bold]
    """
    from provision.osimage.build import build

    settings = _settings(hostname, user, ssh_key, wifi, preload_image)
    host_vars = _host_vars(var)
    with StepDisplay(quiet=as_json) as display:
        record = build(profile, output, size=size, settings=settings, host_vars=host_vars,
                       compress=compress, tags=_tags(tags), u_boot=u_boot, progress=display,
                       on_event=display.event)
    _report(record, as_json)


@app.command("customize")
def customize_cmd(
    base: Path = typer.Argument(..., help="The image to start from: raw, .xz, .zst or .gz."),
    output: Path = typer.Option(..., "-o", "--output", help="The raw image to write."),
    profile: str = typer.Option("generic-arm64", "--profile", help="Device profile the roles "
                                "size their settings from."),
    hostname: str = HOSTNAME, user: str | None = USER, ssh_key: list[Path] = SSH_KEY,
    wifi: str | None = WIFI, preload_image: list[str] = PRELOAD, var: list[str] = VARS,
    tags: str | None = TAGS, compress: str | None = COMPRESS,
    size: str | None = typer.Option(None, "--size", help="Make the image this big (e.g. 8G; "
                                    "at least the base's size) and grow the root partition, the "
                                    "last one, to its end. Without it the root grows only into "
                                    "free space after it, and only when the result needs it."),
    as_json: bool = JSON,
) -> None:
    """Apply the provisioning roles (offline) and the first-boot settings to an image made
    elsewhere (Raspberry Pi OS, Armbian, …): a GPT or MBR disk with a FAT boot partition and an
    ext4 arm64 root. Read without mounting; the boot partition and the root's label and UUID
    are kept. Refuses an image it cannot understand, saying why.

    Example: [bold]claw os customize raspios.img.xz -o dev.img --profile rpi5 --user claw[/bold]
    """
    from provision.osimage.customize import customize

    settings = _settings(hostname, user, ssh_key, wifi, preload_image)
    host_vars = _host_vars(var)
    with StepDisplay(quiet=as_json) as display:
        record = customize(base, output, profile_name=profile, settings=settings,
                           host_vars=host_vars, tags=_tags(tags), compress=compress,
                           size=size, progress=display, on_event=display.event)
    _report(record, as_json)
