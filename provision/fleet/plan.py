"""What a rollout will do, before anything runs: its settings, checked, and the batches Ansible's
`serial` will make of the fleet (shown by --dry-run, recorded in the history)."""

from __future__ import annotations

from dataclasses import dataclass

from provision.errors import BadInput

STRATEGIES = ("download-then-restart", "restart-then-download")


@dataclass
class Settings:
    canary: int = 1
    batch: str = "25%"
    max_fail: int = 10
    strategy: str = STRATEGIES[0]
    registry: str = ""
    health_timeout: int = 180
    guard_s: int = 900

    @property
    def delivery(self) -> str:
        return "registry" if self.registry else "tar"

    def serial(self) -> list[int | str]:
        return ([self.canary] if self.canary else []) + [self.batch]


def parse_batch(value: str) -> str:
    """`25%` or `3`: what Ansible's `serial` takes."""
    text = value.strip()
    number = text[:-1] if text.endswith("%") else text
    if not number.isdigit() or int(number) < 1 or (text.endswith("%") and int(number) > 100):
        raise BadInput(f"--batch {value!r} is not valid (expected a number of devices ≥ 1 or a "
                       "percentage 1%–100%, e.g. 25%)")
    return f"{int(number)}%" if text.endswith("%") else str(int(number))


def parse_max_fail(value: str) -> int:
    text = value.strip().removesuffix("%")
    if not text.isdigit() or int(text) > 100:
        raise BadInput(f"--max-fail {value!r} is not valid (expected a percentage 0%–100% of a "
                       "batch, e.g. 10%)")
    return int(text)


def plan_batches(hosts: list[str], serial: list[int | str]) -> list[list[str]]:
    """The batches Ansible's `serial` makes of `hosts` (percentages of all of them, at least
    one host each, the last size repeating)."""
    sizes: list[int] = []
    for item in serial:
        text = str(item)
        size = int(int(text[:-1]) / 100 * len(hosts)) if text.endswith("%") else int(text)
        sizes.append(max(size, 1))
    batches, i, k = [], 0, 0
    while i < len(hosts):
        size = sizes[min(k, len(sizes) - 1)]
        batches.append(hosts[i:i + size])
        i, k = i + size, k + 1
    return batches
