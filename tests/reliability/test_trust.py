"""The trust boundary: nothing a training run records may run code or exhaust the auditing machine.

Every payload is logged to a real MLflow store the way an attacker with write access to the
tracking server would, and audited through the real CLI (``tracin_tasks.cli.main``, the audit
flow on the session's Prefect server) in one child process. Each must exit 2 with one ``error:``
line naming the problem, leave no marker file behind (what the payload would create if it ran),
and the child's peak RSS, read by ``wait4`` when it exits, must stay small: the payloads ask for
8 to 40 GB.

Payloads:

* model factories a run names: ``os:system``, ``subprocess:run``, ``builtins:open``,
  ``torch:load`` of a pickle, a trusted module's attribute that leads to ``torch.load``, a module
  whose name only starts like a trusted prefix (importing it would create the marker), a
  ``__dunder__`` walk;
* pickles in every weight format: ``torch.save`` with an object, a plain pickle, torch's legacy
  format, a ``.pt2`` weight stored as a pickle, a pickle-format LoggedModel;
* sizes: ``.pt2`` and ``torch.save`` files declaring a 100000×100000 tensor with no data behind
  it (and a stride-0 view of 4 bytes), a trusted factory asked for ``hidden=2e9``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import _faults_support as support

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from .conftest import ARCH, FACTORY, cli_audit_args  # noqa: E402

#: the child's peak resident memory must stay under this (an audit of a small run, Prefect, MLflow,
#: torch and pandas imported, uses about 0.5-0.7 GiB); every payload asks for 8 GB or more
RSS_BOUND_MIB = 1400
#: an address-space fuse for the child, so that a regression fails the test instead of the machine
ADDRESS_SPACE_FUSE = 16 * 1024**3


class MarkerPayload:
    """Unpickling this opens ``path`` for writing: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class Payload:
    name: str
    run_id: str
    marker: Path
    expect: str  # in the error line
    extra: tuple[str, ...] = ()


# -- crafting files --------------------------------------------------------------------------------
def torch_save_with_object(marker: Path) -> bytes:
    import torch

    from tracin_tasks.examples.digits import build_mlp

    buf = io.BytesIO()
    torch.save({**build_mlp(in_features=4, n_classes=3, hidden=8).state_dict(), "x": MarkerPayload(marker)}, buf)
    return buf.getvalue()


def torch_legacy_with_object(marker: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"x": MarkerPayload(marker)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def pt2_archive(path: Path, weights: dict[str, dict]) -> None:
    """A ``.pt2`` zip with the weight description MLflow's default format writes; each weight is
    ``{"sizes", "strides", "data" (bytes), "use_pickle"}``."""
    config = {"config": {}}
    with zipfile.ZipFile(path, "w") as zf:
        for i, (fqn, w) in enumerate(weights.items()):
            config["config"][fqn] = {
                "path_name": f"weight_{i}", "use_pickle": w.get("use_pickle", False), "is_param": True,
                "tensor_meta": {"dtype": 7, "sizes": [{"as_int": s} for s in w["sizes"]],
                                "strides": [{"as_int": s} for s in w["strides"]], "storage_offset": {"as_int": 0}},
            }
            zf.writestr(f"model/data/weights/weight_{i}", w["data"])
        zf.writestr("model/data/weights/model_weights_config.json", json.dumps(config))


# -- logging them as an attacker would --------------------------------------------------------------
def run_with_factory(store, factory: str, kwargs: dict) -> str:
    run = store.log_run(checkpoints=1, name=f"factory {factory}")
    store.write_json(run.run_id, "tracin/model_factory.json", {"factory": factory, "kwargs": kwargs})
    return run.run_id


def run_with_checkpoint(store, payload: bytes, tmp: Path, filename: str = "state_dict.pt") -> str:
    run = store.log_run(checkpoints=0, name=f"checkpoint {filename}")
    folder = tmp / f"ckpt-{run.run_id}"
    folder.mkdir()
    (folder / filename).write_bytes(payload)
    (folder / "meta.json").write_text(json.dumps({"step": 1, "learning_rate": 0.1}))
    store.client.log_artifacts(run.run_id, str(folder), "checkpoints/step_1")
    store.client.log_metric(run.run_id, "lr", 0.1, step=1)
    return run.run_id


def run_with_logged_model(store, files: dict[str, bytes], tmp: Path) -> str:
    """A run whose only checkpoint is a LoggedModel (step 1) holding ``files`` under ``data/``."""
    from mlflow.entities import LoggedModelOutput

    run = store.log_run(checkpoints=0, name="logged model")
    model = store.client.create_logged_model(store.experiment_id, name="ckpt", source_run_id=run.run_id)
    folder = tmp / f"model-{run.run_id}"
    (folder / "data").mkdir(parents=True)
    for name, data in files.items():
        (folder / "data" / name).write_bytes(data)
    store.client.log_model_artifacts(model.model_id, str(folder))
    store.client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, 1)])
    store.client.log_metric(run.run_id, "lr", 0.1, step=1)
    return run.run_id


