"""Fleet rollouts: release runtime images in batches with health checks and rollback, and keep
their history (playbooks/rollout.yml and the claw_release role do the device side)."""
