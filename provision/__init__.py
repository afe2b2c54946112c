"""ClawForge controller: CLI, profiles, inventories, provisioning, OS images, fleet rollouts."""

__version__ = "0.1.0"
