"""A run's training data: from the spec :mod:`tracin_tasks.mlflow` logs, or the run's dataset input.

The spec (``tracin/training_data.json``) names the parquet artifact, the label, row-id and feature
columns, the input shape and a fingerprint; the data is cached under that fingerprint, so data
re-logged to fix it is fetched again.

Without a spec, the run's training dataset input, logged MLflow's way
(``mlflow.log_input(mlflow.data.from_pandas(df, source=..., targets="label"), context="training")``),
is used when its source is a parquet artifact of the run; it is read afresh every time. What MLflow
records there, checked on MLflow 3.17.2:

* **no targets**: a dataset record holds its name, digest, source, source type, schema and profile
  (``PandasDataset.to_dict``); ``targets=`` is not among them. The label column is therefore
  ``--label-column``, else a ``targets`` name in the record's profile where a writer put one, else
  ``label``, else ``labels`` (:mod:`tracin_tasks.integrations.training_data` has the column rules).
* **reused records**: within an experiment MLflow keeps one record per dataset name and digest; a
  run that logs rows another run logged first gets that run's record, whose source is the *other*
  run's artifact. The audit reads the artifact at the same path in *this* run (checked against the
  record's digest) and, when this run has none, says what to do.
* **sources outside the run** (a local file, an HTTP or S3 URL, a Hugging Face Hub dataset, code)
  are not read: a run is untrusted input, and the file it names could be any file or URL the
  audit's machine reaches. The message says to pass the file with ``--training-data PATH``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any
from urllib.parse import unquote

from tracin_tasks._uris import redact
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import CheckpointError, TrainingDataError
from tracin_tasks.integrations.mlflow.cache import RunCache, read_small_json, safe_relpath
from tracin_tasks.integrations.mlflow.logging import DATA_SPEC
from tracin_tasks.integrations.training_data import table_from_arrow

logger = logging.getLogger(__name__)

#: a run artifact in a dataset source: ``…/<experiment>/<run id>/artifacts/<path>`` (local paths, file:,
#: s3:, and the HTTP URLs a tracking server serves artifacts from all end this way)
_RUN_ARTIFACT = re.compile(r"/(?P<run>[0-9a-f]{32})/artifacts/(?P<path>[^?#]+)$")
NO_TARGETS = (" (MLflow does not record a dataset's targets= column: a dataset record keeps its name, digest, "
              "source, schema and profile only)")
LOG_ADVICE = ("Log it with tracin_tasks.mlflow.log_training_data(df, label_column=..., row_id_column=...), "
              "or pass the rows the model was trained on: --training-data PATH (a parquet file or a Hugging Face "
              "datasets folder; training_data= in Python).")


def read_training_table(cache: RunCache, run: Any, label_column: str | None = None,
                        row_id_column: str | None = None) -> TrainingTable:
    """The training data of ``run`` (an MLflow ``Run``), validated; ``label_column`` and ``row_id_column``
    override what the run recorded."""
    run_id = cache.run_id
    try:
        spec = read_small_json(cache, DATA_SPEC)
    except CheckpointError:
        return _from_dataset_input(cache, run, label_column, row_id_column)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON: said below
        spec = exc
    if not _is_spec(spec):
        raise TrainingDataError(
            f"{DATA_SPEC} of run {run_id} is not a JSON object naming the data file ('artifact_path') and "
            "its columns. Re-log the data with tracin_tasks.mlflow.log_training_data(df, ...)."
        )
    version = spec.get("fingerprint")
    version = version if isinstance(version, str) and re.fullmatch(r"[0-9a-f]{8,64}", version) else None
    arrow = _read_parquet_artifact(cache, spec["artifact_path"], version,
                                   "Re-log it with tracin_tasks.mlflow.log_training_data(df, ...).")
    return table_from_arrow(
        arrow, location=f"runs:/{run_id}/{spec['artifact_path']}", form="run artifact",
        label_column=label_column, row_id_column=row_id_column,
        recorded_label=spec.get("label_column"), recorded_row_id=spec.get("row_id_column"),
        feature_columns=spec.get("feature_columns"), input_shape=spec.get("input_shape"),
    )


def _is_spec(spec: Any) -> bool:
    """The spec's fields have the types log_training_data writes (it comes from the run: untrusted)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("artifact_path"), str):
        return False
    names = [spec.get("label_column"), spec.get("row_id_column")]
    features, shape = spec.get("feature_columns"), spec.get("input_shape")
    return (all(n is None or isinstance(n, str) for n in names)
            and (features is None or (isinstance(features, list) and all(isinstance(c, str) for c in features)))
            and (shape is None or (isinstance(shape, list) and all(type(d) is int and d > 0 for d in shape))))


def _read_parquet_artifact(cache: RunCache, artifact_path: str, version: str | None, advice: str) -> Any:
    """A parquet artifact of the run as a ``pyarrow.Table`` (cached under ``version``, else read afresh)."""
    import pyarrow.parquet as pq

    run_id = cache.run_id
    try:
        with contextlib.ExitStack() as stack:
            try:
                local = (cache.download(artifact_path, version=version) if version
                         else stack.enter_context(cache.fresh(artifact_path)))
            except CheckpointError as exc:
                raise TrainingDataError(
                    f"The training data of run {run_id} ({artifact_path}) cannot be downloaded: {exc}. {advice}"
                ) from exc
            return pq.read_table(local)
    except TrainingDataError:
        raise
    except Exception as exc:
        raise TrainingDataError(
            f"The training data of run {run_id} ({artifact_path}) is not a readable parquet file: {exc}. {advice}"
        ) from exc


