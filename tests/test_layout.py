"""framework/ and stages/ never name a model family (model specifics live in models/ and pipelines_yaml/), and
their modules import each other in one direction: no loops, counting imports inside functions."""
import ast
import re

from conftest import REPO


def test_framework_names_no_model_family():
    families = [p.name for p in (REPO / "models").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert families
    pattern = re.compile(r"\b(" + "|".join(families) + r")\b", re.IGNORECASE)
    offenders = [f"{path.relative_to(REPO)}:{i}: {line.strip()}"
                 for folder in ("framework", "stages") for path in sorted((REPO / folder).rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


PACKAGES = {"framework": "diffstage", "stages": "diffstage.stages"}


def _module_files() -> dict[str, object]:
    out = {}
    for folder, prefix in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            out[".".join([prefix] + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return out


def _imports(name: str, path, modules) -> set[str]:
    """The project modules `path` imports, at the top or inside a function (`from . import x`: the module x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{source}.{a.name}" for a in node.names} & set(modules)
            found |= submodules if len(submodules) == len(node.names) else submodules | ({source} & set(modules))
    return found - {name}


def test_no_import_loops():
    modules = _module_files()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    loops = []
    for start in sorted(graph):  # a path from a module's imports back to itself is a loop
        seen, stack = set(), [(start, (start,))]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    loops.append(" -> ".join(trail + (start,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + (nxt,)))
    assert loops == []


ENTRY_POINT = "diffstage"  # the package __init__ hands the standard stages over (stage_catalog.py)


def test_framework_never_imports_the_stages():
    """framework <- stages <- entry point: a framework module importing diffstage.stages would close a loop
    through the package (every diffstage.stages module imports framework modules)."""
    modules = _module_files()
    offenders = sorted(name for name, path in modules.items() if path.is_relative_to(REPO / "framework")
                       and name != ENTRY_POINT
                       and any(m.startswith("diffstage.stages") for m in _imports(name, path, modules)))
    assert offenders == []


MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60


def test_small_rooms():
    """framework/ and stages/: files of at most 300 lines, functions of at most 60, so each can be read whole."""
    too_long = []
    for folder in ("framework", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            if len(text.splitlines()) > MAX_FILE_LINES:
                too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name}() {length} lines")
    assert too_long == []
