"""Where a run keeps its checkpoints: one reader per layout, tried in order.

A layout finds a run's checkpoints (:class:`CheckpointRef`: step, learning rate, where) and reads
one of them. :func:`find_checkpoints` asks the registered layouts in order and takes the first
that finds any; a plan records each checkpoint's ``kind``, and :func:`read_checkpoint` gives it
to the layout of that kind. A new layout is one class here (or in a module of its own) and one
:func:`register_layout` call:

1. ``helper`` — runs logged with :mod:`tracin_tasks.mlflow`: ``checkpoints/step_<N>/state_dict.pt``
   beside a ``meta.json`` holding the learning rate;
2. ``artifact files`` — any other weight files among the run's artifacts (``torch.save`` files
   ``.pt``/``.pth``, and ``.safetensors``), the step read from the path
   (``mlflow.pytorch.log_state_dict(sd, artifact_path=f"checkpoints/epoch_{N}")`` writes
   ``checkpoints/epoch_N/state_dict.pth``; ``ckpt/epoch_3.pt``, ``checkpoint-300/model.safetensors``...),
   the rate from a metric;
3. ``logged models`` — MLflow 3 LoggedModels linked to the run by step
   (``mlflow.pytorch.log_model(model, name=..., step=N, input_example=...)``). MLflow 3.17 writes
   them in one of two formats: ``pt2`` (the default; ``torch.export``, which is why it needs an
   ``input_example``), read here without unpickling, and ``pickle``
   (``serialization_format="pickle"``), read only with ``allow_pickle``. It has no safetensors
   format; a LoggedModel that holds a ``.safetensors`` file (``mlflow.transformers``, a pyfunc
   model's artifacts) is read from that file. LoggedModels whose ``log_model`` call failed
   (status ``FAILED``: MLflow links them to the run all the same) are left out.

The learning rate of a checkpoint, in every layout, is the rate **in force while the model moved
to that checkpoint**: the rate the optimizer used for the last update before the checkpoint was
saved. The two generic layouts take it from the run's metric (``lr_metric``, ``--lr-metric``) at
the checkpoint's own step, so a training loop logs, at the step it saves, the rate that epoch's
updates used: read before ``scheduler.step()`` (``scheduler.get_last_lr()[0]`` or
``optimizer.param_groups[0]["lr"]``), not after it, which is already the next epoch's rate. An
optimizer or scheduler state saved after the scheduler stepped holds that next rate; a layout
that reads rates from such states undoes the step. Where a layout finds rates logged at other
steps than its checkpoints, it interpolates as the scheduler had it (between the logged points
of a linear schedule, linearly); the generic layouts cannot know the schedule, so they use the
metric at the checkpoint's step only and refuse the checkpoint when there is none (unless a
``default_learning_rate`` is given).

Every file is read by :mod:`tracin_tasks.core.weights` (or :mod:`tracin_tasks.core.safetensors_file`):
declared sizes and shapes are checked before any tensor is made.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tracin_tasks.core.weights import read_pt2_file, read_torch_file
from tracin_tasks.exceptions import CheckpointError, ConfigurationError, UnsafeCheckpointError
from tracin_tasks.integrations.mlflow.learning_rates import learning_rate_at
from tracin_tasks.integrations.mlflow.logging import CHECKPOINT_ROOT

logger = logging.getLogger(__name__)

#: ``torch.save`` files (read with ``weights_only=True``; pickled objects refused without ``allow_pickle``)
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
#: every weight file a layout reads
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)
#: top-level artifact folders that hold no checkpoints (data, specs, ground truth, audits)
_SKIP_DIRS = {"training_data", "tracin", "ground_truth", "audit"}
_STEP_RE = re.compile(r"(?:step|epoch|ckpt|checkpoint|iter|iteration)[_\-=]?(\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"(\d+)")
_HELPER_FOLDER = re.compile(rf"^{re.escape(CHECKPOINT_ROOT)}/step_(\d+)$")
#: checkpoint kinds whose ``location`` is an artifact path of the run (the others name a LoggedModel)
ARTIFACT_KINDS = {"artifact"}


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives, before it is downloaded.

    Attributes:
        step: training step or epoch.
        learning_rate: the learning rate in force at that step.
        lr_source: ``"metric"``, ``"metadata"``, ``"default"`` (the source's
            ``default_learning_rate``, with a warning) or ``"missing"`` (before that check).
        kind: which layout reads it (``"artifact"``: a run artifact file; ``"logged_model"``).
        location: the artifact path inside the run, or the LoggedModel id.
    """

    step: int
    learning_rate: float
    lr_source: str
    kind: str
    location: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


