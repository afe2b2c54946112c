"""bench/RESULTS.md as data: each section's Markdown tables, numbers parsed out of their cells,
so the dashboard and `claw runtime bench --plot` can draw them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from provision.errors import BadInput

NUMBER = re.compile(r"^[~≈]?\s*(-?\d+(?:[.,]\d+)*)")


@dataclass
class Table:
    section: str
    header: list[str]
    rows: list[list[str]]

    def numeric_columns(self) -> list[int]:
        """Columns (after the first) where every row starts with a number."""
        return [c for c in range(1, len(self.header))
                if self.rows and all(cell_number(r[c]) is not None for r in self.rows)]

    def series(self) -> list[tuple[str, list[float]]]:
        return [(self.header[c], [cell_number(r[c]) or 0.0 for r in self.rows])
                for c in self.numeric_columns()]

    def labels(self) -> list[str]:
        return [r[0] for r in self.rows]


def cell_number(cell: str) -> float | None:
    m = NUMBER.match(cell.strip().strip("*"))
    return float(m.group(1).replace(",", "")) if m else None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(text: str) -> list[Table]:
    tables: list[Table] = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.match(
                r"^\|[\s:|-]+\|?\s*$", lines[i + 1]):
            header, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                row = _cells(lines[i])
                if len(row) == len(header):
                    rows.append(row)
                i += 1
            tables.append(Table(section, header, rows))
            continue
        i += 1
    return tables


def load(path: Path) -> list[Table]:
    """The plottable tables (a label column and at least one numeric column) of `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read benchmark results ({exc.strerror}; expected "
                       "bench/RESULTS.md)") from None
    return [t for t in parse(text) if t.numeric_columns()]


def default_results() -> Path:
    """bench/RESULTS.md of the checkout this package runs from, else of the current folder."""
    here = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
    return here if here.is_file() else Path("bench/RESULTS.md")
