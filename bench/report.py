"""How every benchmark reports: a plain table of chosen columns, then the JSON record."""

from __future__ import annotations

import json
from typing import Any


def print_report(report: dict[str, Any], head: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(" | ".join(head))
    for row in report["rows"]:
        print(" | ".join(str(row[h]) for h in head))
    print(json.dumps(report))
