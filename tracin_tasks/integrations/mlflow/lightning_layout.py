"""Runs written by PyTorch Lightning, with no tracin-tasks call in the training code.

Two ways a Lightning run reaches MLflow (observed with Lightning 2.6, MLflow 3.17):

* ``mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False, checkpoint_save_freq="epoch")``:
  run artifacts ``checkpoints/epoch_<N>/checkpoint.pth`` (``global_step_<N>/`` with a step frequency,
  ``checkpoint.weights.pth`` with ``checkpoint_save_weights_only``, ``checkpoints/latest_checkpoint.pth``
  when only the best is kept), each beside its ``checkpoint_metrics.json``; plus a final pickled
  LoggedModel ``model``, which this layout never reads;
* ``lightning.pytorch.loggers.MLFlowLogger(log_model="all")``: every ``ModelCheckpoint`` file as
  ``epoch=<E>-step=<G>/epoch=<E>-step=<G>.ckpt`` (beside ``aliases.txt`` and ``metadata.yaml``).

Each file is a whole Lightning checkpoint (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
``epoch``, ``global_step``, ``hyper_parameters``); its pickle may name any class (hyper-parameters),
so it is read by :func:`tracin_tasks.core.weights.read_full_checkpoint`, which constructs none. A
checkpoint's step is its ``global_step`` (optimizer steps so far); its tensors are the
LightningModule's own ``state_dict``, so the model is the caller's ``--model-factory`` returning the
LightningModule.

**Learning rate.** TracIn weights a checkpoint by the rate in force while the model moved to it: the
rate of the last optimizer update before the save. Lightning steps every scheduler except
``ReduceLROnPlateau`` right after the update that ends its interval, *before* checkpoints are saved
(in ``on_train_epoch_end``, validation, or ``on_train_batch_end``); so the optimizer state in the
checkpoint holds the *next* rate (a StepLR(step_size=1, gamma=0.5) from 0.1 saves 0.05 after the
epoch that ran at 0.1). The layout undoes that step: when the scheduler's ``last_epoch`` equals the
checkpoint's ``global_step`` (it steps every update) or ``epoch + 1`` (every epoch, saved at the
epoch's end), the rate is the scheduler's closed form at ``last_epoch - 1``, for StepLR,
MultiStepLR, ExponentialLR, CosineAnnealingLR, LinearLR, ConstantLR and PolynomialLR, checked
against the saved rate at ``last_epoch``. With no scheduler, a plateau scheduler (stepped after the
save) or an epoch scheduler saved mid-epoch (``last_epoch == epoch``), the saved rate is the one in
force. Otherwise (other schedulers, several optimizers, weights-only checkpoints) the rate comes from
the run's ``--lr-metric`` (else its one ``lr-*`` metric, as LearningRateMonitor names it), logged at
the step where it took effect: the value logged at ``global_step - 1``, else interpolated between
the logged points around it (held for epoch schedules, linear otherwise); with no metric the
checkpoint has no rate (``--default-learning-rate``).
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tracin_tasks.core.weights import read_full_checkpoint
from tracin_tasks.exceptions import CheckpointError
from tracin_tasks.integrations.mlflow.layouts import (
    _SKIP_DIRS,
    ARTIFACT_KINDS,
    LAYOUTS,
    CheckpointRef,
    RunFiles,
    register_layout,
)

logger = logging.getLogger(__name__)

KIND = "lightning"
#: autolog's weight files (``latest_`` when only the best is kept; ``.weights`` without optimizer state)
_AUTOLOG_FILES = {"checkpoint.pth", "checkpoint.weights.pth", "latest_checkpoint.pth", "latest_checkpoint.weights.pth"}
_AUTOLOG_METRICS = {"checkpoint_metrics.json", "latest_checkpoint_metrics.json"}
_COMMON_KEYS = {"base_lrs", "last_epoch", "_step_count", "_get_lr_called_within_step", "_last_lr", "_is_initial",
                "verbose"}
_PLATEAU_KEYS = {"patience", "cooldown", "mode", "factor"}


def _multistep(s: Mapping[str, Any], base: float, k: int) -> float:
    milestones = s["milestones"] if isinstance(s["milestones"], Mapping) else {m: 1 for m in s["milestones"]}
    return base * s["gamma"] ** sum(count for m, count in milestones.items() if m <= k)


#: torch's schedulers with a closed form, told apart by the state keys beyond the common ones:
#: rate at scheduler step ``k`` from the base rate (torch's own ``_get_closed_form_lr`` formulas)
_CLOSED_FORMS: dict[frozenset[str], tuple[str, Callable[[Mapping[str, Any], float, int], float]]] = {
    frozenset({"step_size", "gamma"}): ("StepLR", lambda s, b, k: b * s["gamma"] ** (k // s["step_size"])),
    frozenset({"milestones", "gamma"}): ("MultiStepLR", _multistep),
    frozenset({"gamma"}): ("ExponentialLR", lambda s, b, k: b * s["gamma"] ** k),
    frozenset({"T_max", "eta_min"}): ("CosineAnnealingLR", lambda s, b, k: s["eta_min"] + (b - s["eta_min"])
                                      * (1 + math.cos(math.pi * k / s["T_max"])) / 2),
    frozenset({"start_factor", "end_factor", "total_iters"}): (
        "LinearLR", lambda s, b, k: b * (s["start_factor"] + (s["end_factor"] - s["start_factor"])
                                         * min(k, s["total_iters"]) / s["total_iters"])),
    frozenset({"factor", "total_iters"}): ("ConstantLR", lambda s, b, k: b * (s["factor"] if k < s["total_iters"] else 1.0)),
    frozenset({"total_iters", "power"}): (
        "PolynomialLR", lambda s, b, k: b * (1 - min(k, s["total_iters"]) / s["total_iters"]) ** s["power"]),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ended_an_epoch(info: Mapping[str, Any]) -> bool | None:
    """Whether the last update before the save was the last of an epoch (nothing ran since), from
    Lightning's loop state; None when the checkpoint has none."""
    try:
        progress = info["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        return progress["is_last_batch"] is True or progress["current"]["processed"] == 0
    except (KeyError, TypeError):
        return None


def _scheduler_stepped_last(k: Any, step: Any, epoch: Any, info: Mapping[str, Any]) -> tuple[bool | None, bool | None]:
    """(whether a scheduler that has stepped ``k`` times stepped after the last update, whether it steps
    once an epoch); None where its step count fits neither the updates nor the epochs."""
    if k == step:  # once an update: right after each one
        return True, False
    if type(epoch) is not int or k not in (epoch, epoch + 1):
        return None, None
    ended = _ended_an_epoch(info)
    if ended is None:  # no loop state: epoch + 1 steps can only be counted at an epoch's end
        ended = k == epoch + 1
    return (True if ended else False if k == epoch else None), True


def rate_in_force(info: Mapping[str, Any],
                  history: Callable[[], tuple[str, Mapping[int, float]]]) -> tuple[float, str, str]:
    """The learning rate of the last optimizer update before a Lightning checkpoint was saved.

    Args:
        info: the checkpoint's plain data (``read_full_checkpoint(..., tensors=False)[1]``).
        history: called only when the checkpoint cannot tell: the rate metric's name and values (step → rate).

    Returns:
        ``(rate, lr_source, how)``: ``lr_source`` is ``"optimizer state"``, ``"scheduler state"``,
        ``"metric"`` or ``"missing"`` (rate NaN); ``how`` says where it came from, for the report.
    """
    step, epoch = info.get("global_step"), info.get("epoch")
    optimizers = info.get("optimizer_states") or []
    schedulers = [s for s in info.get("lr_schedulers") or [] if isinstance(s, Mapping)]
    epochly = None  # whether the scheduler steps once an epoch (None: unknown)
    why = "it holds no optimizer state (saved weights only)"
    if len(optimizers) > 1:
        why = f"it has {len(optimizers)} optimizers"
    elif optimizers:
        groups = optimizers[0].get("param_groups") if isinstance(optimizers[0], Mapping) else None
        rates = [g.get("lr") for g in groups or [] if isinstance(g, Mapping)]
        if not rates or not all(_number(r) for r in rates):
            rate, how = _from_metric(*history(), step, None)
            why = "its optimizer state holds no learning rate (param_groups' 'lr')"
            return rate, ("metric" if math.isfinite(rate) else "missing"), f"{how} ({why})"
        if len(set(rates)) > 1:
            logger.warning("parameter groups with different learning rates %s: TracIn uses the first", rates)
        saved = float(rates[0])
        stepping = [s for s in schedulers if not _PLATEAU_KEYS <= set(s)]  # plateau ones step after the save
        k = stepping[0].get("last_epoch") if len(stepping) == 1 else None
        if not stepping or k == 0:
            return saved, "optimizer state", "the optimizer's rate (no scheduler step since the last update)"
        stepped, epochly = _scheduler_stepped_last(k, step, epoch, info) if type(k) is int else (None, None)
        form = _CLOSED_FORMS.get(frozenset(set(stepping[0]) - _COMMON_KEYS))
        if len(stepping) > 1 or type(k) is not int:
            why = "it has several schedulers" if len(stepping) > 1 else "its scheduler has no step count"
        elif stepped is False:
            return saved, "optimizer state", "the optimizer's rate (saved mid-epoch: no scheduler step since)"
        elif stepped is None:
            why = f"its scheduler's step count ({k}) matches neither the optimizer steps ({step}) nor the epochs"
        elif form is None:
            why = "its scheduler has no closed form this audit knows"
        else:
            name, rate = form
            try:
                base = float(stepping[0]["base_lrs"][0])
                before, now = float(rate(stepping[0], base, k - 1)), float(rate(stepping[0], base, k))
            except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, OverflowError):
                before, now = math.nan, math.nan
            if math.isclose(now, saved, rel_tol=1e-6, abs_tol=1e-12):
                return before, "scheduler state", (f"{name} one step back (step {k - 1}); the saved rate "
                                                   f"{saved:g} is the next one")
            why = f"its scheduler's formula ({name}) does not give the saved rate {saved:g}"
    rate, how = _from_metric(*history(), step, epochly)
    return rate, ("metric" if math.isfinite(rate) else "missing"), f"{how} ({why})"


