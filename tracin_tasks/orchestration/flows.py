"""The Prefect flows: audit a run (plan → score cells on the chosen workers → aggregate → report →
publish → relabel), audit an experiment's latest run, send an audit's rows to relabel sinks,
apply reviewers' corrections.

Each reads top-down; the stages are tasks in :mod:`tracin_tasks.orchestration.tasks`, each over a
plain function of its own module (planning, compute, aggregate, reporting, relabel).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow, get_run_logger

from tracin_tasks._uris import redact, uri_secret
from tracin_tasks.exceptions import ConfigurationError, ValidationFailedError
from tracin_tasks.orchestration.aggregate import scores_summary
from tracin_tasks.orchestration.relabel import check_sinks
from tracin_tasks.orchestration.settings import AuditSettings, RelabelOptions, ReportOptions, RunOptions
from tracin_tasks.orchestration.runners import check_api_for, make_task_runner, parse_task_runner
from tracin_tasks.orchestration.sources import apply_mlflow_credentials, prefect_secret
from tracin_tasks.orchestration.tasks import (
    _load_plan,
    aggregate_task,
    plan_audit_task,
    relabel_task,
    report_task,
    score_cells,
)

logger = logging.getLogger(__name__)


@flow(name="audit-training-run")
def audit_training_run(
    run_id: str,
    tracking_uri: str | None = None,
    layers: list[str] | str | None = None,
    batch_size: int = 256,
    shard_size: int = 4096,
    steps: list[int] | str | None = None,
    max_checkpoints: int | None = None,
    loss: str = "cross_entropy",
    task_runner: str = "threads",
    max_workers: int | None = None,
    gpu: bool = False,
    device: str | None = None,
    output_dir: str | None = None,
    results_uri: str | None = None,
    model_factory: str | None = None,
    allow_pickle: bool = False,
    default_learning_rate: float | None = None,
    flag: dict[str, Any] | None = None,
    validate_results: bool = True,
    on_validation_failure: str = "fail",
    extra_expectations: list[dict[str, Any]] | None = None,
    report: bool = True,
    log_to_mlflow: bool = True,
    relabel: list[str] | None = None,
    outbox_dir: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    trusted_modules: list[str] | None = None,
    max_parameters: int | None = None,
    mlflow_secret_block: str | None = None,
    lr_metric: str = "lr",
    artifact_path: str | None = None,
    training_data: str | None = None,
    label_column: str | None = None,
    row_id_column: str | None = None,
) -> dict[str, Any]:
    """Audit one MLflow training run: score every row, flag the suspicious ones, validate, report.

    Args:
        run_id: the MLflow run to audit (logged with ``tracin_tasks.mlflow`` or compatible).
        tracking_uri: where that run lives (default: MLflow's default tracking URI). No password:
            see ``mlflow_secret_block``.
        layers: None for all layers, "last", or module names.
        batch_size: rows per forward/backward pass.
        shard_size: rows per cell; a cell is one checkpoint over one shard.
        steps: checkpoints to use: a list of steps, "every:K", or None for all.
        max_checkpoints: at most this many checkpoints, evenly spaced, the last always kept.
        loss: "cross_entropy" or "mse".
        task_runner: "threads", "dask", "dask://HOST:PORT" / "tcp://HOST:PORT", "ray", "ray://HOST:PORT".
        max_workers: threads, or local Dask workers.
        gpu: ask Dask/Ray for one GPU per cell (workers started with ``--resources GPU=1``).
        device: "cpu", "cuda" or None (each worker uses CUDA when it has it).
        output_dir: where the audit's files go (default ``tracin-audit/<run_id>``). The folder
            shows one finished audit at a time; audits into it take turns.
        results_uri: where finished cells are stored (a folder or fsspec URL every worker can
            reach; default ``<output_dir>/cells``). Re-running the same audit skips finished cells.
        model_factory: ``module:function`` that builds the model, instead of the one the run
            recorded; yours, so trusted.
        allow_pickle: allow checkpoint files that need unpickling (trusted runs only).
        default_learning_rate: the learning rate of checkpoints the run logged none for (e.g. 1.0
            to weight every checkpoint equally); None refuses such a run with the fix.
        flag: the flagging policy as a dict of :class:`tracin_tasks.core.flagging.FlagPolicy`
            fields, e.g. ``{"top_fraction": 0.05, "per_class": true, "budget": 500}``.
        validate_results: run the Great Expectations suite over the result (Data Docs in ``output_dir/gx``).
        on_validation_failure: ``"fail"`` (the flow run fails, after everything is written and
            logged) or ``"warn"`` (a warning; the flow completes).
        extra_expectations: more GX expectations over the per-row table,
            ``[{"type": "expect_...", "kwargs": {...}}]``.
        report: flag, validate and write ``report.html``; False stops after ``scores.parquet``.
        log_to_mlflow: log the report, tables, plots and metrics as a child run of the audited run.
        relabel: relabel sinks to send the flagged rows to, as URIs: ``sqlite:///queue.db``,
            ``postgresql+psycopg://…``, ``labelstudio://host:port?project=…``, ``file:///folder``.
            Delivery is idempotent; a sink that is down keeps the rows in the outbox. The flow
            emits ``tracin.audit.flagged`` either way.
        outbox_dir: where rows for an unreachable sink wait (default ``<output_dir>/outbox``).
        model_kwargs: keyword arguments (a JSON object) for ``model_factory``; without it, they
            override those the run recorded for its factory.
        trusted_modules: module prefixes whose model factories a run may name (added to
            ``TRACIN_TRUSTED_MODULES``); empty by default, so a run's own factory is refused
            until its module is trusted. See ``docs/security.md``.
        max_parameters: ceiling on the model's and each checkpoint's elements, checked before
            anything is allocated (default ``TRACIN_MAX_PARAMETERS`` or 10⁹).
        mlflow_secret_block: name of a Prefect Secret block holding the tracking server's
            password (or ``{"username": ..., "password": ...}``); otherwise MLflow's own
            ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
        lr_metric: the run metric holding the learning rate at each step (``lr``; a Hugging Face
            Trainer run logs ``learning_rate`` and its checkpoints carry their own rates).
        artifact_path: look for checkpoint files only under this artifact folder of the run.
        training_data: the training rows when the run did not log them: a parquet file or a Hugging
            Face ``datasets`` folder (``save_to_disk``), at a path every worker can read.
        label_column: the column holding each row's class label (default: what the run recorded,
            else ``label``).
        row_id_column: the column holding each row's stable id (default: what the run recorded, else
            ``row_id``; without one, rows are numbered by position and the report says so).

    Returns:
        A summary: audit key, cell counts, paths of the outputs.
    """
    from tracin_tasks.integrations.model_factory import FactoryTrust
    from tracin_tasks.orchestration.outputs import OutputFolder

    log = get_run_logger()
    _forget_secrets(tracking_uri=tracking_uri, relabel=relabel)
    settings = AuditSettings(
        run_id=run_id, tracking_uri=tracking_uri, layers=layers, loss=loss, batch_size=batch_size,
        shard_size=shard_size, steps=steps, max_checkpoints=max_checkpoints, device=device,
        model_factory=model_factory, allow_pickle=allow_pickle, default_learning_rate=default_learning_rate,
        model_kwargs=model_kwargs, max_parameters=max_parameters, mlflow_secret_block=mlflow_secret_block,
        lr_metric=lr_metric, artifact_path=artifact_path, training_data=training_data, label_column=label_column,
        row_id_column=row_id_column,
        # resolved here, with this process's TRACIN_TRUSTED_MODULES: every worker applies the same policy
        trusted_modules=FactoryTrust.from_settings(trusted_modules).modules,
    )
    run = RunOptions(task_runner, max_workers, gpu, output_dir, results_uri).resolved(run_id)
    reporting = ReportOptions(report, validate_results, on_validation_failure, extra_expectations, log_to_mlflow,
                              flag)
    relabeling = RelabelOptions(tuple(relabel or ()), outbox_dir)
    choice = parse_task_runner(run.task_runner, run.max_workers, run.gpu)
    check_api_for(choice)
    output_dir, results_uri, sinks = run.output_dir, run.results_uri, list(relabeling.relabel)
    outbox_dir = os.path.abspath(relabeling.outbox_dir or os.path.join(output_dir, "outbox"))
    apply_mlflow_credentials(settings.mlflow_secret_block)
    output = OutputFolder(output_dir)
    with output.lock(on_wait=log.info):
        planned = plan_audit_task(settings.to_dict(), results_uri)
        for warning in planned["warnings"]:
            log.warning(warning)
        key = planned["audit_key"]
        counts = score_cells.with_options(
            task_runner=make_task_runner(choice), name=f"tracin-score-cells ({choice.kind})"
        )(results_uri, key, planned["cells"], run.task_runner, run.max_workers, run.gpu, settings.to_dict())
        version = output.new_version(key)
        try:
            aggregate_task(results_uri, key, version)
            reported = report_task(results_uri, key, version, reporting.flag, reporting.validate_results,
                                   reporting.extra_expectations, reporting.log_to_mlflow,
                                   output_dir) if reporting.report else None
            output.publish(version, {"audit_key": key, "run_id": run_id, "settings_hash": settings.config_hash(),
                                     "mlflow_run_id": ((reported and reported.mlflow_run) or {}).get("run_id")})
        except BaseException:
            output.discard(version)  # the folder keeps showing the previous audit
            raise
        # published: from here on, the audit's files are read through the output folder's stable names
        scores_path = os.path.join(output_dir, "scores.parquet")
        summary = scores_summary(scores_path)
        log.info("audited run %s: %d rows; %d cells computed, %d reused; scores in %s",
                 run_id, summary["rows"], counts["computed"], counts["skipped"], scores_path)
        result: dict[str, Any] = {"run_id": run_id, "audit_key": key, "output_dir": output_dir,
                                  "results_uri": results_uri, "scores": scores_path, "warnings": planned["warnings"],
                                  "flagged": None, **counts, **summary}
        if reported is None:
            return result
        shown = reported.to_dict()
        shown["files"] = {name: os.path.join(output_dir, name) for name in reported.files}
        if reported.data_docs:
            shown["data_docs"] = os.path.join(output_dir, os.path.relpath(reported.data_docs, version))
            shown["validation"]["data_docs"] = shown["data_docs"]
        result.update({k: v for k, v in shown.items() if k != "summary"}, flagged=reported.summary["flagged"])
        log.info("flagged %d of %d rows (%s); report: %s", reported.summary["flagged"], summary["rows"],
                 reported.summary["policy"], shown["files"]["report.html"])
        validation = reported.validation
        if validation is not None and not validation.success:
            message = (f"Great Expectations validation of the audit of run {run_id} failed: "
                       f"{', '.join(validation.failed_names())}. See {shown['files']['report.html']} and the Data "
                       f"Docs at {shown['data_docs']}.")
            if reporting.on_validation_failure == "fail":
                # nothing goes to the relabel sinks from an audit whose result did not validate
                raise ValidationFailedError(message)
            log.warning(message)
        audit_run = reported.mlflow_run["run_id"] if reported.mlflow_run else None
        result["relabel"] = relabel_task(results_uri, key, output_dir, sinks, outbox_dir, audit_run, summary["rows"])
    return result


def _forget_secrets(**parameters: Any) -> None:
    """Parameters that carry a password (a URI, or a list of them): replace them in this flow run's
    stored parameters with redacted copies (best effort: Prefect stored them before the flow could
    refuse them), then let the checks that follow refuse them."""
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    def redacted(value: Any) -> Any:
        if isinstance(value, list):
            return [redacted(v) for v in value]
        return redact(value) if isinstance(value, str) and uri_secret(value) else value

    leaking = {k: redacted(v) for k, v in parameters.items() if redacted(v) != v}
    if not leaking:
        return
    try:
        flow_run = get_run_context().flow_run
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, parameters={**(flow_run.parameters or {}), **leaking})
    except Exception as exc:  # noqa: BLE001 - refusing the setting matters more than redacting the record
        logger.warning("could not redact the parameters %s of this flow run: %s", sorted(leaking), type(exc).__name__)


def find_latest_auditable_run(experiment_name: str, tracking_uri: str | None = None,
                              tagged_only: bool = True) -> str:
    """The most recently finished run of an experiment that logged checkpoints for an audit.

    ``tagged_only``: only runs that ``tracin_tasks.mlflow.log_checkpoint`` tagged; False takes the
    latest finished run whatever wrote it (Hugging Face Trainer, Lightning, plain MLflow logging).
    """
    import mlflow

    from tracin_tasks.exceptions import NoCheckpointsError, RunNotFoundError
    from tracin_tasks.integrations.mlflow.logging import AUDITABLE_TAG

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise RunNotFoundError(f"MLflow has no experiment named {experiment_name!r}; check the name and tracking URI.")
    wanted = "attributes.status = 'FINISHED'"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{AUDITABLE_TAG}` = 'true' and {wanted}" if tagged_only else wanted,
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        if tagged_only:
            raise NoCheckpointsError(
                f"Experiment {experiment_name!r} has no finished run with checkpoints logged by "
                "tracin_tasks.mlflow.log_checkpoint (tag tracin.checkpoints). For runs written by another "
                "training stack (Hugging Face, Lightning, plain MLflow), set tagged_only=False to audit the "
                "latest finished run."
            )
        raise NoCheckpointsError(f"Experiment {experiment_name!r} has no finished run; nothing to audit.")
    return runs[0].info.run_id


@flow(name="audit-latest-run")
def audit_latest_run(
    experiment_name: str,
    tracking_uri: str | None = None,
    layers: list[str] | str | None = None,
    max_checkpoints: int | None = None,
    task_runner: str = "threads",
    max_workers: int | None = None,
    gpu: bool = False,
    output_root: str = "tracin-audit",
    results_uri: str | None = None,
    relabel: list[str] | None = None,
    trusted_modules: list[str] | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    max_parameters: int | None = None,
    mlflow_secret_block: str | None = None,
    lr_metric: str = "lr",
    training_data: str | None = None,
    label_column: str | None = None,
    row_id_column: str | None = None,
    tagged_only: bool = True,
    default_learning_rate: float | None = None,
    artifact_path: str | None = None,
) -> dict[str, Any]:
    """Audit the latest finished run of an experiment (for a nightly schedule).

    The latest run that ``tracin_tasks.mlflow.log_checkpoint`` tagged; with ``tagged_only=False``,
    the latest finished run whatever wrote it (docs/runs.md).

    Each audited run gets ``<output_root>/<run_id>``; re-auditing a run that was already audited
    with the same settings reuses every stored cell. Flagged rows go to the ``relabel`` sinks;
    rows for a sink that is down wait in ``<output_root>/outbox``, shared by every nightly run, so
    the next night delivers them. ``trusted_modules``, ``model_factory``, ``model_kwargs``,
    ``max_parameters``, ``mlflow_secret_block``, ``lr_metric``, ``default_learning_rate``, ``artifact_path``,
    ``training_data``, ``label_column`` and ``row_id_column`` are passed to :func:`audit_training_run`.
    """
    from tracin_tasks._uris import refuse_uri_credentials

    _forget_secrets(tracking_uri=tracking_uri, relabel=relabel)
    refuse_uri_credentials(tracking_uri, "The tracking URI")
    apply_mlflow_credentials(mlflow_secret_block)
    run_id = find_latest_auditable_run(experiment_name, tracking_uri, tagged_only)
    get_run_logger().info("latest finished run of %r is %s", experiment_name, run_id)
    return audit_training_run(
        run_id=run_id, tracking_uri=tracking_uri, layers=layers, max_checkpoints=max_checkpoints,
        task_runner=task_runner, max_workers=max_workers, gpu=gpu,
        output_dir=os.path.join(output_root, run_id), results_uri=results_uri,
        relabel=relabel, outbox_dir=os.path.join(output_root, "outbox"), trusted_modules=trusted_modules,
        model_factory=model_factory, model_kwargs=model_kwargs, max_parameters=max_parameters,
        mlflow_secret_block=mlflow_secret_block, lr_metric=lr_metric, training_data=training_data,
        label_column=label_column, row_id_column=row_id_column, default_learning_rate=default_learning_rate,
        artifact_path=artifact_path,
    )


@flow(name="relabel-flagged")
def relabel_flagged(run_id: str, audit_key: str, output_dir: str, results_uri: str | None = None,
                    sinks: list[str] | None = None, outbox_dir: str | None = None,
                    audit_run_id: str | None = None) -> list[dict[str, Any]]:
    """Send a finished audit's flagged rows to relabel sinks (the target of the ``tracin.audit.flagged``
    automation in ``deployments/prefect.yaml``)."""
    from tracin_tasks.orchestration.relabel import batch_for_audit, push_flagged

    _forget_secrets(sinks=sinks)
    sinks = check_sinks(sinks)
    if not sinks:
        raise ConfigurationError("relabel-flagged needs at least one sink URI in `sinks`.")
    results_uri = results_uri or os.path.join(output_dir, "cells")
    plan = _load_plan(results_uri, audit_key)
    if plan.settings.run_id != run_id:
        raise ConfigurationError(f"Audit {audit_key} is of run {plan.settings.run_id}, not {run_id}.")
    batch = batch_for_audit(plan, output_dir, audit_run_id)
    outcomes = push_flagged(batch, sinks, outbox_dir or os.path.join(output_dir, "outbox"))
    for o in outcomes:
        get_run_logger().info("%s: %s", o["sink"], o["status"])
    return outcomes


@flow(name="apply-relabels")
def apply_relabels(run_id: str, queue: str, tracking_uri: str | None = None, output_dir: str | None = None,
                   log_to_mlflow: bool = True, mlflow_secret_block: str | None = None) -> dict[str, Any]:
    """Write the corrected training data of a run from the reviewers' decisions in ``queue``.

    The new version is logged to MLflow as a child run of ``run_id`` (see
    :mod:`tracin_tasks.integrations.relabel.corrections`). Neither URI may carry a password:
    ``mlflow_secret_block`` names a Prefect Secret block with the tracking server's password, and
    PostgreSQL reads its own from ``PGPASSWORD`` or ``~/.pgpass``.
    """
    from tracin_tasks._uris import refuse_uri_credentials
    from tracin_tasks.integrations.relabel.corrections import apply_from_sink

    _forget_secrets(tracking_uri=tracking_uri, queue=queue)
    refuse_uri_credentials(tracking_uri, "The tracking URI")
    check_sinks(queue)
    apply_mlflow_credentials(mlflow_secret_block)
    result = apply_from_sink(run_id, queue, tracking_uri=tracking_uri, output_dir=output_dir,
                             log_to_mlflow=log_to_mlflow, secrets=prefect_secret)
    get_run_logger().info(
        "run %s: %d labels corrected, %d confirmed, %d skipped; corrected data in %s (MLflow run %s)",
        run_id, result["changed"], result["confirmed"], result["skipped"], result["files"]["training_data.parquet"],
        result["relabel_run_id"],
    )
    return result
