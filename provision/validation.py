"""Pydantic errors rephrased as ClawForge's one-line form: `what is wrong (expected …)`."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from provision.yamlsource import SourcedYaml, format_loc

_SHOULD = re.compile(r"^(Input|String|List|Value|Dictionary|Tuple) should (be |have )?"
                     r"(?P<rest>.*)$")


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(err: dict[str, Any]) -> str:
    """One pydantic error as `VALUE is not valid (expected …)` without the field name."""
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown field (expected one of the schema's fields)"
    if kind == "missing":
        return "missing (expected a value)"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        return (f"{_shown(err.get('input'))} is not valid (expected text matching "
                f"{err['ctx']['pattern']})")
    match = _SHOULD.match(msg)
    expected = match["rest"] if match else msg[0].lower() + msg[1:]
    expected = expected.replace(" after validation", "")
    return f"{_shown(err.get('input'))} is not valid (expected {expected})"


def validation_lines(src: SourcedYaml, exc: ValidationError) -> list[str]:
    """Turn a pydantic error into `FILE:LINE: field: what is wrong (expected …)` lines."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        text = describe(err)
        if err["type"] == "value_error" and not loc and ": " in text:
            field_name, _, text = text.partition(": ")  # our model validators name the field
            loc = tuple(field_name.split("."))
        lines.append(f"{src.where(loc)}: {format_loc(loc)}: {text}")
    return lines
