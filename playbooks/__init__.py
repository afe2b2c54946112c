"""Ansible content shipped with ClawForge (playbooks and roles); a package only so that the
wheel carries it and `importlib.resources` finds it wherever `claw` is installed."""
