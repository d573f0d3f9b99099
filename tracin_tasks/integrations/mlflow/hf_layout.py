"""Runs written by the Hugging Face ``Trainer`` with MLflow logging (``report_to=["mlflow"]``,
``HF_MLFLOW_LOG_ARTIFACTS=1``): no tracin-tasks call in the training code.

What such a run holds (transformers 5.25, MLflow 3.17): no run artifacts of its own; each save is a
LoggedModel named ``checkpoint-N`` (linked to the run at step 0: the real step is the name's N and
``trainer_state.json``'s ``global_step``) holding ``MLmodel``, ``python_model.pkl`` and
``artifacts/checkpoint-N/{config.json, model.safetensors, trainer_state.json, optimizer.pt,
scheduler.pt, rng_state.pth, training_args.bin}``; run metrics ``learning_rate``, ``loss``,
``epoch`` (and ``grad_norm``) at the global step; the training arguments and the model config as
run params. Training data is not logged (pass it with ``--training-data``).

This layout reads only ``model.safetensors`` (:mod:`tracin_tasks.core.safetensors_file`: header
checked before anything is allocated) and the JSON files, each read with a size cap. Every pickle
there (``python_model.pkl``, ``*.pt``, ``*.pth``, ``training_args.bin``) stays unread and is never
downloaded. The model is rebuilt from ``config.json`` by tracin-tasks' own builder
(:func:`tracin_tasks.integrations.huggingface.model_from_config`: transformers' own classes only).

**Learning rates.** A checkpoint's rate is the one in force while the model moved to it: the rate
the optimizer used for update N, the last one before ``checkpoint-N`` was saved. The Trainer's
``learning_rate`` log entry at global step s holds exactly that since transformers 4.51 (it reads
the scheduler after ``optimizer.step()`` and before ``lr_scheduler.step()``; found by running the
5.25 loop with a linear schedule with warmup, and huggingface/transformers#36973); before 4.51 it
was read after the scheduler stepped, so the entry at s holds the rate of update s + 1, and this
layout shifts it back (the ``transformers_version`` in ``config.json`` tells which). Rates come from
``trainer_state.json``'s ``log_history``, else the run's ``learning_rate`` metric (or the metric
``--lr-metric`` names). A step between logged ones is interpolated linearly, which is what the
default linear schedule does between any two points of one phase; the warmup's peak (update
``warmup_steps + 1`` runs at the configured ``learning_rate``) is added from the run's params so that
no interpolation crosses it. For curved schedules (cosine) interpolation is an approximation: log
at every save (``logging_steps`` dividing ``save_steps``) for exact rates. A step past the last
logged rate has none (``--default-learning-rate`` decides).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch

from tracin_tasks._checks import usable_lr
from tracin_tasks.core.safetensors_file import read_safetensors_file
from tracin_tasks.exceptions import CheckpointError, ConfigurationError
from tracin_tasks.integrations.huggingface import FACTORY
from tracin_tasks.integrations.mlflow.cache import MAX_SPEC_BYTES
from tracin_tasks.integrations.mlflow.layouts import CheckpointRef, RunFiles, register_layout
from tracin_tasks.integrations.mlflow.logging import LR_METRIC
from tracin_tasks.integrations.model_factory import ModelSpec

logger = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint-(\d{1,18})")
#: trainer_state.json grows with the log (about 150 bytes an entry); a bigger one is not read
MAX_TRAINER_STATE_BYTES = 16 * 1024 * 1024
#: the Trainer's metric for the learning rate
HF_LR_METRIC = "learning_rate"
#: from this release on, the rate logged at step s is the one update s used (huggingface/transformers#36973)
LOGS_RATE_OF_UPDATE_FROM = (4, 51)
#: schedules whose warmup ends at update warmup_steps + 1, run at the configured learning rate
_WARMUP_SCHEDULES = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"}
#: config.json keys that may differ between checkpoints of one architecture
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path"}


def _folder(step: int) -> str:
    return f"artifacts/checkpoint-{step}"


def _number(value: Any) -> float | None:
    """A finite float from a JSON value or an MLflow param string; None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _version(text: Any) -> tuple[int, int] | None:
    m = re.match(r"^(\d{1,4})\.(\d{1,4})", text) if isinstance(text, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


class HuggingFaceCheckpoints:
    """LoggedModels named ``checkpoint-N`` holding ``artifacts/checkpoint-N/model.safetensors``."""

    name, kind = "hugging face trainer", "hf_checkpoint"

    def find(self, run: RunFiles) -> list[CheckpointRef]:
        outputs = getattr(run.run(), "outputs", None)
        model_outputs = list(getattr(outputs, "model_outputs", None) or [])
        by_step: dict[int, Any] = {}
        for out in model_outputs:
            model = run.logged_model(out.model_id)
            m = _NAME.fullmatch(str(getattr(model, "name", "") or ""))
            if not m:
                continue
            if str(getattr(model, "status", None) or "") == "FAILED":  # its upload failed part-way
                logger.warning("run %s: leaving out LoggedModel %s (%s): its status is FAILED", run.run_id,
                               out.model_id, model.name)
                continue
            step = int(m.group(1))
            if step in by_step:  # a resumed run may log a save twice: the later one is what training went on from
                logger.warning("run %s has two LoggedModels named checkpoint-%d (%s, %s); using the later one",
                               run.run_id, step, by_step[step].model_id, model.model_id)
                if (model.creation_timestamp or 0) < (by_step[step].creation_timestamp or 0):
                    continue
            by_step[step] = model
        if not by_step:
            return []
        found: dict[int, str] = {}
        unreadable = []
        for step, model in sorted(by_step.items()):
            files = {f.path for f in run.list_logged_model(model.model_id, _folder(step)) if not f.is_dir}
            if not files:  # a LoggedModel someone named so, not a Trainer save: the other layouts' business
                continue
            if f"{_folder(step)}/model.safetensors" in files and f"{_folder(step)}/config.json" in files:
                found[step] = model.model_id
            else:
                unreadable.append((step, sorted(p.rsplit("/", 1)[-1] for p in files)))
        if unreadable and not found:
            step, names = unreadable[0]
            raise CheckpointError(
                f"Run {run.run_id} has Hugging Face Trainer checkpoints (LoggedModels named checkpoint-N) but none "
                f"holds model.safetensors with config.json (checkpoint-{step} holds {names[:12]}). The audit reads "
                "only safetensors weights (a pytorch_model.bin or a sharded model.safetensors.index.json is not read). "
                "Train with the Trainer's default save_safetensors=True and a model under its shard size.")
        if not found:
            return []
        for step, names in unreadable:
            logger.warning("run %s: checkpoint-%d holds no model.safetensors with config.json (%s); left out",
                           run.run_id, step, names[:12])
        # the last checkpoint's log holds every rate logged before it: one trainer_state.json read here,
        # the others only when their checkpoint is read (to check its step), not for every save of a long run
        last = max(found)
        states = {last: self._trainer_state(run, last, found[last])}
        rates = self._rates(run, found, states)
        refs = []
        for step, model_id in found.items():
            lr, source = rates(step)
            refs.append(CheckpointRef(step, lr, source, self.kind, model_id, {"checkpoint": f"checkpoint-{step}"}))
        return refs

    # -- reading -----------------------------------------------------------------------------
    def read(self, run: RunFiles, ref: CheckpointRef, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
        # only the plan's (step, location) reach a cell: the path follows from the step
        self._trainer_state(run, ref.step, ref.location)  # its global_step must be the name's
        local = run.download(f"{_folder(ref.step)}/model.safetensors", model_id=ref.location)
        return read_safetensors_file(local, **limits)

    def model_spec(self, run: RunFiles, refs: list[CheckpointRef]) -> ModelSpec | None:
        """The architecture the checkpoints' ``config.json`` describe, built by tracin-tasks' own builder;
        every checkpoint must describe the same one."""
        if not refs:
            return None
        configs = {r.step: self._config(run, r) for r in refs}
        last_step = max(configs)
        last = configs[last_step]
        for step, config in configs.items():
            differ = sorted(k for k in set(config) | set(last) if k not in _VOLATILE_CONFIG_KEYS
                            and config.get(k) != last.get(k))
            if differ:
                raise CheckpointError(
                    f"Run {run.run_id}: checkpoint-{step} and checkpoint-{last_step} describe different models (their "
                    f"config.json differ in {differ[:10]}). One audit traces one architecture: choose the checkpoints "
                    "of one with --steps, or pass --model-factory pkg.module:function and --model-kwargs JSON.")
        return ModelSpec(FACTORY, last, "builtin")

    def _config(self, run: RunFiles, ref: CheckpointRef) -> dict[str, Any]:
        config = run.read_json(f"{_folder(ref.step)}/config.json", model_id=ref.location, max_bytes=MAX_SPEC_BYTES)
        if not isinstance(config, dict):
            raise CheckpointError(f"config.json of checkpoint-{ref.step} (LoggedModel {ref.location}) of run "
                                  f"{run.run_id} is not a JSON object; the checkpoint is damaged. Pass "
                                  "--model-factory pkg.module:function and --model-kwargs JSON to build the model.")
        return config

    def _trainer_state(self, run: RunFiles, step: int, model_id: str) -> dict[str, Any] | None:
        """``trainer_state.json`` of one checkpoint, its ``global_step`` checked against the name; None
        when it is missing or too large to read (the metric then gives the rates)."""
        path = f"{_folder(step)}/trainer_state.json"
        try:
            state = run.read_json(path, model_id=model_id, max_bytes=MAX_TRAINER_STATE_BYTES)
        except ConfigurationError as exc:
            logger.warning("%s; the step is taken from the checkpoint's name, the learning rates from the run's "
                           "%s metric", exc, HF_LR_METRIC)
            return None
        except CheckpointError:
            return None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} of LoggedModel {model_id} (run {run.run_id}) is not a JSON object; the "
                                  "checkpoint is damaged.")
        global_step = state.get("global_step")
        if global_step is not None and global_step != step:
            raise CheckpointError(
                f"LoggedModel {model_id} of run {run.run_id} is named checkpoint-{step} but its trainer_state.json "
                f"says global_step {global_step!r}; one of them was changed after training. Leave it out with --steps, "
                "or re-log the checkpoint.")
        return state

    # -- learning rates ----------------------------------------------------------------------
    def _rates(self, run: RunFiles, found: dict[int, str], states: dict[int, dict | None]):
        """``rate(step) -> (learning rate, source)``: the rate update ``step`` used (see the module docstring)."""
        shift = self._shift(run, found)
        points: dict[int, tuple[float, str]] = {}
        for state in states.values():
            for entry in (state or {}).get("log_history") or []:
                if not isinstance(entry, dict) or "learning_rate" not in entry:
                    continue
                step, lr = entry.get("step"), _number(entry.get("learning_rate"))
                if isinstance(step, int) and not isinstance(step, bool) and lr is not None:
                    points[step + shift] = (lr, "trainer_state")
        metric = run.lr_metric if run.lr_metric != LR_METRIC else HF_LR_METRIC
        source = "metric" if metric == run.lr_metric else f"{metric} metric"
        for step, lr in run.metric_history(metric).items():
            points.setdefault(int(step) + shift, (float(lr), source))
        peak = self._warmup_peak(run, states, points)
        if peak is not None:
            points.setdefault(*peak)
        ordered = sorted(points)

        def rate(step: int) -> tuple[float, str]:
            if step in points:
                return points[step]
            before = [s for s in ordered if s < step]
            after = [s for s in ordered if s > step]
            if not before or not after:
                return math.nan, "missing"
            (a, (ya, _)), (b, (yb, _)) = (before[-1], points[before[-1]]), (after[0], points[after[0]])
            return ya + (yb - ya) * (step - a) / (b - a), "interpolated"

        return rate

    @staticmethod
    def _shift(run: RunFiles, found: dict[int, str]) -> int:
        """1 when the run's transformers logged the rate of the next update (before 4.51), else 0."""
        step = max(found)
        try:
            config = run.read_json(f"{_folder(step)}/config.json", model_id=found[step], max_bytes=MAX_SPEC_BYTES)
        except (CheckpointError, ConfigurationError):
            config = {}
        version = _version(config.get("transformers_version") if isinstance(config, dict) else None)
        if version is None:
            logger.info("run %s: no transformers_version in config.json; reading its learning rates as transformers "
                        ">= 4.51 logs them (the rate of the update at that step)", run.run_id)
            return 0
        return 0 if version >= LOGS_RATE_OF_UPDATE_FROM else 1

    @staticmethod
    def _warmup_peak(run: RunFiles, states: dict[int, dict | None],
                     points: dict[int, tuple[float, str]]) -> tuple[int, tuple[float, str]] | None:
        """(update, (rate, "schedule")) where a warmup schedule reaches the configured rate, from the run's
        params; None when the params do not say, or a logged rate during the warmup disagrees."""
        params = getattr(getattr(run.run(), "data", None), "params", None) or {}
        if str(params.get("lr_scheduler_type", "")).rsplit(".", 1)[-1].lower() not in _WARMUP_SCHEDULES:
            return None
        base, warmup = _number(params.get("learning_rate")), _number(params.get("warmup_steps"))
        if base is None or not usable_lr(base) or base == 0 or warmup is None or warmup <= 0:
            return None
        if warmup < 1:  # a ratio of the whole run (TrainingArguments.get_warmup_steps)
            total = next((s.get("max_steps") for s in states.values() if isinstance(s, dict)
                          and isinstance(s.get("max_steps"), int) and s["max_steps"] > 0), None)
            if total is None:
                return None
            warmup = math.ceil(total * warmup)
        warmup = int(warmup)
        # update k (1-based) of a warmup runs at base * (k - 1) / warmup: the logged rates must agree
        for update, (lr, _) in points.items():
            if 1 <= update <= warmup + 1 and not math.isclose(lr, base * (update - 1) / warmup, rel_tol=1e-6,
                                                                   abs_tol=1e-12):
                logger.info("run %s: logged learning rates do not follow the warmup its params describe; "
                            "interpolating between logged rates only", run.run_id)
                return None
        return warmup + 1, (base, "schedule")


register_layout(HuggingFaceCheckpoints(), before="logged models")
