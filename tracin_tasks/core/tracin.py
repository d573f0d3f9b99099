"""TracIn (Pruthi et al., NeurIPS 2020): self-influence and train→test influence."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tracin_tasks.core.checkpoint import Checkpoint, check_checkpoints
from tracin_tasks.core.data import ModelInputs, dataset_length, iterate, make_loader, output_logits
from tracin_tasks.core.engine import GradientEngine, select_parameters
from tracin_tasks.core.factors import DenseFactor, Factor, Projector, choose_form, dots, materialise, squared_norms
from tracin_tasks.core.losses import LossFn, check_class_labels, resolve_loss
from tracin_tasks.core.passes import PASS_FIELDS
from tracin_tasks.exceptions import ConfigurationError, DataError, EmptyDatasetError, NonFiniteGradientError

logger = logging.getLogger(__name__)

_ON_NONFINITE = ("raise", "nan")


@dataclass(frozen=True)
class CheckpointPass:
    """What one checkpoint says about every row (arrays in row order).

    Attributes:
        step: the checkpoint's step.
        learning_rate: its learning rate η_c.
        squared_norm: ‖∇_θ ℓ(θ_c, z)‖² over the selected parameters (not yet times η_c).
        loss: the row's loss at this checkpoint.
        margin: for classifiers, logit of the given label minus the largest other logit
            (negative: the model prefers another class); NaN otherwise.
        predicted: for classifiers, the most likely class; -1 otherwise.
        confidence: for classifiers, the predicted class's softmax probability; NaN otherwise.
    """

    step: int
    learning_rate: float
    squared_norm: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray


class _Columns:
    """Per-row outputs of one pass: preallocated when the row count is known, else gathered."""

    _DTYPES = {"predicted": np.int64}

    def __init__(self, fields: Sequence[str], n: int | None):
        self.n = n
        self.arrays = {k: np.empty(n, dtype=self._DTYPES.get(k, np.float64)) for k in fields} if n else None
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in fields}

    def put(self, offset: int, values: dict[str, np.ndarray]) -> None:
        b = len(values["squared_norm"])
        if self.arrays is not None and offset + b <= self.n:
            for k, arr in self.arrays.items():
                arr[offset : offset + b] = values[k]
        else:
            for k in self.parts:
                self.parts[k].append(values[k])

    def finish(self, total: int) -> dict[str, np.ndarray]:
        if self.arrays is not None and total == self.n:
            return self.arrays
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in self.parts.items()}


def _row_signals(outputs: Any, y: torch.Tensor, loss_fn: LossFn) -> dict[str, np.ndarray]:
    """Per-row loss, margin, prediction and confidence from a batch's outputs (a tensor, or what
    the model returned: an object or dict with ``logits``, a tuple led by the logits)."""
    outputs = output_logits(outputs)
    with torch.no_grad():
        loss = loss_fn(outputs, y).double().cpu().numpy()
        b = outputs.shape[0]
        if outputs.dim() == 2 and outputs.shape[1] > 1 and not y.is_floating_point() and y.dim() == 1:
            logits = outputs.double()
            given = logits.gather(1, y.view(-1, 1)).squeeze(1)
            others = logits.scatter(1, y.view(-1, 1), float("-inf"))
            margin = (given - others.max(1).values).cpu().numpy()
            probs = torch.softmax(logits, 1)
            conf, pred = probs.max(1)
            return {"loss": loss, "margin": margin, "predicted": pred.cpu().numpy().astype(np.int64),
                    "confidence": conf.cpu().numpy()}
        nan = np.full(b, np.nan)
        return {"loss": loss, "margin": nan, "predicted": np.full(b, -1, dtype=np.int64), "confidence": nan.copy()}


class TopInfluence(NamedTuple):
    """The ``k`` most influential training rows for each test row.

    Attributes:
        indices: ``(n_test, k)`` training-row positions, most influential first.
        scores: ``(n_test, k)`` their TracInCP scores (float64).
    """

    indices: np.ndarray
    scores: np.ndarray


class TracIn:
    """TracInCP over the checkpoints of a real training run.

    ``self_influence`` gives every row ``Σ_c η_c ‖∇_θ ℓ(θ_c, z)‖²``: large for rows the model
    keeps having to bend towards, which is where wrong labels sit. ``influence`` gives
    ``Σ_c η_c ∇ℓ(θ_c, z)·∇ℓ(θ_c, z')`` between training and test rows.

    Gradients of ``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding`` and normalisation layers are
    computed in closed form from each layer's inputs and output gradients, without building
    per-row gradients; every other parameter goes through ``torch.func``. Scores are summed in
    float64. The model passed in is never changed: TracIn works on a private copy in eval mode.

    Rows are ``(x, y)``, ``((x1, x2), y)``, or ``(dict_of_tensors, y)``: a dict is passed as
    keyword arguments, ``model(**inputs)``, as Hugging Face models take ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` (floating inputs are cast to the compute dtype,
    integer ones such as token ids keep theirs). The model may return the logits as a tensor,
    as an object or dict with ``logits`` (a Hugging Face ``ModelOutput``), or as a tuple whose
    first element they are.

    Args:
        model: the architecture of the training run (its current weights are not used).
        checkpoints: the checkpoints to sum over, each with its learning rate.
        loss: ``"cross_entropy"``, ``"mse"``, or a callable ``(outputs, targets) -> (batch,)``
            returning one loss per row (e.g. ``nn.CrossEntropyLoss(reduction="none")``).
        layers: ``None`` for every trainable parameter, ``"last"`` for the last layer with
            parameters, or module names (``["fc2", "encoder.layer3"]``).
        device: where to compute; defaults to the device of the model's parameters.
        dtype: compute in this floating dtype (e.g. ``torch.float64``); defaults to the model's.
        projection_dim: for ``influence``/``proponents`` on large models, project each layer's
            per-row gradient to about this many numbers with a seeded Gaussian sketch (dot
            products stay unbiased); ``None`` computes exact influence.
        seed: seed of the random projection.
        on_nonfinite: ``"raise"`` (default) stops with :class:`NonFiniteGradientError` naming
            the rows whose gradients are NaN or inf; ``"nan"`` gives those rows NaN scores.

    Example:
        >>> from tracin_tasks import TracIn, Checkpoint
        >>> ckpts = [Checkpoint(state_dict=sd, learning_rate=lr, step=s) for s, (sd, lr) in enumerate(saved)]
        >>> scores = TracIn(model, ckpts).self_influence(train_dataset, batch_size=256)
        >>> suspicious = scores.argsort()[::-1][:100]
        >>> # a Hugging Face classifier, rows ({"input_ids": ..., "attention_mask": ...}, label)
        >>> from tracin_tasks.core.data import TensorDictDataset
        >>> rows = TensorDictDataset({"input_ids": ids, "attention_mask": mask}, labels)
        >>> scores = TracIn(bert, ckpts).self_influence(rows, batch_size=32)
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Checkpoint],
        loss: str | LossFn = "cross_entropy",
        layers: None | str | Sequence[str] = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        projection_dim: int | None = None,
        seed: int = 0,
        on_nonfinite: str = "raise",
    ):
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not any(True for _ in model.parameters()):
            raise ConfigurationError(f"{type(model).__name__} has no parameters; there is nothing to trace.")
        self.model = model
        self.checkpoints = check_checkpoints(checkpoints)
        self.loss = loss
        self._loss_fn = resolve_loss(loss)
        self.layers = layers
        self.param_names = select_parameters(model, layers)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigurationError(f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}.")
        self.dtype = dtype
        if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1):
            raise ConfigurationError(f"projection_dim must be a positive integer or None, got {projection_dim!r}.")
        self.projection_dim = projection_dim
        self.seed = int(seed)
        if on_nonfinite not in _ON_NONFINITE:
            raise ConfigurationError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        for ckpt in self.checkpoints:  # weights held in memory can be checked right away
            if ckpt.state_dict is not None:
                self._check_fits(ckpt)
        self._engine_cache: GradientEngine | None = None

    # -- public API --------------------------------------------------------------------
    def self_influence(self, data: Any, batch_size: int = 256) -> np.ndarray:
        """Self-influence of every row: ``Σ_c η_c ‖∇_θ ℓ(θ_c, z)‖²``.

        The data is streamed once per checkpoint; memory does not grow with the number of rows
        beyond the returned vector.

        Args:
            data: a Dataset of ``(x, y)`` or ``(dict_of_tensors, y)`` rows, or a DataLoader over
                one (not shuffled).
            batch_size: rows per batch when ``data`` is a Dataset.

        Returns:
            float64 array with one score per row, in row order.

        Example:
            >>> scores = TracIn(model, ckpts).self_influence(TensorDataset(x, y))
        """
        scores: np.ndarray | None = None
        for p in self._passes(data, batch_size, signals=False):
            contribution = p.learning_rate * p.squared_norm
            scores = contribution if scores is None else np.add(scores, contribution, out=scores)
        assert scores is not None  # internal invariant: check_checkpoints guarantees one checkpoint
        return scores

    def checkpoint_passes(self, data: Any, batch_size: int = 256) -> Iterator[CheckpointPass]:
        """One pass over the data per checkpoint, with everything that pass can tell per row.

        Besides each row's squared gradient norm (unweighted), the pass keeps what the forward
        pass gives for free: the loss, and for classifiers the margin (logit of the given label
        minus the largest other logit), the predicted class and its probability. Summing
        ``learning_rate * squared_norm`` over passes is :meth:`self_influence`; averaging the
        margin is the area under the margin (AUM).

        Yields:
            :class:`CheckpointPass` per checkpoint, in the order given.
        """
        return self._passes(data, batch_size, signals=True)

    def _passes(self, data: Any, batch_size: int, signals: bool) -> Iterator[CheckpointPass]:
        loader = make_loader(data, batch_size, "data")
        engine = self._engine()
        n_known = dataset_length(loader)
        fields = PASS_FIELDS if signals else ("squared_norm",)
        for ckpt in self.checkpoints:
            engine.load(ckpt.load_state_dict(self.device), ckpt.step)
            # one array per field, allocated once when the length is known: per-batch pieces kept
            # alive until the end would fragment the heap and make memory grow with the rows
            columns = _Columns(fields, n_known)
            offset = 0
            for xs, y in iterate(loader, self.device, engine.dtype, "data"):
                factors, outputs = engine.factors(xs, y, offset)
                values = {"squared_norm": self._squared_norms(factors).double().cpu().numpy()}
                if signals:
                    values.update(_row_signals(outputs, y, self._loss_fn))
                columns.put(offset, values)
                offset += y.shape[0]
            if offset == 0:
                raise EmptyDatasetError("The data yielded no rows; nothing to score. Pass a non-empty dataset.")
            if n_known is not None and offset != n_known:
                raise DataError(
                    f"The data yielded {offset} rows for checkpoint step {ckpt.step} but has length "
                    f"{n_known}; it must yield every row, in the same order, on every pass."
                )
            n_known = offset
            arrays = columns.finish(offset)
            bad = np.flatnonzero(~np.isfinite(arrays["squared_norm"])).tolist()
            self._handle_nonfinite(bad, "rows", f"checkpoint step {ckpt.step}")
            arrays["squared_norm"][bad] = np.nan
            for key in PASS_FIELDS:
                if key not in arrays:
                    arrays[key] = np.empty(0)
            yield CheckpointPass(step=ckpt.step, learning_rate=ckpt.learning_rate, **arrays)

    def influence(self, train_data: Any, test_data: Any, batch_size: int = 256) -> np.ndarray:
        """TracInCP of every training row on every test row.

        Returns:
            float64 array of shape ``(n_test, n_train)``; entry ``[j, i]`` is
            ``Σ_c η_c ∇ℓ(θ_c, train_i)·∇ℓ(θ_c, test_j)``.

        Example:
            >>> m = TracIn(model, ckpts).influence(train_ds, test_ds)
            >>> m[0].argmax()   # the training row that helped test row 0 most
        """
        blocks = [block for _, block in self._influence_blocks(train_data, test_data, batch_size)]
        return np.concatenate(blocks, axis=1)

    def proponents(self, test_data: Any, train_data: Any, k: int = 10, batch_size: int = 256) -> TopInfluence:
        """The ``k`` training rows with the largest (most helpful) influence on each test row."""
        return self._top(test_data, train_data, k, batch_size, largest=True)

    def opponents(self, test_data: Any, train_data: Any, k: int = 10, batch_size: int = 256) -> TopInfluence:
        """The ``k`` training rows with the most negative (most harmful) influence on each test row."""
        return self._top(test_data, train_data, k, batch_size, largest=False)

    # -- internals ---------------------------------------------------------------------
    def _engine(self) -> GradientEngine:
        if self._engine_cache is None:
            label_check = check_class_labels if self.loss == "cross_entropy" else None
            self._engine_cache = GradientEngine(
                self.model, self.param_names, self._loss_fn, self.device, self.dtype, label_check
            )
        return self._engine_cache

    def _check_fits(self, ckpt: Checkpoint) -> None:
        from tracin_tasks.core.engine import check_state_dict_fits

        check_state_dict_fits(self.model.state_dict(), ckpt.load_state_dict(), ckpt.step, type(self.model).__name__)

    def _squared_norms(self, factors: dict[str, Factor]) -> torch.Tensor:
        override = self._engine().form_override
        total = None
        for f in factors.values():
            sq = squared_norms(f, override if not isinstance(f, DenseFactor) and f.index_size is None else None)
            total = sq if total is None else total + sq
        assert total is not None  # select_parameters never returns an empty list
        return total

    def _handle_nonfinite(self, rows: list[int], what: str, where: str) -> None:
        """Raise, or warn, about rows whose gradients are NaN or inf (by position in the data)."""
        if not rows:
            return
        rows = sorted(set(rows))
        listed = f"{rows[:20]}{' ...' if len(rows) > 20 else ''}"
        if self.on_nonfinite == "raise":
            raise NonFiniteGradientError(
                f"{len(rows)} {what} have non-finite (NaN or inf) loss gradients ({where}): positions "
                f"{listed}. Check those rows for NaN/inf features or extreme values, or pass "
                "on_nonfinite='nan' to score them NaN and go on.",
                rows,
            )
        logger.warning("%d %s have non-finite gradients (%s); scored NaN: %s", len(rows), what, where, listed)

    def _side(
        self, engine: GradientEngine, xs: ModelInputs, y: torch.Tensor, offset: int, projector: Projector | None
    ) -> tuple[Any, np.ndarray]:
        """One batch's gradients, ready for dot products (projected, or factors), and the
        positions (in the data) of rows whose gradients are not finite."""
        factors, _ = engine.factors(xs, y, offset)
        finite = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        for f in factors.values():
            for t in ((f.g,) if isinstance(f, DenseFactor) else (f.v,) if f.index_size is not None else (f.u, f.v)):
                finite &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        bad = np.flatnonzero(~finite.cpu().numpy()) + offset
        if projector is not None:
            parts = [projector.project(i, factors[n]) for i, n in enumerate(self.param_names)]
            return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1), bad
        return factors, bad

    def _dot(self, test_side: Any, train_side: Any) -> torch.Tensor:
        if isinstance(test_side, torch.Tensor):
            return test_side @ train_side.T
        total = None
        override = self._engine().form_override
        for name in self.param_names:
            a, b = test_side[name], train_side[name]
            form = None
            if override and not isinstance(a, DenseFactor) and a.index_size is None:
                form = override
            d = dots(a, b, form)
            total = d if total is None else total + d
        return total

    def _prepare_test(self, factors: dict[str, Factor]) -> dict[str, Factor]:
        """Materialise test gradients once where that form will be used for every train batch."""
        out = {}
        for name, f in factors.items():
            form = self._engine().form_override or choose_form(f)
            if isinstance(f, DenseFactor) or f.index_size is not None or form != "materialise":
                out[name] = f
            else:
                out[name] = DenseFactor(materialise(f))
        return out

    def _influence_blocks(self, train_data: Any, test_data: Any, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first train row, (n_test, b) block)`` for consecutive training batches.

        Test-row gradients are computed once per checkpoint and kept; training rows are streamed,
        and for each training batch every checkpoint is visited, so a block is final when yielded.
        """
        train_loader = make_loader(train_data, batch_size, "training data")
        test_loader = make_loader(test_data, batch_size, "test data")
        engine = self._engine()
        projector = Projector(self.projection_dim, self.seed) if self.projection_dim else None
        weights = [c.load_state_dict(self.device) for c in self.checkpoints]
        test_sides: list[list[tuple[slice, Any]]] = []
        n_test = 0
        bad_test: set[int] = set()
        for ckpt, sd in zip(self.checkpoints, weights):
            engine.load(sd, ckpt.step)
            sides, offset = [], 0
            for xs, y in iterate(test_loader, self.device, engine.dtype, "test data"):
                side, bad = self._side(engine, xs, y, offset, projector)
                bad_test.update(bad.tolist())
                if projector is None:
                    side = self._prepare_test(side)
                sides.append((slice(offset, offset + y.shape[0]), side))
                offset += y.shape[0]
            if offset == 0:
                raise EmptyDatasetError("The test data yielded no rows; pass a non-empty dataset.")
            n_test = offset
            test_sides.append(sides)
        self._handle_nonfinite(sorted(bad_test), "test rows", "test data")
        offset = 0
        for xs, y in iterate(train_loader, self.device, engine.dtype, "training data"):
            b = y.shape[0]
            block = torch.zeros(n_test, b, dtype=torch.float64, device=self.device)
            for ckpt, sd, sides in zip(self.checkpoints, weights, test_sides):
                if len(self.checkpoints) > 1:
                    engine.load(sd, ckpt.step)
                train_side, bad = self._side(engine, xs, y, offset, projector)
                self._handle_nonfinite(bad.tolist(), "training rows", f"checkpoint step {ckpt.step}")
                for rows, test_side in sides:
                    block[rows] += ckpt.learning_rate * self._dot(test_side, train_side).double()
            out = block.cpu().numpy()
            out[~np.isfinite(out)] = np.nan  # on_nonfinite="nan": rows named above score NaN
            yield offset, out
            offset += b
        if offset == 0:
            raise EmptyDatasetError("The training data yielded no rows; pass a non-empty dataset.")

    def _top(self, test_data: Any, train_data: Any, k: int, batch_size: int, largest: bool) -> TopInfluence:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}.")
        best_scores: np.ndarray | None = None
        best_idx: np.ndarray | None = None
        for offset, block in self._influence_blocks(train_data, test_data, batch_size):
            idx = np.broadcast_to(np.arange(offset, offset + block.shape[1]), block.shape)
            if best_scores is not None:
                block = np.concatenate([best_scores, block], 1)
                idx = np.concatenate([best_idx, idx], 1)
            keyed = -block if largest else block
            keyed = np.where(np.isnan(keyed), math.inf, keyed)
            # stable sort keeps the earlier training row first among ties
            order = np.argsort(keyed, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(block, order, 1)
            best_idx = np.take_along_axis(idx, order, 1)
        assert best_scores is not None and best_idx is not None
        return TopInfluence(indices=best_idx.astype(np.int64), scores=best_scores)