def hostile_modules(folder: Path, marker: Path) -> None:
    """``acme/models.py`` (a package an operator trusts) and ``acme_evil.py``, which creates the
    marker as soon as it is imported."""
    (folder / "acme").mkdir(parents=True)
    (folder / "acme" / "__init__.py").write_text("")
    (folder / "acme" / "models.py").write_text("from tracin_tasks.examples.digits import build_mlp  # noqa\n")
    (folder / "acme_evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()

        def build(**kwargs):
            open({str(marker)!r}, "w").close()
    """))


# -- the child process -----------------------------------------------------------------------------
_DRIVER = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    fuse = int(sys.argv[3])  # an address-space limit: a regression fails here instead of exhausting the machine
    resource.setrlimit(resource.RLIMIT_AS, (fuse, fuse))
    from tracin_tasks.cli import main

    results = []
    for name, args in json.load(open(sys.argv[1])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:  # an untyped crash: the test reports it
                code, err = "crash", io.StringIO(f"{type(exc).__name__}: {exc}")
        results.append({"name": name, "code": code, "stderr": err.getvalue(),
                        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        json.dump(results, open(sys.argv[2], "w"))
""")


def run_payloads(payloads: list[Payload], env: dict[str, str], tmp: Path) -> tuple[list[dict], float]:
    """Audit every payload through the CLI in one child; its results and its peak RSS in MiB."""
    plan = [(p.name, [*cli_audit_args(_Run(p.run_id, env["_TRACKING_URI"]), tmp / "out" / p.name), *p.extra])
            for p in payloads]
    (tmp / "plan.json").write_text(json.dumps(plan))
    (tmp / "driver.py").write_text(_DRIVER)
    child_env = {k: v for k, v in env.items() if not k.startswith("_")}
    with open(tmp / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(tmp / "driver.py"), str(tmp / "plan.json"), str(tmp / "results.json"),
                                 str(ADDRESS_SPACE_FUSE)],
                                env=child_env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_tail = (tmp / "child.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == 0, f"the child died ({proc.returncode}):\n{log_tail}"
    return json.loads((tmp / "results.json").read_text()), usage.ru_maxrss / 1024


@dataclass(frozen=True)
class _Run:
    run_id: str
    tracking_uri: str


# -- the test --------------------------------------------------------------------------------------
def test_nothing_a_run_records_runs_code_or_exhausts_memory(api, mlflow_store, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    modules = tmp_path / "modules"
    hostile_modules(modules, markers / "acme_evil")
    pickled = tmp_path / "payload.pkl"
    pickled.write_bytes(pickle.dumps(MarkerPayload(markers / "torch_load")))

    def m(name: str) -> Path:
        return markers / name

    P = Payload
    huge = (100_000, 100_000)
    payloads = [
        # model factories the run names
        P("os.system", run_with_factory(mlflow_store, "os:system", {"command": f"id > {m('os.system')}"}),
          m("os.system"), "module 'os' is not trusted"),
        P("subprocess.run", run_with_factory(mlflow_store, "subprocess:run",
                                             {"args": f"id > {m('subprocess.run')}", "shell": True}),
          m("subprocess.run"), "module 'subprocess' is not trusted"),
        P("builtins.open", run_with_factory(mlflow_store, "builtins:open", {"file": str(m("builtins.open")), "mode": "w"}),
          m("builtins.open"), "module 'builtins' is not trusted"),
        P("torch.load", run_with_factory(mlflow_store, "torch:load", {"f": str(pickled), "weights_only": False}),
          m("torch_load"), "module 'torch' is not trusted"),
        P("trusted module, torch.load through an attribute",
          run_with_factory(mlflow_store, "tracin_tasks.examples.digits:torch.load",
                           {"f": str(pickled), "weights_only": False}),
          m("torch_load"), "defined outside the trusted modules"),
        P("prefix lookalike", run_with_factory(mlflow_store, "acme_evil:build", {}), m("acme_evil"),
          "module 'acme_evil' is not trusted", ("--trust-module", "acme")),
        P("dunder walk", run_with_factory(mlflow_store, "tracin_tasks.examples.digits:build_mlp.__globals__", {}),
          m("dunder"), "is not of the form"),
        # pickles in every weight format
        P("torch.save with an object", run_with_checkpoint(mlflow_store, torch_save_with_object(m("torch.save")), tmp_path),
          m("torch.save"), "holds pickled Python objects"),
        P("plain pickle", run_with_checkpoint(mlflow_store, pickle.dumps(MarkerPayload(m("pickle"))), tmp_path),
          m("pickle"), "holds pickled Python objects"),
        P("torch legacy format", run_with_checkpoint(mlflow_store, torch_legacy_with_object(m("legacy")), tmp_path),
          m("legacy"), "holds pickled Python objects"),
    ]
    archive = tmp_path / "pickled.pt2"
    pt2_archive(archive, {"0.weight": {"sizes": [8, 4], "strides": [4, 1], "use_pickle": True,
                                       "data": pickle.dumps(MarkerPayload(m("pt2")))}})
    payloads += [
        P(".pt2 weight stored as a pickle", run_with_logged_model(mlflow_store, {"model.pt2": archive.read_bytes()}, tmp_path),
          m("pt2"), "is stored as a pickle"),
        P("pickle-format LoggedModel", run_with_logged_model(
            mlflow_store, {"model.pth": torch_save_with_object(m("logged_pickle"))}, tmp_path),
          m("logged_pickle"), "saved in pickle format"),
    ]
    # sizes: declared without the data to back them, or beyond any plausible model
    for name, sizes, strides, data in (("empty payload", huge, (huge[1], 1), b""),
                                       ("stride-0 view", huge, (0, 0), b"\0\0\0\0")):
        pt2 = tmp_path / f"{name}.pt2"
        pt2_archive(pt2, {"0.weight": {"sizes": list(sizes), "strides": list(strides), "data": data}})
        payloads.append(P(f".pt2, {name}", run_with_logged_model(mlflow_store, {"model.pt2": pt2.read_bytes()}, tmp_path),
                          m("never"), "claims more data than it holds"))
        numel = 0 if not data else 1
        saved = support.torch_save_declaring(sizes, strides, numel if data else huge[0] * huge[1], data)
        payloads.append(P(f"torch.save, {name}", run_with_checkpoint(mlflow_store, saved, tmp_path),
                          m("never"), "claims more data than it holds"))
    big = mlflow_store.log_run(checkpoints=1, name="huge factory kwargs")
    mlflow_store.write_json(big.run_id, "tracin/model_factory.json",
                            {"factory": FACTORY, "kwargs": {"in_features": 4, "n_classes": 3, "hidden": 2_000_000_000}})
    payloads.append(P("factory kwargs hidden=2e9", big.run_id, m("never"), "above this audit's ceiling"))

    env = support.child_env(tmp_path / "state", api, _TRACKING_URI=mlflow_store.uri, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(modules), env["PYTHONPATH"]])
    results, peak_mib = run_payloads(payloads, env, tmp_path)
    for r in results:
        print(f"{r['name']}: exit {r['code']}, peak so far {r['maxrss_mib']:.0f} MiB;",
              next((line for line in r["stderr"].splitlines() if line.startswith("error: ")), "")[:160])
    print(f"child peak RSS {peak_mib:.0f} MiB")

    problems = []
    for payload, result in zip(payloads, results):
        errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
        if result["code"] != 2 or len(errors) != 1 or payload.expect not in errors[0]:
            problems.append(f"{payload.name}: exit {result['code']}, error lines {errors or result['stderr'][-600:]}")
    assert not problems, "\n".join(problems)
    assert len(results) == len(payloads)
    assert sorted(p.name for p in markers.iterdir()) == [], "a payload ran"
    assert peak_mib < RSS_BOUND_MIB, f"peak RSS {peak_mib:.0f} MiB: {[(r['name'], round(r['maxrss_mib'])) for r in results]}"
    # nothing an audit would count as a result was left
    for payload in payloads:
        out = tmp_path / "out" / payload.name
        assert not (out / "scores.parquet").exists() and not (out / "report.html").exists(), payload.name


@pytest.mark.parametrize("args, expected", [
    (["--model-kwargs", "{bad"], "model_kwargs is not valid JSON"),
    (["--model-kwargs", "[1, 2]"], "model_kwargs must be a JSON object"),
    (["--trust-module", "acme-evil"], "is not a module prefix"),
    (["--trust-module", "acme.", ], "is not a module prefix"),
    (["--max-parameters", "0"], "max_parameters must be a positive integer"),
])
def test_trust_options_with_a_typo_fail_at_once(args, expected, tmp_path):
    """Refused before Prefect starts or anything is written: exit 2, one line."""
    from .conftest import cli

    code, out, err = cli("audit", "--run-id", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}",
                         "--output", str(tmp_path / "out"), *args)
    assert code == 2 and err.count("error: ") == 1 and expected in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.db").exists()


