"""Write model-spec data as YAML text that the model YAML reader (yaml_lines) will read back: values YAML
cannot hold are refused by key, and the text passes the reader's own limits (size, nesting, aliases)."""
from __future__ import annotations

import math
import sys
from typing import Any

import yaml

from .errors import Problem, SpecError, shown
from .yaml_lines import MAX_DEPTH, check_yaml_text, format_key

SCALARS = (str, int, float, bool, type(None))  # exact types: a subclass (numpy.float64) has no safe representer
KINDS = "numbers, strings, booleans, null, lists and mappings"


def _decimal_length(value: int) -> int:
    """How many decimal figures `value` has, without str() (which refuses past sys.get_int_max_str_digits())."""
    size = abs(value)
    length = int(math.log10(size)) + 1 if size else 1
    if 10 ** (length - 1) > size:  # log10 rounds near powers of ten
        length -= 1
    elif 10 ** length <= size:
        length += 1
    return length


def _scalar_problem(value: Any) -> str | None:
    if type(value) not in SCALARS:
        return f"a {type(value).__name__} cannot be written as YAML (use {KINDS})"
    if type(value) is int:
        limit = sys.get_int_max_str_digits()  # the reader's int() refuses longer ones
        if limit and abs(value) >= 10 ** limit:
            return (f"an integer of {_decimal_length(value)} figures cannot be written as YAML (a YAML reader takes at most "
                    f"{limit})")
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"a string with the lone surrogate U+{ord(value[e.start]):04X} cannot be written as UTF-8"
    return None


def _key_problem(key: Any) -> str | None:
    if type(key) not in SCALARS:
        return (f"the key {shown(key)} is a {type(key).__name__}; YAML keys here must be strings, numbers, booleans "
                "or null")
    return _scalar_problem(key)


def unwritable(data: Any, file: str) -> list[Problem]:
    """Where `data` holds something YAML cannot (or the reader would not) take: by key. Iterative, and it stops
    at MAX_DEPTH levels, so a deep value cannot exhaust the stack here or in the dumper (values shared or
    containing themselves become aliases, which the reader measures)."""
    problems: list[Problem] = []
    stack: list[tuple[Any, tuple]] = [(data, ())]
    seen: set[int] = set()  # a value held in several places is looked at once (the dumper writes an alias)
    while stack:
        value, path = stack.pop()
        if type(value) in (dict, list, tuple):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if len(path) >= MAX_DEPTH:
                problems.append(Problem(f"nested more than {MAX_DEPTH} levels deep; a model YAML needs far fewer",
                                        key=format_key(path), file=file))
                continue
            if type(value) is dict:
                for key, item in value.items():
                    bad = _key_problem(key)
                    if bad:
                        problems.append(Problem(bad, key=format_key(path), file=file))
                    else:
                        stack.append((item, path + (str(key),)))
            else:
                stack.extend((item, path + (i,)) for i, item in enumerate(value))
            continue
        bad = _scalar_problem(value)
        if bad:
            problems.append(Problem(bad, key=format_key(path), file=file))
    return sorted(problems, key=lambda p: p.key)


def yaml_text(data: Any, file: str, header: str = "") -> str:
    """`data` as YAML text, `header` first; SpecError (every problem, by key and file) when it cannot be
    written or the reader would refuse what is written."""
    problems = unwritable(data, file)
    if problems:
        raise SpecError(problems)
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    check_yaml_text(text, file)
    return text