def _from_metric(name: str, history: Mapping[int, float], step: Any, epochly: bool | None) -> tuple[float, str]:
    """The metric's rate for the update that ended at ``step``: logged where it took effect (step - 1)."""
    if type(step) is not int or step < 1 or not history:
        return math.nan, f"no {name!r} metric"
    at = step - 1
    if at in history:
        return history[at], f"the {name!r} metric at step {at}"
    before = [s for s in history if s < at]
    after = [s for s in history if s > at]
    if not before:
        return math.nan, f"no {name!r} metric logged before step {at}"
    lo = max(before)
    if after and not epochly:
        hi = min(after)
        return (history[lo] + (history[hi] - history[lo]) * (at - lo) / (hi - lo),
                f"the {name!r} metric interpolated between steps {lo} and {hi}")
    return history[lo], f"the {name!r} metric at step {lo}, held"


class LightningCheckpoints:
    """Lightning checkpoints among a run's artifacts: autolog's ``checkpoint.pth`` files, MLFlowLogger's ``.ckpt``."""

    name, kind = "lightning", KIND

    def find(self, run: RunFiles) -> list[CheckpointRef]:
        paths = self._candidates(run)
        if not paths:
            return []
        cache: dict[str, tuple[str, dict[int, float]]] = {}

        def history() -> tuple[str, dict[int, float]]:  # fetched once, and only when a checkpoint cannot tell
            if "h" not in cache:
                own = run.lr_history()
                cache["h"] = (run.lr_metric, own) if own else _monitor_history(run, run.lr_metric)
            return cache["h"]

        refs: dict[int, CheckpointRef] = {}
        for path in paths:
            what = f"Checkpoint {path!r} of run {run.run_id}"
            _, info = read_full_checkpoint(run.download(path), tensors=False, max_parameters=None, what=what)
            step, epoch = info.get("global_step"), info.get("epoch")
            if type(step) is not int or step < 0:
                raise CheckpointError(
                    f"{what} has no global_step, so it is not a Lightning checkpoint. Pass --artifact-path to point "
                    "at the folder that holds the run's checkpoints.")
            rate, source, how = rate_in_force(info, history)
            if source == "missing":  # checked_learning_rates refuses it, or applies --default-learning-rate
                logger.warning("run %s: no learning rate for %s (step %d): %s", run.run_id, path, step, how)
            ref = CheckpointRef(step, rate, source, self.kind, path,
                                {"epoch": epoch, "global_step": step, "learning_rate_from": how})
            if step not in refs or _rank(path) < _rank(refs[step].location):
                refs[step] = ref
        skipped = len(paths) - len(refs)
        if skipped:
            logger.info("run %s: %d Lightning checkpoint files repeat a step already found; not used", run.run_id, skipped)
        return list(refs.values())

    def read(self, run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
        return read_full_checkpoint(run.download(ref.location), **limits)[0]

    def _candidates(self, run: RunFiles) -> list[str]:
        files: list[str] = []
        self._walk(run, run.artifact_path, files)
        folders: dict[str, set[str]] = {}
        for path in files:
            folder, name = posixpath.split(path)
            folders.setdefault(folder, set()).add(name)
        return sorted(p for p in files if p.endswith(".ckpt") or (
            posixpath.basename(p) in _AUTOLOG_FILES and folders[posixpath.dirname(p)] & _AUTOLOG_METRICS))

    def _walk(self, run: RunFiles, root: str | None, files: list[str], depth: int = 0) -> None:
        for info in run.list(root):
            if info.is_dir:
                if depth < 4 and not (root is None and posixpath.basename(info.path) in _SKIP_DIRS):
                    self._walk(run, info.path, files, depth + 1)
            else:
                files.append(info.path)


def _rank(path: str) -> tuple[int, str]:
    """Which of several files of one step to read: autolog's, then a named checkpoint, then ``last``
    or the copy autolog logs after early stopping."""
    name = posixpath.basename(path)
    later = name.startswith("last") or path.startswith("restored_model_checkpoint/")
    return (0 if name in _AUTOLOG_FILES else 2 if later else 1), path


def _monitor_history(run: RunFiles, lr_metric: str) -> tuple[str, dict[int, float]]:
    """The run's one ``lr-*`` metric (LearningRateMonitor's name for it), if it has exactly one."""
    try:
        names = [n for n in (run.run().data.metrics or {}) if n.startswith("lr-")]
    except AttributeError:
        names = []
    return (names[0], run.metric_history(names[0])) if len(names) == 1 else (lr_metric, {})


if not any(layout.kind == KIND for layout in LAYOUTS):  # once, however often this module is imported
    register_layout(LightningCheckpoints(), before="artifact files")
ARTIFACT_KINDS.add(KIND)