def test_an_oversized_checkpoint_meta_is_not_read(api, mlflow_store, tmp_path):
    """A checkpoint's meta.json of 2 MiB (the helper writes a few hundred bytes) is refused unread."""
    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    run = mlflow_store.log_run(checkpoints=1, name="oversized meta")
    mlflow_store.write_json(run.run_id, "checkpoints/step_1/meta.json", {"pad": "x" * (2 * 1024 * 1024)})
    source = MlflowCheckpointSource(run.run_id, run.tracking_uri, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigurationError, match="meta.json of run .* is larger than"):
        source.checkpoint_refs()
    assert not list((tmp_path / "cache").rglob("meta.json"))


def test_model_kwargs_from_the_command_line_reach_the_callers_factory(api, mlflow_store, tmp_path):
    """``--model-factory`` with ``--model-kwargs JSON``: the parsed object is the factory's
    arguments. The run's own width audits; another width builds a model the weights do not fit."""
    import json

    from .conftest import cli

    run = mlflow_store.log_run(checkpoints=2, name="caller factory")
    right = cli(*cli_audit_args(run, tmp_path / "right", "--model-factory", FACTORY,
                                "--model-kwargs", json.dumps(ARCH)))
    assert right[0] == 0, right[2][-3000:]
    assert (tmp_path / "right" / "scores.parquet").exists()

    code, _, err = cli(*cli_audit_args(run, tmp_path / "wrong", "--model-factory", FACTORY,
                                       "--model-kwargs", json.dumps({**ARCH, "hidden": ARCH["hidden"] + 1})))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "does not fit" in errors[0], err[-3000:]


