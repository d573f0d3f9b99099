"""parse_task_runner, check_api_for, make_task_runner, placement: no runner is started."""

from __future__ import annotations

import os

import pytest

from tracin_tasks.exceptions import ConfigurationError
from tracin_tasks.orchestration.runners import check_api_for, make_task_runner, parse_task_runner, placement


@pytest.mark.parametrize(
    "spec,max_workers,kind,address,workers",
    [
        ("threads", None, "threads", None, 1),
        ("threads", 3, "threads", None, 3),
        ("dask", None, "dask-local", None, os.cpu_count() or 1),
        ("dask", 2, "dask-local", None, 2),
        ("tcp://10.0.0.5:8786", None, "dask", "tcp://10.0.0.5:8786", 0),
        ("dask://scheduler.internal:8786", None, "dask", "tcp://scheduler.internal:8786", 0),
        ("ray", None, "ray", None, 0),
        ("ray://head:10001", 4, "ray", "ray://head:10001", 4),
    ],
)
def test_valid_task_runner_strings(spec, max_workers, kind, address, workers):
    choice = parse_task_runner(spec, max_workers)
    assert (choice.kind, choice.address, choice.max_workers, choice.gpu) == (kind, address, workers, False)
    assert choice.multi_process == (kind != "threads")
    assert choice.torch_threads == (1 if kind == "dask-local" else None)
    assert parse_task_runner(spec, max_workers, gpu=True).gpu is True


@pytest.mark.parametrize(
    "spec", ["", "thread", "Threads", "process", "http://host:8786", "dask:/x", "tcp:host", "local", None, 4, ["threads"]]
)
def test_unknown_task_runner_strings_raise(spec):
    with pytest.raises(ConfigurationError, match="task_runner") as info:
        parse_task_runner(spec)
    if isinstance(spec, str) and spec:
        assert "threads" in str(info.value) and "tcp://HOST:PORT" in str(info.value)


@pytest.mark.parametrize("max_workers", [0, -1, True, 1.5, "2"])
def test_max_workers_must_be_a_positive_integer(max_workers):
    with pytest.raises(ConfigurationError, match="max_workers"):
        parse_task_runner("threads", max_workers)


def test_multi_process_runners_need_a_prefect_api_url():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        check_api_for(parse_task_runner("threads"))  # a thread pool shares the flow's own server
        for spec in ("dask", "tcp://127.0.0.1:8786", "ray"):
            with pytest.raises(ConfigurationError) as info:
                check_api_for(parse_task_runner(spec))
            assert "prefect server start" in str(info.value)
            assert "PREFECT_API_URL" in str(info.value)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        check_api_for(parse_task_runner("dask"))
        check_api_for(parse_task_runner("tcp://127.0.0.1:8786"))


def test_make_task_runner_builds_without_starting_anything():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = make_task_runner(parse_task_runner("threads", 3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3

    local = make_task_runner(parse_task_runner("dask", 2, gpu=True))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["threads_per_worker"] == 1
    assert local.cluster_kwargs["resources"] == {"GPU": 1}
    assert "resources" not in make_task_runner(parse_task_runner("dask", 2)).cluster_kwargs

    remote = make_task_runner(parse_task_runner("dask://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"


def test_placement_asks_dask_for_a_gpu_per_cell_only_when_wanted():
    import dask

    with placement(parse_task_runner("tcp://127.0.0.1:1", gpu=True)):
        assert dask.get_annotations().get("resources") == {"GPU": 1}
    with placement(parse_task_runner("dask", 2, gpu=True)):
        assert dask.get_annotations().get("resources") == {"GPU": 1}
    assert "resources" not in dask.get_annotations()
    for choice in (parse_task_runner("tcp://127.0.0.1:1"), parse_task_runner("threads", gpu=True)):
        with placement(choice):
            assert "resources" not in dask.get_annotations()
