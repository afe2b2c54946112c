"""Command groups whose work lands in later issues: they say so plainly and exit 1."""

from __future__ import annotations

import typer

from provision.errors import ClawError

PENDING = {
    "os": ("Build or customise bootable arm64 OS images.", 10),
}


def _not_yet(name: str, issue: int) -> typer.Typer:
    group = typer.Typer(help=f"{PENDING[name][0]} (not yet available: issue #{issue})",
                        invoke_without_command=True)

    @group.callback()
    def _pending() -> None:
        raise ClawError(f"claw {name}: not yet available (tracked in issue #{issue})")

    return group


def register(app: typer.Typer) -> None:
    for name, (_, issue) in PENDING.items():
        app.add_typer(_not_yet(name, issue), name=name)