# -- MLflow's own dataset inputs ------------------------------------------------------------------
def _training_inputs(run: Any) -> list[Any]:
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return [di for di in inputs if {t.key: t.value for t in di.tags}.get("mlflow.data.context") in (None, "training")]


def _source_location(dataset: Any) -> str | None:
    try:
        source = json.loads(dataset.source)
    except (TypeError, ValueError):
        return None
    location = (source.get("uri") or source.get("url") or source.get("path")) if isinstance(source, dict) else None
    return location if isinstance(location, str) else None


def _recorded_targets(dataset: Any) -> str | None:
    """A ``targets`` name in the record's profile. MLflow 3.17 writes none (``PandasDataset.to_dict`` has no
    targets); a record logged through ``MlflowClient.log_inputs`` with its own profile may carry one."""
    try:
        profile = json.loads(dataset.profile) if dataset.profile else None
    except (TypeError, ValueError):
        return None
    targets = profile.get("targets") if isinstance(profile, dict) else None
    return targets if isinstance(targets, str) and targets else None


def _from_dataset_input(cache: RunCache, run: Any, label_column: str | None,
                        row_id_column: str | None) -> TrainingTable:
    run_id = cache.run_id
    inputs = _training_inputs(run)
    if not inputs:
        raise TrainingDataError(
            f"Run {run_id} has no training data an audit can read: no {DATA_SPEC} and no training dataset "
            f"input. {LOG_ADVICE}"
        )
    refused = []
    for di in inputs:
        dataset = di.dataset
        location = _source_location(dataset)
        shown = redact(location or str(dataset.source))[:300]
        if location is None or not (m := _RUN_ARTIFACT.search(location)):
            refused.append(f"{dataset.name!r} comes from {dataset.source_type} source {shown}, outside the run")
            continue
        rel = unquote(m.group("path")) if dataset.source_type == "http" else m.group("path")
        if not rel.endswith(".parquet"):
            refused.append(f"{dataset.name!r} is the run artifact {rel}, not a parquet file")
            continue
        return _read_dataset_input(cache, dataset, safe_relpath(rel), m.group("run"), label_column, row_id_column)
    raise TrainingDataError(
        f"Run {run_id} has no training data an audit can read: no {DATA_SPEC}, and its training dataset "
        f"input{'s' if len(refused) > 1 else ''} {'; '.join(refused)}. An audit reads only the run's own "
        "parquet artifacts (a run is untrusted input: the source it names could be any file or URL this machine "
        f"reaches). If that file holds the rows the model was trained on, pass it: --training-data PATH (a parquet "
        "file or a Hugging Face datasets folder; training_data= in Python)."
    )


def _read_dataset_input(cache: RunCache, dataset: Any, rel: str, source_run: str, label_column: str | None,
                        row_id_column: str | None) -> TrainingTable:
    run_id = cache.run_id
    notes: tuple[str, ...] = ()
    if source_run != run_id:
        _require_own_copy(cache, dataset, rel, source_run)
        notes = (f"MLflow reused the dataset record {dataset.name!r} of run {source_run} (same name and digest); "
                 f"read this run's own artifact {rel}",)
        logger.info("Run %s: %s.", run_id, notes[0])
    arrow = _read_parquet_artifact(cache, rel, None, LOG_ADVICE)
    if source_run != run_id:
        _check_digest(arrow, dataset, rel, run_id)
    return table_from_arrow(
        arrow, location=f"runs:/{run_id}/{rel}", form="run artifact, MLflow dataset input",
        label_column=label_column, row_id_column=row_id_column, recorded_label=_recorded_targets(dataset),
        notes=notes, label_advice=NO_TARGETS,
    )


def _require_own_copy(cache: RunCache, dataset: Any, rel: str, source_run: str) -> None:
    run_id, client = cache.run_id, cache.client
    folder = rel.rsplit("/", 1)[0] if "/" in rel else None
    listed = client.call("list_artifacts", lambda: client.mlflow.list_artifacts(run_id, folder))
    if any(f.path == rel and not f.is_dir for f in listed):
        return
    raise TrainingDataError(
        f"The training dataset input {dataset.name!r} of run {run_id} is a record MLflow reused: its source is "
        f"run {source_run}'s artifact {rel} (MLflow keeps one record per dataset name and digest in an "
        f"experiment, with the source of the run that logged it first), and run {run_id} has no artifact {rel} "
        f"of its own. Log the rows as this run's artifact {rel}, or pass them: download the other run's copy "
        f"(mlflow artifacts download -r {source_run} -a {rel}) and give it as --training-data PATH."
    )


def _check_digest(arrow: Any, dataset: Any, rel: str, run_id: str) -> None:
    """This run's copy should hold the rows the reused record describes; say so in the log when it does not."""
    from mlflow.data.digest_utils import compute_pandas_digest

    try:
        digest = compute_pandas_digest(arrow.to_pandas())
    except Exception:  # noqa: BLE001  (a digest that cannot be computed is no reason to refuse the rows)
        return
    if digest != dataset.digest:
        logger.warning(
            "Run %s: its artifact %s has MLflow digest %s, but the dataset record %r it logged has %s: the file "
            "may not hold the rows the run logged as its input. The audit reads the file; pass --training-data "
            "PATH to audit other rows.", run_id, rel, digest, dataset.name, dataset.digest)
