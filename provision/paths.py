"""Where ClawForge keeps user files: XDG config for profiles, XDG state for run artifacts."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "clawforge"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "clawforge"


def user_profiles_dir() -> Path:
    return config_dir() / "profiles"
