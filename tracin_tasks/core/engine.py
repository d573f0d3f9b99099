"""The private working copy of the user's model and the per-example gradient pass.

:class:`GradientEngine` owns a deep copy of the model (the caller's model is never touched:
not its mode, its ``requires_grad`` flags, its hooks or its weights), loads checkpoints into
it, and turns a batch into one factor per selected parameter:

* parameters of supported layers (see :mod:`tracin_tasks.core.layers`) come from one forward
  pass and one backward pass to the layers' *outputs*;
* every other selected parameter comes from ``torch.func`` (``functional_call`` +
  ``vmap(grad)``), or a per-row autograd loop for models that ``vmap`` cannot trace.

Inputs are a tuple (``model(*xs)``) or a dict (``model(**xs)``); the model's outputs may be a
tensor, an object or dict with ``logits``, or a tuple led by them (see
:mod:`tracin_tasks.core.data`).

On the first batch the engine checks, per parameter, that the per-row gradients it built sum to
the batch gradient autograd computes, and that the first row's equal that row's own gradient;
differences are measured against the parameter's gradient with an absolute floor tied to the
whole gradient's size and the dtype's rounding error. A layer that fails (e.g. its weight is also
used outside its own ``forward``, or its input is shared by the rows) moves to the generic path
with a warning.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tracin_tasks.core.data import ModelInputs, call_model, index_inputs, map_inputs, output_logits
from tracin_tasks.core.factors import DenseFactor, Factor, OuterFactor, batch_sum
from tracin_tasks.core.layers import Capture, batch_coupling, factors_for, fast_param_names
from tracin_tasks.core.losses import LossFn
from tracin_tasks.exceptions import (
    ConfigurationError,
    LayerNotFoundError,
    StateDictMismatchError,
    UnsupportedModelError,
)

logger = logging.getLogger(__name__)


def select_parameters(model: nn.Module, layers: None | str | Sequence[str]) -> list[str]:
    """Resolve ``layers`` to the full names of the parameters TracIn differentiates.

    ``None``: every parameter that requires grad. ``"last"``: the own parameters of the last
    module (in registration order) that has trainable parameters. Module names: every parameter
    under those modules.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # a weight shared by several modules is listed once, under its first name; map by identity
    canonical = {id(p): n for n, p in model.named_parameters()}
    if layers is None:
        if not trainable:
            raise LayerNotFoundError(
                "The model has no parameters that require grad, so there is nothing to trace. "
                "Pass layers=[module names] to choose parameters explicitly."
            )
        return trainable
    if layers == "last":
        last = None
        for name, module in model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                last = name
        if last is None:
            raise LayerNotFoundError("layers='last': the model has no module with trainable parameters.")
        own = {id(p) for p in model.get_submodule(last).parameters(recurse=False) if p.requires_grad}
        return [canonical[i] for i in canonical if i in own]
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(x, str) for x in layers):
        raise ConfigurationError(
            f"layers must be None (all layers), 'last', or a non-empty list of module names; got {layers!r}."
        )
    modules = dict(model.named_modules())
    with_params = [n for n, m in modules.items() if n and any(True for _ in m.parameters())]
    names: list[str] = []
    for layer in layers:
        if layer not in modules:
            close = difflib.get_close_matches(layer, with_params, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise LayerNotFoundError(
                f"Layer {layer!r} does not exist in {type(model).__name__}.{hint} Layers with "
                f"parameters: {with_params[:30]}{' ...' if len(with_params) > 30 else ''}; pass some of "
                "them as layers=[...], 'last' for the last one, or None for all."
            )
        found = [canonical[id(p)] for p in modules[layer].parameters()]
        if not found:
            raise LayerNotFoundError(f"Layer {layer!r} has no parameters; choose one of {with_params[:30]}.")
        names.extend(n for n in found if n not in names)
    return names


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str | None:
    """Explain how a state_dict differs from the model's, or None when it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if shapes:
        parts.append(f"shape mismatches [{'; '.join(shapes[:10])}]")
    return ", ".join(parts)


def check_state_dict_fits(expected: Mapping[str, Any], given: Mapping[str, Any], step: Any, model_name: str) -> None:
    """Raise :class:`StateDictMismatchError` (the one message for it) unless ``given`` fits ``expected``.

    Both map parameter names to tensors (meta tensors will do: only names and shapes are compared).
    """
    problem = describe_mismatch(expected, given)
    if problem:
        raise StateDictMismatchError(
            f"The checkpoint at step {step} does not fit {model_name}: {problem}. "
            "Build the model with the same architecture and settings as the training run."
        )


class GradientEngine:
    """Per-example gradients of one model, as factors, for whichever checkpoint is loaded."""

    def __init__(
        self,
        model: nn.Module,
        param_names: list[str],
        loss_fn: LossFn,
        device: torch.device,
        dtype: torch.dtype | None,
        label_check: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None,
    ):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype)
        self.model.eval()
        self.device = device
        self.dtype = dtype or next(self.model.parameters()).dtype
        self.loss_fn = loss_fn
        self.label_check = label_check
        self.form_override: str | None = None  # tests force "gram" / "materialise"
        for name, module in self.model.named_modules():
            reason = batch_coupling(module)
            if reason:
                raise UnsupportedModelError(
                    f"Module {name!r}: {reason}. TracIn needs one gradient per row; rebuild it with "
                    "track_running_stats=True (and train it that way), or replace it by "
                    "LayerNorm/GroupNorm."
                )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.param_names = list(param_names)
        params = {n: self.model.get_parameter(n) for n in self.param_names}
        for p in params.values():
            p.requires_grad_(True)

        # a parameter shared by several modules gets gradient from all of them: generic path
        owners: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        self.captures: list[Capture] = []
        self._capture_of: dict[str, tuple[Capture, str]] = {}
        for mname, module in self.model.named_modules():
            own = {}
            for local, p in module.named_parameters(recurse=False):
                full = f"{mname}.{local}" if mname else local
                if full in params and local in fast_param_names(module) and owners[id(p)] == 1:
                    own[local] = p
            if own:
                cap = Capture(mname, module, own)
                module.register_forward_hook(cap.hook, with_kwargs=True)
                self.captures.append(cap)
                for local in own:
                    self._capture_of[f"{mname}.{local}" if mname else local] = (cap, local)
        self.fallback_names = [n for n in self.param_names if n not in self._capture_of]
        self._verified = False
        self._vmap_ok = True
        self._expected_state = {k: v for k, v in self.model.state_dict().items()}
        if self.fallback_names:
            logger.info("generic torch.func path for parameters %s", self.fallback_names)

    # -- checkpoints -------------------------------------------------------------------
    def load(self, state_dict: Mapping[str, torch.Tensor], step: Any = None) -> None:
        """Load a checkpoint's weights into the private copy, after checking they fit."""
        check_state_dict_fits(self._expected_state, state_dict, step, type(self.model).__name__)
        self.model.load_state_dict(state_dict, strict=True)

    # -- per-example gradients ---------------------------------------------------------
    def _logits(self, xs: ModelInputs) -> torch.Tensor:
        return output_logits(call_model(self.model, xs))

    def _forward_factors(
        self,
        xs: ModelInputs,
        y: torch.Tensor,
        first_row: int,
        params: Sequence[torch.Tensor] = (),
        row: int | None = None,
    ) -> _Pass:
        """One forward pass with the capture hooks on, one backward pass to the captured outputs
        (and to ``params``, when asked; and, for ``row``, a second one of that row's loss alone)."""
        b = y.shape[0]
        for cap in self.captures:
            cap.records.clear()
            cap.versions.clear()
            cap.active = True
            cap.batch = b
            cap.spread_calls = 0
        try:
            with torch.enable_grad():
                outputs = self._logits(xs)
                changed = [cap for cap in self.captures if cap.modified_in_place()]
                if changed:  # e.g. ReLU(inplace=True) after a norm layer: take the gradient to a copy
                    for cap in changed:
                        cap.clone = True
                    logger.info("layers %s: outputs changed in place downstream; capturing copies",
                                [c.name for c in changed])
                    return self._forward_factors(xs, y, first_row, params, row)
                if self.label_check is not None:
                    self.label_check(outputs, y, first_row)
                losses = self.loss_fn(outputs, y)
                targets = [out for cap in self.captures for _, out in cap.records]
                wanted = targets + list(params)
                keep = row is not None and bool(params)
                grads = (torch.autograd.grad(losses.sum(), wanted, allow_unused=True, retain_graph=keep)
                         if wanted else ())
                row_grads = torch.autograd.grad(losses[row], list(params), allow_unused=True) if keep else ()
        finally:
            for cap in self.captures:
                cap.active = False
        result: dict[str, Factor] = {}
        not_per_row: list[str] = []
        pos = 0
        for cap in self.captures:
            n_rec = len(cap.records)
            if any(out.dim() == 0 or out.shape[0] != b for _, out in cap.records):
                # an input that is not one entry per row (a flattened batch, a shared tensor):
                # the layer's own inputs cannot give per-row gradients
                not_per_row.append(cap.name)
            else:
                for local, factor in factors_for(cap, list(grads[pos : pos + n_rec])).items():
                    result[f"{cap.name}.{local}" if cap.name else local] = factor
            pos += n_rec
            cap.records.clear()
        return _Pass(result, outputs.detach(), losses.detach(), tuple(grads[len(targets) :]), tuple(row_grads),
                     not_per_row)

    def factors(self, xs: ModelInputs, y: torch.Tensor, first_row: int = 0) -> tuple[dict[str, Factor], torch.Tensor]:
        """Per-example gradients of every selected parameter, and the model's outputs (logits).

        ``xs`` is a tuple of positional inputs or a dict of keyword inputs (see
        :mod:`tracin_tasks.core.data`). ``first_row`` is the position of the batch's first row in
        the data (for error messages).
        """
        if not self._verified and self._capture_of:
            self._check_fast_path(xs, y, first_row)
        done = self._forward_factors(xs, y, first_row)
        if done.not_per_row:  # seen only now (a batch of another size): the generic path is exact
            self._demote(done.not_per_row, _NOT_PER_ROW)
            return self.factors(xs, y, first_row)
        result = done.factors
        for name, g in self._fallback(xs, y).items():
            result[name] = DenseFactor(g.reshape(g.shape[0], -1))
        # rows the fast path never touched (module unused for this batch) have zero gradient
        for name in self.param_names:
            if name not in result:
                p = self.model.get_parameter(name)
                result[name] = DenseFactor(p.new_zeros(y.shape[0], p.numel()))
        return result, done.outputs

    def _check_fast_path(self, xs: ModelInputs, y: torch.Tensor, first_row: int) -> None:
        """Run the first-batch check on the batch's rows with a finite loss (NaN rows would spoil
        every sum); a batch without any leaves the check to the next batch."""
        with torch.no_grad():
            plain = self._logits(xs)
            if self.label_check is not None:
                self.label_check(plain, y, first_row)
            losses = self.loss_fn(plain, y)
        finite = torch.isfinite(losses)
        if not bool(finite.any()):
            return
        if not bool(finite.all()):
            xs, y, plain = index_inputs(xs, finite), y[finite], plain[finite]
        while self._capture_of:
            names = list(self._capture_of)
            params = [self.model.get_parameter(n) for n in names]
            try:
                done = self._forward_factors(xs, y, first_row, params, row=0)
                error = None
            except Exception as exc:  # noqa: BLE001 - re-raised below unless the expansion caused it
                done, error = None, exc
            spread = sorted({c.name for c in self.captures if c.spread_calls})
            if error is not None and not spread:
                raise error
            if spread and (error is not None or not _same_outputs(done.outputs, plain, self.dtype)):
                for cap in self.captures:
                    if cap.name in spread:
                        cap.spread = False
                self._demote(spread, "expanding their shared index tensor to the batch changes the model's outputs")
                continue
            verdict = self._verify(done, names)
            self._verified = verdict is not None
            return

    def _verify(self, done: _Pass, names: list[str]) -> bool | None:
        """Compare the per-row gradients with autograd's; demote the layers that differ.

        Two checks per parameter: the per-row gradients summed over the batch against the batch
        gradient, and the first row's against that row's own gradient (which catches a
        gradient that is right in total but given to the wrong rows). Each difference is measured
        against the parameter's own gradient, with an absolute floor of a few hundred rounding
        errors of the whole gradient: some parameters have a gradient that is zero in exact
        arithmetic (the key bias of attention, to which softmax is invariant), and rounding alone
        would fail a purely relative test there.

        Returns True when layers were moved to the generic path, False when all agree, and None
        when the batch cannot tell (non-finite gradients; the next batch is checked instead).
        """
        tol = 1e-9 if self.dtype == torch.float64 else (1e-3 if self.dtype == torch.float32 else 3e-2)
        # capped at tol: in half precision a few hundred rounding errors would excuse anything
        floor_eps = min(_FLOOR_ROUNDING_ERRORS * torch.finfo(self.dtype).eps, tol)
        if done.not_per_row:
            self._demote(done.not_per_row, _NOT_PER_ROW)
        bad_modules: set[str] = set()
        checks = []
        for refs, ours_of in ((done.param_grads, batch_sum), (done.row_grads, lambda f: batch_sum(_first_row(f)))):
            refs = {n: torch.zeros_like(self.model.get_parameter(n)) if g is None else g for n, g in zip(names, refs)}
            overall = math.sqrt(sum(float(g.double().pow(2).sum()) for g in refs.values()))
            if not math.isfinite(overall):
                return None
            checks.append((refs, ours_of, floor_eps * overall))
        for name in names:
            if name not in self._capture_of:
                continue  # demoted above
            cap, _local = self._capture_of[name]
            if cap.name in bad_modules:
                continue
            for refs, ours_of, floor in checks:
                ref = refs[name].reshape(-1)
                ours = ours_of(done.factors[name]).reshape(-1) if name in done.factors else torch.zeros_like(ref)
                err = float((ours.double() - ref.double()).norm())
                if not math.isfinite(err):
                    return None
                if err > tol * float(ref.double().norm() + ours.double().norm()) + floor:
                    bad_modules.add(cap.name)
                    break
        if not bad_modules:
            return bool(done.not_per_row)
        self._demote(
            sorted(bad_modules),
            "per-row gradients from the layer's own inputs do not match autograd's (is the weight also "
            "used outside the layer's forward, or is its input shared by the rows?)",
        )
        return True

    def _demote(self, modules: Sequence[str], why: str) -> None:
        """Move the parameters of the captured ``modules`` to the generic path, with a warning."""
        logger.warning("Layers %s: %s; using the generic torch.func path for them.", sorted(modules), why)
        for cap in [c for c in self.captures if c.name in set(modules)]:
            self.captures.remove(cap)
            for local in cap.params:
                self._capture_of.pop(f"{cap.name}.{local}" if cap.name else local, None)
        self.fallback_names = [n for n in self.param_names if n not in self._capture_of]

    def _fallback(self, xs: ModelInputs, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.fallback_names:
            return {}
        params = {n: self.model.get_parameter(n).detach() for n in self.fallback_names}

        def row_loss(p: dict[str, torch.Tensor], x_row: ModelInputs, y_row: torch.Tensor) -> torch.Tensor:
            one = map_inputs(lambda t: t.unsqueeze(0), x_row)
            args, kwargs = ((), one) if isinstance(one, dict) else (one, None)
            out = output_logits(functional_call(self.model, p, args, kwargs))
            return self.loss_fn(out, y_row.unsqueeze(0)).sum()

        if self._vmap_ok:
            try:
                with torch.no_grad():  # torch.func.grad still differentiates; nothing else records
                    return vmap(grad(row_loss), in_dims=(None, 0, 0))(params, xs, y)
            except Exception as exc:  # an op without a batching rule, data-dependent control flow...
                self._vmap_ok = False
                logger.warning("torch.func.vmap cannot trace this model (%s); using a per-row loop.", exc)
        rows = []
        live = [self.model.get_parameter(n) for n in self.fallback_names]
        for i in range(y.shape[0]):
            with torch.enable_grad():
                out = self._logits(index_inputs(xs, slice(i, i + 1)))
                g = torch.autograd.grad(self.loss_fn(out, y[i : i + 1]).sum(), live, allow_unused=True)
            rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, live)])
        return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(self.fallback_names)}


_NOT_PER_ROW = ("their inputs have no entry per row (a tensor the rows share, or a batch flattened into "
                "one dimension), so per-row gradients cannot come from them")

# The first-batch check's absolute floor, in rounding errors (eps of the dtype) of the whole
# gradient's norm: far above the noise of a sum of rounded terms, far below any real mistake.
_FLOOR_ROUNDING_ERRORS = 256


@dataclass
class _Pass:
    """What one forward/backward pass with the capture hooks gives."""

    factors: dict[str, Factor]
    outputs: torch.Tensor
    losses: torch.Tensor
    param_grads: tuple  # gradient of the summed loss to each requested parameter (None: unused)
    row_grads: tuple  # gradient of the requested row's loss alone
    not_per_row: list[str]  # captured layers whose inputs had no entry per row


def _first_row(factor: Factor) -> Factor:
    if isinstance(factor, DenseFactor):
        return DenseFactor(factor.g[:1])
    return OuterFactor(factor.u[:1], factor.v[:1], factor.index_size)


def _same_outputs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two forward passes of the same rows gave the same outputs (up to rounding)."""
    if a.shape != b.shape:
        return False
    tol = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 1e-2)
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True))
