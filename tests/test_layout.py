"""The package's layout holds: no import circle between its modules, no module grown past about
400 lines, and the shims of moved modules still import."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tracin_tasks"
MAX_LINES = 450  # "about 400": room for a docstring, not for a second concern


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported (not inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else ():
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - sub.level + 1] + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{a.name}" for a in sub.names}
    return {m for m in found if m == "tracin_tasks" or m.startswith("tracin_tasks.")}


def test_no_import_circle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _top_level_imports(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how re-exports work, not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not (modules[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_grew_past_about_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, long


def test_moved_modules_still_import():
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    assert importlib.import_module("tracin_tasks.integrations.mlflow_source").MlflowCheckpointSource is MlflowCheckpointSource
    assert importlib.import_module("tracin_tasks.mlflow").MlflowCheckpointSource is MlflowCheckpointSource


def test_the_command_line_is_built_before_prefect_is_imported():
    """The CLI sets Prefect's home, analytics and loggers (and the demo its state folder) after
    parsing: building the parser, from the settings' fields, must not import Prefect or MLflow."""
    import subprocess
    import sys

    code = ("import sys; from tracin_tasks.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('prefect', 'mlflow', 'great_expectations') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
