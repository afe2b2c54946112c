"""Bootable arm64 OS images: `claw os build` and `claw os customize`.

disk.py lays out and fills the disk image (GPT, FAT boot partition, ext4 root) with no loop
device and no mount; rootfs.py makes the root trees, cached by their inputs, and applies the
provisioning roles to them offline through Ansible's chroot connection; firstboot.py writes
the per-device part (hostname, user, key, network, root growth, preloaded images); build.py
and customize.py put these together.
"""