class RunFiles(Protocol):
    """What a layout may ask of the run it reads (see ``MlflowCheckpointSource``)."""

    run_id: str
    artifact_path: str | None
    allow_pickle: bool
    lr_metric: str

    def run(self) -> Any: ...
    def list(self, path: str | None) -> list: ...
    def download(self, artifact_path: str, model_id: str | None = None) -> str: ...
    def lr_history(self) -> dict[int, float]: ...
    def metric_history(self, name: str) -> dict[int, float]: ...
    def list_logged_model(self, model_id: str, path: str | None = "data") -> list: ...
    def logged_model(self, model_id: str) -> Any: ...
    def read_json(self, path: str, model_id: str | None = None, max_bytes: int = ...,
                  listed_size: int | None = None) -> Any: ...


class CheckpointLayout(Protocol):
    """One way a run keeps its checkpoints.

    ``kind`` is recorded in the plan and picks the layout that reads a checkpoint back, so it is
    unique to the layout. A layout whose checkpoints describe their own architecture (a Hugging Face
    ``config.json``) may also offer ``model_spec(run, refs) -> ModelSpec | None``; the caller's
    ``model_factory`` still wins.
    """

    name: str
    kind: str

    def find(self, run: RunFiles) -> list[CheckpointRef]: ...
    def read(self, run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]: ...


def step_of(path: str) -> int | None:
    """The step a checkpoint's path names (``epoch_3``, ``step-300``...; else its last number)."""
    matches = _STEP_RE.findall(path)
    if matches:
        return int(matches[-1])
    ints = _INT_RE.findall(path)
    return int(ints[-1]) if ints else None


