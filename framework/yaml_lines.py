"""Load a YAML file together with a map from key path to line number.

OmegaConf and PyYAML's safe_load keep no positions, but every error we report
must name the line, so we walk PyYAML's node tree ourselves.

A model YAML may come from anywhere, so the reader is defensive: it reads only
regular files up to MAX_YAML_BYTES, refuses control characters, and measures
nesting depth (on the token stream, before PyYAML's recursive composer runs)
and the size of the document with its aliases expanded (a "billion laughs"
file is 1 KB of text and gigabytes of data)."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, SpecError, shown

KeyPath = tuple  # of str | int

MAX_YAML_BYTES = 1 << 20  # model YAMLs are a few KB
MAX_DEPTH = 64  # nesting levels; real model YAMLs use fewer than 10
MAX_NODES = 50_000  # values in the document with aliases expanded

# What YAML itself forbids (the same set PyYAML's reader refuses, with a traceback).
_NOT_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF]")


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


def _fail(file: str, message: str, line: int | None = None) -> SpecError:
    return SpecError([Problem(message, file=file, line=line)])


def read_yaml_text(file: str) -> str:
    """The text of a YAML file: a regular file (not a FIFO or device), at most MAX_YAML_BYTES, UTF-8,
    without control characters."""
    try:
        info = os.stat(file)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(file, "not a regular file (a directory, FIFO or device cannot be a model YAML)")
        check_text_size(info.st_size, file)
        with open(file, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise _fail(file, "file not found") from None
    except OSError as e:
        raise _fail(file, f"cannot read file: {e.strerror or e}") from None
    if len(data) > MAX_YAML_BYTES:  # it grew after stat
        raise _fail(file, f"file is over {MAX_YAML_BYTES:,} bytes, the most a model YAML may be")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _fail(file, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", line) from None
    check_printable(text, file)
    return text


def check_text_size(size: int, file: str) -> None:
    """Refuse a YAML text of more than MAX_YAML_BYTES bytes."""
    if size > MAX_YAML_BYTES:
        raise _fail(file, f"file is {size:,} bytes; a model YAML may be at most {MAX_YAML_BYTES:,}")


def check_printable(text: str, file: str) -> None:
    """Refuse control characters YAML does not allow in a file."""
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise _fail(file, f"control character U+{ord(bad.group()):04X} at column {column}; YAML allows only tab "
                          "and newline (write others as escapes, e.g. \"\\a\", in a double-quoted string)", line)


_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def check_nesting(text: str, file: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH. PyYAML's scanner is iterative, its composer recursive:
    counting on the tokens stops `[[[[...` long before a RecursionError."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise _fail(file, f"nested more than {MAX_DEPTH} levels deep (at column "
                                  f"{token.start_mark.column + 1}); a model YAML needs far fewer",
                            token.start_mark.line + 1)
        elif isinstance(token, _CLOSE):
            depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_expanded_size(root: yaml.Node, file: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_NODES values, or nest deeper than
    MAX_DEPTH, or refer to themselves. Iterative, with each shared node measured once."""
    size: dict[int, tuple[int, int]] = {}  # node id -> (values, depth) once measured
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = [size[id(k)] for k in _children(node)]
            count = 1 + sum(k[0] for k in kids)
            depth = 1 + max((k[1] for k in kids), default=0)
            line = node.start_mark.line + 1
            if count > MAX_NODES:
                raise _fail(file, f"the value here expands to more than {MAX_NODES:,} values through its "
                                  "aliases (*name); a model YAML needs far fewer", line)
            if depth > MAX_DEPTH:
                raise _fail(file, f"the value here nests more than {MAX_DEPTH} levels deep through its "
                                  "aliases (*name)", line)
            size[key] = (count, depth)
            on_path.discard(key)
        elif key in on_path:
            raise _fail(file, "an alias (*name) refers to a value that contains it", node.start_mark.line + 1)
        elif key not in size:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value errors (an int too long to convert, a date like 2026-13-45) carry a line."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {shown(str(e))}",
                                                    node.start_mark) from None


def load_yaml_with_lines(file: str | Path) -> tuple[Any, LineMap]:
    """Parse a YAML file safely. A syntax error raises SpecError with file and line; duplicate
    keys are left in `LineMap.problems` so they are reported along with everything else."""
    file = str(file)
    return parse_yaml_text(read_yaml_text(file), file)


def check_yaml_text(text: str, file: str) -> None:
    """Raise the SpecError the reader would raise for `text` as the contents of `file` (size, characters,
    nesting, aliases, syntax); for YAML about to be written, so that what is written can be read."""
    check_text_size(len(text.encode("utf-8", "surrogatepass")), file)
    check_printable(text, file)
    parse_yaml_text(text, file)


def parse_yaml_text(text: str, file: str) -> tuple[Any, LineMap]:
    """load_yaml_with_lines on a text already read (and checked by read_yaml_text)."""
    loader = _Loader(text)
    try:
        check_nesting(text, file)
        node = loader.get_single_node()
        if node is not None:
            check_expanded_size(node, file)
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
