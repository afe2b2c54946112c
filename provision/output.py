"""Tables for people, JSON for scripts: every tabular command offers both."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return "-" if value is None else str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                styles: dict[str, str] | None = None) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, style=(styles or {}).get(column))
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def emit(title: str, records: list[dict[str, Any]], columns: dict[str, str], as_json: bool) -> None:
    """`records` as JSON, or as a table of `columns` (record key → heading)."""
    if as_json:
        print_json(records)
    else:
        print_table(title, list(columns.values()), ([r.get(k) for k in columns] for r in records))
