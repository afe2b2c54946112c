"""Kernel updates reach the FAT boot partition: a hook that copies the newest installed kernel,
its initrd and the profile's device tree to /boot/firmware under the fixed names the boot
configuration there reads (extlinux.conf, config.txt, grub.cfg or QEMU's -kernel name nothing
else), so nothing on the FAT needs rewriting.

The same script runs from three places, and always installs the newest kernel that has an
initrd, whatever called it: /etc/kernel/postinst.d (a kernel installed: Debian's
linux-image-* maintainer scripts run it through linux-run-hooks), /etc/kernel/postrm.d (one
removed: the newest left takes its place) and /etc/initramfs/post-update.d
(`update-initramfs -u`, e.g. after a firmware or cryptsetup package changed the initrd).

It refuses (exit 1, so apt reports it) when /boot/firmware does not hold the kernel it
replaces: the boot partition is not mounted (fstab marks it nofail), and the board would
otherwise keep booting the previous kernel without anyone noticing.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from provision.osimage import rpi, uboot
from provision.profiles import DeviceProfile

NAME = "zz-claw-boot"  # after initramfs-tools' own hook, which makes the initrd
SCRIPT_PATH = "usr/local/sbin/claw-boot-update"
CONF_PATH = "etc/clawforge/boot.conf"
HOOK_DIRS = ("etc/kernel/postinst.d", "etc/kernel/postrm.d", "etc/initramfs/post-update.d")
BOOT_DIR = "/boot/firmware"

RUN_PARTS_PATH = "usr/local/sbin/run-parts"
# apt runs dpkg (and so every maintainer script) with PATH=DPkg::Path, by default
# /usr/sbin:/usr/bin:/sbin:/bin: /usr/local/sbin, first on root's own PATH, goes in front.
DPKG_PATH_CONF = "etc/apt/apt.conf.d/50claw-dpkg-path"
DPKG_PATH = ('// Written by ClawForge (claw os build): /usr/local/sbin/run-parts runs the\n'
             "// kernel's hook directories on bookworm (see that file)\n"
             'DPkg::Path "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin";\n')
# The kernels of the next release (trixie-backports' 7.x) run their hooks through linux-base
# >= 4.17's linux-run-hooks, which passes /etc/kernel/X.d and /usr/share/kernel/X.d to one
# run-parts: debianutils >= 5.21 takes several directories, bookworm's 5.7 only one (and
# trixie's debianutils needs trixie's libc). Ahead of /usr/bin on root's PATH, this merges the
# directories as 5.21 does (one lexical order; a name in an earlier directory hides a later
# one's) and hands bookworm's run-parts the one; any other call goes straight through.
RUN_PARTS = r"""#!/bin/sh
# Written by ClawForge (claw os build): run-parts over several directories for bookworm's
# run-parts (debianutils 5.7 takes one), as debianutils >= 5.21 runs them. Needed by the
# trixie-backports kernel's linux-run-hooks; one directory or none goes straight through.
set -eu
dirs=0
for arg; do case $arg in -*) ;; *) dirs=$((dirs + 1)) ;; esac; done
[ "$dirs" -gt 1 ] || exec /usr/bin/run-parts "$@"
merged=$(mktemp -d)
trap 'rm -rf "$merged"' EXIT
for arg; do
    shift
    case $arg in
        --) ;;
        -*) set -- "$@" "$arg" ;;
        *) for file in "$(cd "$arg" && pwd)"/*; do
               name=${file##*/}
               if [ -e "$file" ] && [ ! -e "$merged/$name" ] && [ ! -L "$merged/$name" ]; then
                   ln -s "$file" "$merged/$name"
               fi
           done ;;
    esac
done
/usr/bin/run-parts "$@" "$merged"
"""

SCRIPT = r"""#!/bin/sh
# Written by ClawForge (claw os build): copies the newest kernel, its initrd and the board's
# device tree to the FAT boot partition, under the names its boot configuration reads.
# Called as a kernel postinst/postrm hook and as an initramfs post-update hook (arguments
# ignored: the newest installed kernel with an initrd is always the one put there).
set -eu
. "${CLAW_BOOT_CONF:-/etc/clawforge/boot.conf}"
: "${PREFIX:=}" "${DTB:=}" "${DTB_NAME:=}"