def read_weights_file(path: str, allow_pickle: bool, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A downloaded weight file, by its suffix: safetensors, else ``torch.save`` (declarations checked first)."""
    if path.endswith(SAFETENSORS_SUFFIX):
        from tracin_tasks.core.safetensors_file import read_safetensors_file

        return read_safetensors_file(path, **limits)
    return read_torch_file(path, allow_pickle=allow_pickle, **limits)


def _read_artifact(run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
    return read_weights_file(run.download(ref.location), run.allow_pickle, limits)


class HelperFolders:
    """``checkpoints/step_<N>/state_dict.pt`` with ``meta.json``, as :mod:`tracin_tasks.mlflow` logs them."""

    name, kind = "helper", "artifact"

    def find(self, run: RunFiles) -> list[CheckpointRef]:
        if run.artifact_path not in (None, CHECKPOINT_ROOT):
            return []
        folders = [f.path for f in run.list(CHECKPOINT_ROOT) if f.is_dir and _HELPER_FOLDER.match(f.path)]
        if not folders:
            return []
        history = run.lr_history()
        refs = []
        for folder in folders:
            sizes = {f.path: f.file_size for f in run.list(folder) if not f.is_dir}
            files = list(sizes)
            weights = [p for p in files if p.endswith(WEIGHT_SUFFIXES)]
            if not weights:
                continue
            step = int(_HELPER_FOLDER.match(folder).group(1))
            meta = self._meta(run, folder, sizes[f"{folder}/meta.json"]) if f"{folder}/meta.json" in sizes else {}
            lr, lr_source = learning_rate_at(step, history, meta)
            refs.append(CheckpointRef(step, lr, lr_source, self.kind, _pick(run, step, weights), meta))
        return refs

    @staticmethod
    def _meta(run: RunFiles, folder: str, listed_size: int | None) -> dict[str, Any]:
        try:  # cached, like the checkpoint file beside it; a few hundred bytes, capped
            meta = run.read_json(f"{folder}/meta.json", listed_size=listed_size or 0)
        except CheckpointError as exc:
            logger.warning("ignoring %s/meta.json of run %s: %s", folder, run.run_id, exc)
            return {}
        return meta if isinstance(meta, dict) else {}

    read = staticmethod(_read_artifact)


class ArtifactFiles:
    """State_dict files anywhere among the run's artifacts (or under ``artifact_path``), the step
    from the path, the learning rate from the run's metric."""

    name, kind = "artifact files", "artifact"

    def find(self, run: RunFiles) -> list[CheckpointRef]:
        by_step: dict[int, list[str]] = {}
        for path in self._walk(run, run.artifact_path):
            step = step_of(path)
            if step is None:
                logger.info("ignoring %s: no step number in its path", path)
                continue
            by_step.setdefault(step, []).append(path)
        if not by_step:
            return []
        history = run.lr_history()
        refs = []
        for step, paths in by_step.items():
            lr, lr_source = learning_rate_at(step, history, {})
            refs.append(CheckpointRef(step, lr, lr_source, self.kind, _pick(run, step, paths)))
        return refs

    def _walk(self, run: RunFiles, root: str | None, depth: int = 0) -> list[str]:
        files = []
        for info in run.list(root):
            name = info.path.rsplit("/", 1)[-1]
            if info.is_dir:
                if depth == 0 and root is None and name in _SKIP_DIRS:
                    continue
                if depth < 4:
                    files.extend(self._walk(run, info.path, depth + 1))
            elif info.path.endswith(WEIGHT_SUFFIXES):
                files.append(info.path)
        return files

    read = staticmethod(_read_artifact)


def _pick(run: RunFiles, step: int, paths: list[str]) -> str:
    """The model's weight file among a step's files (not an optimizer's; safetensors over a pickle format)."""
    paths = [p for p in paths if "optim" not in p.rsplit("/", 1)[-1].lower()] or paths
    if len(paths) > 1:
        preferred = [p for p in paths if re.search(r"state_dict|model", p.rsplit("/", 1)[-1])]
        safe = [p for p in preferred if p.endswith(SAFETENSORS_SUFFIX)]
        if len(safe) == 1:  # e.g. model.safetensors beside a state_dict.pth of the same weights
            preferred = safe
        if len(preferred) != 1:
            raise CheckpointError(
                f"Run {run.run_id} has several weight files for step {step}: {paths}. Pass "
                "artifact_path= (--artifact-path) to point at the folder that holds the model checkpoints."
            )
        paths = preferred
    return paths[0]


class LoggedModels:
    """MLflow 3 LoggedModels in the run's outputs, by step (failed ones left out)."""

    name, kind = "logged models", "logged_model"

    def find(self, run: RunFiles) -> list[CheckpointRef]:
        outputs = getattr(run.run(), "outputs", None)
        model_outputs = list(getattr(outputs, "model_outputs", None) or [])
        if not model_outputs:
            return []
        found = []  # (linked step, model id, name)
        for out in model_outputs:
            model = run.logged_model(out.model_id)
            if str(getattr(model, "status", None) or "") == "FAILED":  # a failed log_model call still links it
                logger.warning("run %s: leaving out LoggedModel %s (%r, step %s): its status is FAILED (its "
                               "log_model call failed)", run.run_id, out.model_id, getattr(model, "name", None),
                               out.step)
                continue
            found.append((int(out.step), out.model_id, str(getattr(model, "name", None) or "")))
        if not found:
            return []
        history = run.lr_history()
        refs = []
        for step, model_id in self._steps(run, found):
            lr, lr_source = learning_rate_at(step, history, {})
            refs.append(CheckpointRef(step, lr, lr_source, self.kind, model_id))
        return refs

    @staticmethod
    def _steps(run: RunFiles, found: list[tuple[int, str, str]]) -> list[tuple[int, str]]:
        """Each LoggedModel's step: the step it is linked at; where several share one, the number in
        their names (``epoch_3``), and a LoggedModel named without one (``model``, ``final``) beside
        one whose name gives that step is left out (the final model logged without ``step=``)."""
        by_step: dict[int, list[tuple[str, str]]] = {}
        for step, model_id, name in found:
            by_step.setdefault(step, []).append((model_id, name))
        if all(len(group) == 1 for group in by_step.values()):
            return [(step, group[0][0]) for step, group in by_step.items()]
        named = {model_id: step_of(name) if name else None for _, model_id, name in found}
        numbers = [n for n in named.values() if n is not None]
        if len(numbers) == len(found) and len(set(numbers)) == len(numbers):
            logger.info("run %s: its LoggedModels share steps; using the step in each one's name", run.run_id)
            return [(named[model_id], model_id) for _, model_id, _ in found]
        kept = []
        for step, group in by_step.items():
            if len(group) > 1:
                same = [(model_id, name) for model_id, name in group if named[model_id] == step]
                if len(same) == 1:
                    left = [name or model_id for model_id, name in group if model_id != same[0][0]]
                    logger.info("run %s: step %d has several LoggedModels; using %r (its name gives the step), "
                                "leaving out %s", run.run_id, step, same[0][1], left)
                    group = same
                else:
                    shown = ", ".join(f"{model_id} ({name!r})" for model_id, name in group[:10])
                    raise CheckpointError(
                        f"Run {run.run_id} has {len(group)} LoggedModels at step {step}: {shown}, and their names "
                        "do not tell their steps apart; an audit needs each checkpoint's own step. Log each "
                        "checkpoint with its step: mlflow.pytorch.log_model(model, name=f\"epoch_{epoch}\", "
                        "step=epoch, input_example=...), or as state_dict files: mlflow.pytorch.log_state_dict("
                        "model.state_dict(), artifact_path=f\"checkpoints/epoch_{epoch}\")."
                    )
            kept.append((step, group[0][0]))
        return kept

    def read(self, run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
        model_id = ref.location
        names = [f.path for f in run.list_logged_model(model_id) if not f.is_dir]
        pt2 = [p for p in names if p.endswith(".pt2")]
        if pt2:
            return read_pt2_file(run.download(pt2[0], model_id=model_id), **limits)
        pickled = [p for p in names if p.endswith(TORCH_SUFFIXES)]
        safe = [p for p in self._walk(run, model_id) if p.endswith(SAFETENSORS_SUFFIX)]
        if safe:  # safetensors before any pickle format beside it
            return read_weights_file(run.download(self._one(run, ref, safe), model_id=model_id), False, limits)
        if pickled:
            if not run.allow_pickle:
                raise UnsafeCheckpointError(
                    f"LoggedModel {model_id} (step {ref.step}) of run {run.run_id} was saved in pickle format "
                    f"({pickled[0]}); loading it would unpickle arbitrary objects. Log models in MLflow's default "
                    "pt2 format (mlflow.pytorch.log_model(model, name=..., step=..., input_example=...)) or as "
                    "state_dict files (mlflow.pytorch.log_state_dict), or pass allow_pickle=True (--allow-pickle) "
                    "only if you trust whoever can write to this run."
                )
            return read_torch_file(run.download(pickled[0], model_id=model_id), allow_pickle=True, **limits)
        raise CheckpointError(
            f"LoggedModel {model_id} (step {ref.step}) of run {run.run_id} holds no weights an audit reads: no "
            f"data/*.pt2, no .safetensors file, no data/*.pth (found {names[:20]}). Log checkpoints with "
            "mlflow.pytorch.log_model(model, name=..., step=..., input_example=...) (pt2) or "
            "mlflow.pytorch.log_state_dict(model.state_dict(), artifact_path=f\"checkpoints/epoch_{epoch}\")."
        )

    @staticmethod
    def _walk(run: RunFiles, model_id: str, path: str | None = None, depth: int = 0) -> list[str]:
        """The LoggedModel's files (a few levels deep), for weights outside ``data/``."""
        files = []
        for info in run.list_logged_model(model_id, path):
            if info.is_dir:
                if depth < 3:
                    files.extend(LoggedModels._walk(run, model_id, info.path, depth + 1))
            else:
                files.append(info.path)
        return files

    @staticmethod
    def _one(run: RunFiles, ref: CheckpointRef, paths: list[str]) -> str:
        if len(paths) == 1:
            return paths[0]
        named = [p for p in paths if re.fullmatch(r"(model|state_dict)\.safetensors", p.rsplit("/", 1)[-1])]
        if len(named) == 1:
            return named[0]
        raise CheckpointError(
            f"LoggedModel {ref.location} (step {ref.step}) of run {run.run_id} holds several safetensors files "
            f"({paths[:10]}); an audit reads one file per checkpoint (sharded weights are not read). Save the "
            "model's state_dict as one file (safetensors.torch.save_file(model.state_dict(), \"model.safetensors\"))."
        )


#: the layouts, in the order they are tried
LAYOUTS: list[CheckpointLayout] = [HelperFolders(), ArtifactFiles(), LoggedModels()]


def register_layout(layout: CheckpointLayout, before: str | None = None) -> None:
    """Add a layout, last or before the one named ``before``."""
    names = [existing.name for existing in LAYOUTS]
    LAYOUTS.insert(names.index(before) if before in names else len(LAYOUTS), layout)


def find_checkpoints_with_layout(run: RunFiles) -> tuple[CheckpointLayout | None, list[CheckpointRef]]:
    """The first layout that finds checkpoints in the run, and those checkpoints in step order
    (learning rates unchecked); ``(None, [])`` when none does."""
    for layout in LAYOUTS:
        found = layout.find(run)
        if found:
            logger.info("run %s: %d checkpoints (%s layout)", run.run_id, len(found), layout.name)
            return layout, sorted(found, key=lambda r: r.step)
    return None, []


def find_checkpoints(run: RunFiles) -> list[CheckpointRef]:
    """The checkpoints of the first layout that finds any, in step order (learning rates unchecked)."""
    return find_checkpoints_with_layout(run)[1]


def read_checkpoint(run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of one checkpoint, read by the layout of its kind."""
    for layout in LAYOUTS:
        if layout.kind == ref.kind:
            return layout.read(run, ref, limits)
    raise CheckpointError(f"No layout reads checkpoints of kind {ref.kind!r} (step {ref.step}).")
