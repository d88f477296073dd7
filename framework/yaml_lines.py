"""Load a YAML file together with a map from key path to line number.

OmegaConf and PyYAML's safe_load keep no positions, but every error we report
must name the line, so we walk PyYAML's node tree ourselves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, SpecError

KeyPath = tuple  # of str | int


def format_key(path: KeyPath) -> str:
    """('stages', 3, 'encoders') -> 'stages[3].encoders'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class LineMap:
    """Key path -> (file, 1-based line); unknown paths fall back to their nearest parent.

    A model YAML that `extends` another mixes keys of two files, so the file is
    kept per key, not once per map."""

    def __init__(self, file: str | None = None, lines: dict[KeyPath, int] | None = None):
        self._where: dict[KeyPath, tuple[str | None, int]] = {p: (file, n) for p, n in (lines or {}).items()}
        self.default_file = file
        self.problems: list[Problem] = []  # non-fatal parse problems (duplicate keys)

    def where(self, path: KeyPath) -> tuple[str | None, int | None]:
        path = tuple(path)
        while True:
            if path in self._where:
                return self._where[path]
            if not path:
                return self.default_file, None
            path = path[:-1]

    def line(self, path: KeyPath) -> int | None:
        return self.where(path)[1]

    def file(self, path: KeyPath) -> str | None:
        return self.where(path)[0]

    def overlay(self, child: "LineMap", replaced: set[KeyPath]) -> "LineMap":
        """This map with `child` on top; base entries under a `replaced` path are dropped."""
        out = LineMap(child.default_file)
        for path, where in self._where.items():
            if not any(path[:len(r)] == r for r in replaced):
                out._where[path] = where
        out._where.update(child._where)
        out.problems = self.problems + child.problems
        return out


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], duplicates: list[tuple[KeyPath, int]],
          visited: set[int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in visited:  # an alias: its keys keep the alias's line (and nested aliases cannot explode)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            child = path + (key,)
            if (key_node.tag, key) in seen:  # PyYAML silently keeps the last one; that hides typos
                duplicates.append((child, key_node.start_mark.line + 1))
                continue
            seen.add((key_node.tag, key))
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines, duplicates, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines, duplicates, visited)


def load_yaml_with_lines(file: str | Path) -> tuple[Any, LineMap]:
    """Parse a YAML file safely. A syntax error raises SpecError with file and line; duplicate
    keys are left in `LineMap.problems` so they are reported along with everything else."""
    file = str(file)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("file not found", file=file)]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([Problem(f"cannot read file: {e}", file=file)]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise SpecError([Problem(f"YAML syntax error: {what}", file=file, line=line)]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(f"YAML error: {e}", file=file)]) from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    duplicates: list[tuple[KeyPath, int]] = []
    if node is not None:
        _walk(node, (), lines, duplicates, set())
    line_map = LineMap(file, lines)
    # Reported with the other problems, not alone: the data is still usable (last one wins).
    line_map.problems = [Problem(f"duplicate key '{path[-1]}' (an earlier one at line {lines.get(path)} would be "
                                 "silently replaced)", key=format_key(path), file=file, line=line)
                         for path, line in duplicates]
    return data, line_map