kernel_of() {  # the kernel package's image: /boot (Debian <= 6.x, and 7.x's legacy hook)
    if [ -e "$PREFIX/boot/vmlinuz-$1" ]; then echo "$PREFIX/boot/vmlinuz-$1"
    elif [ -e "$PREFIX/usr/lib/modules/$1/vmlinuz" ]; then echo "$PREFIX/usr/lib/modules/$1/vmlinuz"
    fi
}

newest=""
for version in $( (ls "$PREFIX/boot" 2>/dev/null | sed -n 's/^vmlinuz-//p'
                   ls "$PREFIX/usr/lib/modules" 2>/dev/null) | sort -uV); do
    if [ -n "$(kernel_of "$version")" ] && [ -e "$PREFIX/boot/initrd.img-$version" ]; then
        newest=$version
    fi
done
if [ -z "$newest" ]; then
    echo "claw-boot: no kernel with an initrd yet; $BOOT left as it is" >&2
    exit 0
fi
if [ ! -e "$BOOT/$KERNEL" ]; then
    echo "claw-boot: $BOOT holds no $KERNEL (is the boot partition mounted?): kernel" \
         "$newest not copied, the board still boots the previous one" >&2
    exit 1
fi

put() {  # SRC NAME [unpack]: a copy beside the old file, then renamed over it
    mkdir -p "$(dirname "$BOOT/$2")"
    if [ "${3:-}" = unpack ] && gzip -t "$1" 2>/dev/null; then
        gzip -dc "$1" > "$BOOT/$2.claw-new"
    else
        cp "$1" "$BOOT/$2.claw-new"
    fi
    mv -f "$BOOT/$2.claw-new" "$BOOT/$2"
}

put "$(kernel_of "$newest")" "$KERNEL" unpack
put "$PREFIX/boot/initrd.img-$newest" "$INITRD"
if [ -n "$DTB" ]; then
    put "$PREFIX/usr/lib/linux-image-$newest/$DTB" "$DTB_NAME"
fi
echo "$newest" > "$BOOT/claw-kernel.txt"
sync
echo "claw-boot: $BOOT boots $newest"
"""


def boot_names(profile: DeviceProfile) -> dict[str, str]:
    """The names the profile's boot configuration reads on the FAT partition."""
    loader = profile.os.bootloader
    if loader == "rpi-firmware":
        return {"KERNEL": rpi.KERNEL, "INITRD": rpi.INITRD, "DTB": profile.os.dtb or "",
                "DTB_NAME": rpi.dtb_name(profile) if profile.os.dtb else ""}
    if loader == "u-boot":
        return {"KERNEL": uboot.KERNEL, "INITRD": "initrd.img", "DTB": profile.os.dtb or "",
                "DTB_NAME": f"dtbs/{profile.os.dtb}" if profile.os.dtb else ""}
    return {"KERNEL": "vmlinuz", "INITRD": "initrd.img", "DTB": "", "DTB_NAME": ""}


def config(profile: DeviceProfile, boot_dir: str = BOOT_DIR, prefix: str = "") -> str:
    values = {"BOOT": boot_dir, **boot_names(profile)} | ({"PREFIX": prefix} if prefix else {})
    return (f"# Written by ClawForge (claw os build) for profile {profile.name}: read by "
            f"/{SCRIPT_PATH}\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))


def _write(root: Path, path: str, text: str, executable: bool = False) -> None:
    """A file of the root tree, its folders made as needed."""
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    if executable:
        target.chmod(0o755)


def install_run_parts(root: Path) -> None:
    """The run-parts shim, and apt's PATH for dpkg with /usr/local/sbin in it."""
    _write(root, RUN_PARTS_PATH, RUN_PARTS, executable=True)
    _write(root, DPKG_PATH_CONF, DPKG_PATH)


def install(root: Path, profile: DeviceProfile) -> None:
    """The script, its configuration and the three hook links into a root tree."""
    _write(root, SCRIPT_PATH, SCRIPT, executable=True)
    _write(root, CONF_PATH, config(profile))
    for folder in HOOK_DIRS:
        link = root / folder / NAME
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(f"/{SCRIPT_PATH}")
