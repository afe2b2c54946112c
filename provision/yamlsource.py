"""YAML loading that remembers where every value came from.

Users edit profiles and inventories by hand, so every error must point at `FILE:LINE`. PyYAML's
composer gives us nodes with marks; we build plain Python data plus a map from each value's path
(a tuple of keys and list indexes) to its 1-based line, and reject duplicate keys, which PyYAML
would otherwise silently overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provision.errors import BadInput

YamlPath = tuple[str | int, ...]


@dataclass
class SourcedYaml:
    """Parsed YAML data with the line of every key/value, for `FILE:LINE:` messages."""

    path: Path
    data: Any
    lines: dict[YamlPath, int] = field(default_factory=dict)

    def line_of(self, loc: YamlPath) -> int:
        """Line of `loc`, or of its nearest ancestor that has one (1 for the document)."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), 1)

    def where(self, loc: YamlPath) -> str:
        return f"{self.path}:{self.line_of(loc)}"


def format_loc(loc: YamlPath) -> str:
    """`('cpu', 0, 'cores')` → `cpu[0].cores`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def read_text(path: Path, what: str) -> str:
    """Read a user file, turning OS errors into one-line bad-input messages."""
    try:
        data = path.read_bytes()
        return data.decode("utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory (expected a YAML {what} file)") from None
    except PermissionError:
        raise BadInput(f"{path}: cannot read {what}: permission denied") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: {what}: byte {data[exc.start]:#04x} is not UTF-8 "
                       "(expected UTF-8 text)") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read {what}: {exc.strerror}") from None


def load_yaml(path: Path, what: str = "YAML file") -> SourcedYaml:
    """Parse one YAML document from `path`, with line numbers; bad YAML raises BadInput."""
    text = read_text(path, what)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = ", ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise BadInput(f"{path}:{line}: malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path}: malformed YAML: {exc}") from None
    result = SourcedYaml(path=path, data=None)
    if node is None:
        return result
    result.data = _construct(node, (), result, path)
    return result


def _construct(node: yaml.Node, loc: YamlPath, out: SourcedYaml, path: Path) -> Any:
    out.lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise BadInput(f"{path}:{key_node.start_mark.line + 1}: YAML merge keys (<<) "
                               "are not supported here (expected plain keys)")
            key = _scalar(key_node, path)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise BadInput(f"{path}:{key_node.start_mark.line + 1}: mapping key must be a "
                               "scalar (expected a name)")
            if key in mapping:
                raise BadInput(f"{path}:{key_node.start_mark.line + 1}: {format_loc((*loc, key))}"
                               f": duplicate key (first at line {out.lines[(*loc, key)]})")
            out.lines[(*loc, key)] = key_node.start_mark.line + 1
            mapping[key] = _construct(value_node, (*loc, key), out, path)
        return mapping
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*loc, i), out, path) for i, item in enumerate(node.value)]
    return _scalar(node, path)


def _scalar(node: yaml.Node, path: Path) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return node  # a complex key; rejected by the caller
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise BadInput(f"{path}:{node.start_mark.line + 1}: {exc.problem}") from None


def dump_yaml_atomic(path: Path, data: Any) -> None:
    """Write YAML through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