def test_an_oversized_spec_is_not_read(api, mlflow_store, tmp_path):
    """A run's model-factory spec of 2 MiB (real ones are a few hundred bytes) is refused unread."""
    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    run = mlflow_store.log_run(checkpoints=1, name="oversized spec")
    mlflow_store.write_json(run.run_id, "tracin/model_factory.json",
                            {"factory": FACTORY, "kwargs": {"pad": "x" * (2 * 1024 * 1024)}})
    source = MlflowCheckpointSource(run.run_id, run.tracking_uri, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigurationError, match="a spec is a small JSON file"):
        source.model_spec()


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf", "1e400"])
def test_a_ceiling_that_is_not_a_finite_number_is_refused(raw, monkeypatch):
    """``TRACIN_MAX_PARAMETERS=inf`` (or NaN) is a typed configuration error, not an OverflowError
    or a ceiling nothing can exceed; so is any other numeric setting from the environment."""
    from tracin_tasks._env import env_number
    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks.integrations.model_factory import max_parameters_from_env

    monkeypatch.setenv("TRACIN_MAX_PARAMETERS", raw)
    with pytest.raises(ConfigurationError, match="TRACIN_MAX_PARAMETERS=.* is not a finite number"):
        max_parameters_from_env()
    monkeypatch.setenv("TRACIN_OUTPUT_LOCK_TIMEOUT", raw)
    with pytest.raises(ConfigurationError, match="is not a finite number"):
        env_number("TRACIN_OUTPUT_LOCK_TIMEOUT", 600.0)
