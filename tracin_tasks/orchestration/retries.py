"""Which failed tasks are worth another try."""

from __future__ import annotations

from typing import Any

from tracin_tasks.exceptions import TracInError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task unless it failed on bad input.

    A :class:`TracInError` that is not also an ``OSError``/``ConnectionError`` (bad data,
    settings, checkpoints, labels, non-finite gradients) fails the same way every time, so
    retrying only delays the error. Anything else (a lost worker, the tracking server or the
    results store not answering) goes on to the task's retry policy.
    """
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - what the task raised, whatever it is
            exc = raised
    if isinstance(exc, TracInError) and not isinstance(exc, (OSError, ConnectionError)):
        return False
    return True
