"""The ``tracin-tasks`` command line.

    tracin-tasks audit --run-id RUN_ID [--tracking-uri URI] [--output DIR] [--task-runner threads|dask|tcp://…]
    tracin-tasks demo [--workdir DIR]
    tracin-tasks relabel list|claim|decide|release|apply|flush --queue URI ...

The audit's options are built from the fields of its settings
(:mod:`tracin_tasks.orchestration.settings`, :class:`tracin_tasks.core.flagging.FlagPolicy`).
Every tool keeps its state where the user says and stays offline: unless already set,
``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``DO_NOT_TRACK=1``, ``MLFLOW_DISABLE_TELEMETRY=true``
and ``GX_ANALYTICS_ENABLED=False`` are set before Prefect or MLflow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tracin_tasks._text import for_terminal

_QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tracin_tasks",
    # a fresh ephemeral server migrates its database first; on a busy 2-core machine that is slow
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def _quiet_env(state_dir: str | None = None) -> None:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if state_dir:
        os.environ.setdefault("PREFECT_HOME", os.path.join(state_dir, "prefect"))
        os.environ.setdefault("TRACIN_TASKS_CACHE_DIR", os.path.join(state_dir, "cache"))
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(state_dir, "matplotlib"))
        os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", os.path.join(state_dir, "dask"))
    # Prefect's temporary server waits out its whole start-up timeout, silently, when the
    # parent folder of its PREFECT_HOME is missing: create it first.
    if os.environ.get("PREFECT_HOME"):
        os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)


def build_parser() -> argparse.ArgumentParser:
    from tracin_tasks.cli.audit import add_audit_command
    from tracin_tasks.cli.demo import add_demo_command
    from tracin_tasks.cli.relabel import add_relabel_commands

    parser = argparse.ArgumentParser(
        prog="tracin-tasks",
        description="Find likely mislabeled training rows of an MLflow training run with TracIn self-influence.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_audit_command(sub)
    add_demo_command(sub)
    add_relabel_commands(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that an unknown option is refused by the (sub)command's own parser, with
    the closest option it has (Python 3.11's argparse suggests none)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    target, pending = parser, [parser]
    while pending:  # down to the subcommand that was named
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
                target = action.choices[getattr(args, action.dest)]
                pending.append(target)
    known = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    hints = [f"{typed}: did you mean {close[0]}?" for typed in (u.split("=", 1)[0] for u in unknown)
             if typed.startswith("--") and (close := difflib.get_close_matches(typed, known, n=1))]
    target.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))
    raise AssertionError("unreachable: ArgumentParser.error exits")


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    if args.command == "demo":
        from tracin_tasks.cli.demo import run_demo

        _quiet_env(str(Path(args.workdir).resolve() / "state"))
        return run_demo(args)
    _quiet_env()
    from tracin_tasks.exceptions import TracInError

    try:
        if args.command == "relabel":
            from tracin_tasks.cli.relabel import run_relabel

            return run_relabel(args)
        from tracin_tasks.cli.audit import print_summary, run_audit

        summary = run_audit(args)
    except TracInError as exc:
        # one line: a message may quote row ids or values from the data
        print(f"error: {for_terminal(exc, 4000)}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
