"""Sizes as people type them: 512M, 2G, 1.5GiB, 4294967296 (binary units, as `free -h`).

One grammar for every flag that takes a size (`--memory-budget`, `claw os build --size`, ...);
each caller words its own error, since the runtime and the provisioning side report bad input
through different exceptions.
"""

from __future__ import annotations

import re

SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", re.I)
SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes, or None when `text` is not a size ("GiB" without a number, "5iB", "2X")."""
    m = SIZE.fullmatch(text)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        return None
    return int(float(m.group(1)) * SCALE[m.group(2).lower()])
