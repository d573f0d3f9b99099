"""Choose where the audit's cells run, from a JSON-friendly string.

* ``"threads"``: a thread pool in the flow's process (default; one cell at a time unless
  ``max_workers`` says otherwise, since torch already uses every core inside a cell);
* ``"dask"``: a Dask ``LocalCluster`` of ``max_workers`` single-threaded worker processes;
* ``"dask://HOST:PORT"`` or ``"tcp://HOST:PORT"``: an existing Dask cluster. With ``gpu=True``
  each cell asks for one unit of the workers' ``GPU`` resource (workers started with
  ``--resources GPU=1`` take one cell at a time and use their GPU);
* ``"ray"`` or ``"ray://HOST:PORT"``: a Ray cluster through prefect-ray (optional extra).

Processes other than the flow's own must reach a Prefect API server: with Prefect's ephemeral
mode each worker process would start its own. :func:`check_api_for` says so up front.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from tracin_tasks.exceptions import ConfigurationError, require_extra


@dataclass(frozen=True)
class RunnerChoice:
    kind: str  # threads | dask-local | dask | ray
    address: str | None
    max_workers: int
    gpu: bool

    @property
    def multi_process(self) -> bool:
        return self.kind != "threads"

    @property
    def torch_threads(self) -> int | None:
        """Threads torch may use inside one cell (None: leave torch's default)."""
        return 1 if self.kind == "dask-local" else None


def parse_task_runner(spec: str, max_workers: int | None = None, gpu: bool = False) -> RunnerChoice:
    """Validate a ``task_runner`` string."""
    if not isinstance(spec, str) or not spec:
        raise ConfigurationError(f"task_runner must be a string such as 'threads', got {spec!r}.")
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1):
        raise ConfigurationError(f"max_workers must be a positive integer, got {max_workers!r}.")
    if spec == "threads":
        return RunnerChoice("threads", None, max_workers or 1, gpu)
    if spec == "dask":
        return RunnerChoice("dask-local", None, max_workers or (os.cpu_count() or 1), gpu)
    if spec.startswith(("dask://", "tcp://")):
        address = "tcp://" + spec.split("://", 1)[1]
        return RunnerChoice("dask", address, max_workers or 0, gpu)
    if spec == "ray" or spec.startswith("ray://"):
        return RunnerChoice("ray", spec if spec.startswith("ray://") else None, max_workers or 0, gpu)
    raise ConfigurationError(
        f"Unknown task_runner {spec!r}; expected 'threads', 'dask', 'dask://HOST:PORT', "
        "'tcp://HOST:PORT', 'ray' or 'ray://HOST:PORT'."
    )


def check_api_for(choice: RunnerChoice) -> None:
    """Refuse multi-process runs on Prefect's ephemeral server, saying what to do instead."""
    if not choice.multi_process:
        return
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigurationError(
            f"task_runner for a {choice.kind} run needs a Prefect API server that every worker "
            "process can reach; without PREFECT_API_URL each process would start its own temporary "
            "server. Start one with `prefect server start --host 127.0.0.1 --port 4200` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (here and on every worker), or use "
            "task_runner='threads'."
        )


def make_task_runner(choice: RunnerChoice) -> Any:
    """Build the Prefect task runner for a :class:`RunnerChoice`."""
    if choice.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=choice.max_workers)
    if choice.kind in ("dask-local", "dask"):
        prefect_dask = require_extra("prefect_dask", "dask")
        if choice.kind == "dask":
            return prefect_dask.DaskTaskRunner(address=choice.address)
        kwargs: dict[str, Any] = {
            "n_workers": choice.max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
        if choice.gpu:
            kwargs["resources"] = {"GPU": 1}
        return prefect_dask.DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
    prefect_ray = require_extra("prefect_ray", "ray")
    return prefect_ray.RayTaskRunner(address=choice.address) if choice.address else prefect_ray.RayTaskRunner()


def placement(choice: RunnerChoice):
    """Context manager under which cells are submitted: asks for a GPU per cell when wanted."""
    if not choice.gpu:
        return contextlib.nullcontext()
    if choice.kind in ("dask-local", "dask"):
        import dask

        return dask.annotate(resources={"GPU": 1})
    if choice.kind == "ray":
        from prefect_ray.context import remote_options

        return remote_options(num_gpus=1)
    return contextlib.nullcontext()
