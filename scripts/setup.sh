#!/usr/bin/env bash
# One idempotent set-up for `make demo`, `make test` and `.ci/run` on a fresh Debian bookworm
# machine (root): Debian packages, a running Docker engine, arm64 binfmt, and .venv with the
# project and its extras. A second run finds everything in place and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  docker.io            # Docker engine (20.10) for image builds and emulated devices
  qemu-user-static     # arm64 binaries on x86_64 through binfmt
  binfmt-support       # update-binfmts
  debootstrap          # offline base images and OS root filesystems
  qemu-system-arm      # qemu-system-aarch64: the arm64 VM of the e2e tier
  qemu-efi-aarch64     # UEFI firmware for booting built OS images
  u-boot-qemu          # U-Boot for QEMU's virt machine: boot-tests extlinux (U-Boot board) images
  u-boot-tools         # mkimage/dumpimage: the rk3588 image test packs and reads a Rockchip loader
  qemu-utils           # qemu-img: copy-on-write overlays over cached VM disks
  mtools               # claw os: fills the FAT boot partition of an image without mounting it
  openssh-client       # Ansible's transport to (emulated) devices
  e2fsprogs dosfstools parted fdisk util-linux  # disk images and flashing
  xz-utils zstd        # compressed images and exports
  docker-registry      # a local registry for the `claw image push` test
  chromium chromium-driver  # headless browser tests of `claw fleet dashboard` (Selenium)
)

log() { printf '[setup] %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "Debian packages present"; return; }
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_docker() {
  if docker info >/dev/null 2>&1; then log "Docker engine running"; return; fi
  log "starting dockerd"
  # Flags that work inside this kind of machine (no iptables, no bridge): see DESIGN.md.
  as_root bash -c 'setsid nohup dockerd --iptables=false --ip6tables=false --bridge=none \
      >/var/log/clawforge-dockerd.log 2>&1 < /dev/null &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && { log "Docker engine up"; return; }; sleep 1; done
  log "dockerd did not come up; see /var/log/clawforge-dockerd.log"; tail -5 /var/log/clawforge-dockerd.log; exit 1
}

enable_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    as_root mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || log "cannot mount binfmt_misc"
  fi
  if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then log "arm64 binfmt registered"; return; fi
  as_root update-binfmts --enable qemu-aarch64 || log "could not register qemu-aarch64 (claw doctor explains)"
}

raise_inotify_limit() {
  # Every emulated device runs systemd (and with --engine, dockerd and containerd), each holding
  # inotify instances of root's: the default 128 runs out at about twenty devices, and a device
  # started past it exits at once (code 255, no log).
  local now; now=$(cat /proc/sys/fs/inotify/max_user_instances 2>/dev/null || echo 0)
  if [ "$now" -lt 1024 ]; then
    as_root sh -c 'echo 1024 > /proc/sys/fs/inotify/max_user_instances' 2>/dev/null \
      && log "inotify instances per user: $now -> 1024" \
      || log "cannot raise fs.inotify.max_user_instances ($now): large device fleets may not start"
  fi
}

make_venv() {
  local stamp=.venv/.clawforge-installed want
  want=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then log ".venv up to date"; return; fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # This kind of machine keeps a CPU build of torch in /opt/wheels; PyPI's is a CUDA build.
  if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"; fi
  log "installing clawforge[all,test] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[all,test]'
  echo "$want" > "$stamp"
}

install_apt_packages
start_docker
enable_binfmt
raise_inotify_limit
make_venv
log "ready"
