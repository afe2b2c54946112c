"""e2e tier: the QEMU arm64 VM and image builds (lands with provisioning and OS images)."""
