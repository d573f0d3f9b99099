"""Real MLflow training runs for the tests, MLflow's process-wide state, and the core as oracle.

One trainer (:func:`train_digits`: the package's own ``train_digits_run``, MLP, seed 0) serves
every folder; :func:`digits_run` is the session's run (3 epochs, sqlite store under the state
folder), trained once, on the first call or on a thread while a server starts (:class:`Once`).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from .env import STATE, one_torch_thread

T = TypeVar("T")

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


# -- MLflow's process-wide state ------------------------------------------------------------------
def guard_mlflow_globals(mp: pytest.MonkeyPatch) -> None:
    """Clear MLflow's process-wide tracking URI and active experiment (and the variables that set
    them); ``mp``'s undo puts them back."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for name in _MLFLOW_ENV:
        mp.setenv(name, "placeholder")  # records the original value (or its absence) ...
        mp.delenv(name)  # ... and then removes it for the duration
    mp.setattr(tracking_utils, "_tracking_uri", None)
    mp.setattr(fluent, "_active_experiment_id", None)


@contextlib.contextmanager
def mlflow_target(uri: str | None = None) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` (or at nothing) for a block, e.g. while training sets
    its own experiment; every global is put back and any run left active ended afterwards."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        guard_mlflow_globals(mp)
        if uri is not None:
            mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()


# -- training runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsRun:
    """A digits training run (``train_digits_run``, MLP, seed 0, 1,797 rows)."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    epochs: int
    n_rows: int = 1797
    learning_rate: float = 0.05  # train_digits_run's default

    @property
    def uri(self) -> str:
        return self.tracking_uri


def sqlite_store(name: str) -> tuple[str, Path]:
    """(tracking URI, artifact root) of a sqlite store in folder ``name`` of the state folder."""
    root = STATE / name
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", root / "artifacts"


def train_digits(tracking_uri: str, prefix: str, *, epochs: int, artifact_root: Path | None = None) -> DigitsRun:
    """``train_digits_run`` (MLP, seed 0) into a fresh experiment ``PREFIX-<hex>`` of ``tracking_uri``;
    its artifacts under ``artifact_root`` when given (a server keeps them where it was told to)."""
    import mlflow

    from tracin_tasks.examples.train_digits import train_digits_run

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    location = (artifact_root / name).as_uri() if artifact_root is not None else None
    experiment_id = mlflow.MlflowClient(tracking_uri=tracking_uri).create_experiment(name, artifact_location=location)
    # a tiny MLP on 2 shared cores: one thread is several times faster
    with mlflow_target(), one_torch_thread():
        run_id = train_digits_run(tracking_uri=tracking_uri, experiment=name, epochs=epochs, model="mlp", seed=0)
    return DigitsRun(run_id, tracking_uri, experiment_id, epochs)


class Once(Generic[T]):
    """A value computed once per session: on the first :meth:`get`, or on a thread :meth:`start`
    begins (e.g. training while a server boots), which :meth:`get` then waits for. A failure is
    raised by :meth:`get` (the computation is tried again there), in the test that needs the value."""

    def __init__(self, compute: Callable[[], T], name: str = "once"):
        self._compute = compute
        self._name = name
        self._lock = threading.Lock()
        self._done = False
        self._value: T | None = None
        self._thread: threading.Thread | None = None

    def get(self) -> T:
        with self._lock:
            if not self._done:
                self._value = self._compute()
                self._done = True
            return self._value

    def start(self) -> Once[T]:
        if self._thread is None and not self._done:
            self._thread = threading.Thread(target=self._get_quietly, name=self._name, daemon=True)
            self._thread.start()
        return self

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _get_quietly(self) -> None:
        try:
            self.get()
        except Exception:  # noqa: BLE001 - get() raises it again, in the test
            pass


def _train_session_run() -> DigitsRun:
    uri, artifacts = sqlite_store("mlflow")
    return train_digits(uri, "digits", epochs=3, artifact_root=artifacts)


#: the session's digits run (MLP, 3 epochs = 3 checkpoints, seed 0) in a sqlite store
DIGITS = Once(_train_session_run, "train-digits")


def digits_run() -> DigitsRun:
    """The session's digits run, trained on the first call (or waited for, when training started)."""
    return DIGITS.get()


# -- the oracle -----------------------------------------------------------------------------------
def core_scores(run_id: str, tracking_uri: str, batch_size: int = 256, **source_kwargs: Any):
    """(self-influence, training table): TracIn computed by the core directly on the run's own
    checkpoints, no flow involved."""
    from tracin_tasks.core.tracin import TracIn
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    source = MlflowCheckpointSource(run_id, tracking_uri, **source_kwargs)
    table = source.training_table()
    with one_torch_thread():
        scores = TracIn(source.build_model(), source.checkpoints()).self_influence(table.dataset(), batch_size)
    return scores, table


_DIRECT: dict[tuple[str, str, int], tuple] = {}


def direct_scores(run: DigitsRun, batch_size: int = 256):
    """:func:`core_scores` of a digits run (memoised per run and batch size), its own download cache."""
    key = (run.run_id, run.tracking_uri, batch_size)
    if key not in _DIRECT:
        _DIRECT[key] = core_scores(run.run_id, run.tracking_uri, batch_size,
                                   cache_dir=STATE / f"oracle-cache-{uuid.uuid4().hex[:6]}")
    return _DIRECT[key]
