"""Every command-line option an error message tells the user to pass exists, and a mistyped option
is refused before anything runs, with the option meant named.

The first check is static: it parses the package, collects the strings that make up each raised
error's message (the literals in the ``raise`` expression, and those assigned to the names it uses,
such as a module's ``_HOW_TO_TRUST``), and looks up each ``--option`` they name among the options of
``tracin-tasks audit`` (or, for the relabel and demo commands' own messages, of those commands).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tracin_tasks"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
#: options of other programs that messages quote in a command line of theirs: option -> that command
OTHER_PROGRAMS = {"--host": "prefect server start", "--port": "prefect server start",
                  "--resources": "dask worker", "--nworkers": "dask worker"}
#: modules whose messages advise the relabel or demo commands rather than the audit
COMMAND_OF_MODULE = {"cli/relabel.py": "relabel", "integrations/relabel/": "relabel", "cli/demo.py": "demo"}


def command_options() -> dict[str, set[str]]:
    """command -> its long options (``relabel``: those of every relabel subcommand)."""
    import argparse

    from tracin_tasks.cli import build_parser

    def options(parser: argparse.ArgumentParser) -> set[str]:
        found = set()
        for action in parser._actions:
            found |= {o for o in action.option_strings if o.startswith("--")}
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= options(sub)
        return found

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: options(parser) for name, parser in top.choices.items()}


def message_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of every string literal that goes into a raised error's message."""
    assigned: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    found: list[tuple[int, str]] = []

    def collect(node: ast.AST, line: int, seen: set[str]) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                found.append((line, sub.value))
            elif isinstance(sub, ast.Name) and sub.id in assigned and sub.id not in seen:
                for value in assigned[sub.id]:
                    collect(value, line, seen | {sub.id})

    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            collect(node.exc, node.lineno, set())
    return found


def test_every_option_an_error_message_names_is_an_option_of_the_command():
    commands = command_options()
    assert "--lr-metric" in commands["audit"] and "--default-learning-rate" in commands["audit"]
    checked, wrong = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        command = next((c for prefix, c in COMMAND_OF_MODULE.items() if rel.startswith(prefix)), "audit")
        for line, text in message_strings(ast.parse(path.read_text(encoding="utf-8"))):
            for option in OPTION.findall(text):
                checked += 1
                if option in commands[command] or option in commands["audit"]:
                    continue
                program = OTHER_PROGRAMS.get(option)
                if program and program in text:
                    continue
                wrong.append(f"{rel}:{line}: {option} (not an option of tracin-tasks {command})")
    assert checked > 20, "the scan found almost no options: it no longer sees the messages"
    assert not wrong, "error messages name options that do not exist:\n" + "\n".join(wrong)


def test_the_scan_sees_options_in_messages_built_from_names():
    """The scan reaches a message assembled from a module constant, so it can fail."""
    tree = ast.parse('ADVICE = "pass --no-such-option"\n'
                     'def f():\n'
                     '    raise ValueError("bad. " + ADVICE)\n')
    assert [t for _, t in message_strings(tree) if OPTION.search(t)] == ["pass --no-such-option"]


def test_a_mistyped_option_exits_2_naming_the_option_meant(support, tmp_path):
    """``--lr-metrc``: exit 2 from argparse, the audit's usage and the closest option; nothing runs (no
    Prefect server, no MLflow store in the working directory)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = support.start_cli(["audit", "--run-id", "r0", "--lr-metrc", "learning_rate"],
                             support.subprocess_env(tmp_path / "state"), tmp_path / "logs", cwd=cwd)
    assert proc.wait(timeout=120) == 2
    stdout, stderr = support.cli_output(tmp_path / "logs")
    assert "unrecognized arguments: --lr-metrc" in stderr
    assert "usage: tracin-tasks audit" in stderr
    assert "did you mean --lr-metric?" in stderr, stderr
    assert list(cwd.iterdir()) == [], "a refused command line wrote files"
