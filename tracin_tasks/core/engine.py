"""The private working copy of the user's model and the per-example gradient pass.

:class:`GradientEngine` owns a deep copy of the model (the caller's model is never touched:
not its mode, its ``requires_grad`` flags, its hooks or its weights), loads checkpoints into
it, and turns a batch into one factor per selected parameter:

* parameters of supported layers (see :mod:`tracin_tasks.core.layers`) come from one forward
  pass and one backward pass to the layers' *outputs*;
* every other selected parameter comes from ``torch.func`` (``functional_call`` +
  ``vmap(grad)``), or a per-row autograd loop for models that ``vmap`` cannot trace.

On the first batch the engine checks, per parameter, that the per-row gradients it built sum to
the batch gradient autograd computes; a layer that fails (e.g. its weight is also used outside
its own ``forward``) moves to the generic path with a warning.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tracin_tasks.core.factors import DenseFactor, Factor, batch_sum
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
                module.register_forward_hook(cap.hook)
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
    def _forward_factors(
        self, xs: tuple[torch.Tensor, ...], y: torch.Tensor, first_row: int, params: list[torch.Tensor] = ()
    ) -> tuple[dict[str, Factor], torch.Tensor, torch.Tensor, tuple]:
        """One forward pass with the capture hooks on, one backward pass to the captured outputs
        (and to ``params``, when asked). Returns factors, outputs, losses, parameter gradients."""
        for cap in self.captures:
            cap.records.clear()
            cap.active = True
        try:
            with torch.enable_grad():
                outputs = self.model(*xs)
                if self.label_check is not None:
                    self.label_check(outputs, y, first_row)
                losses = self.loss_fn(outputs, y)
                targets = [out for cap in self.captures for _, out in cap.records]
                wanted = targets + list(params)
                grads = torch.autograd.grad(losses.sum(), wanted, allow_unused=True) if wanted else ()
        finally:
            for cap in self.captures:
                cap.active = False
        result: dict[str, Factor] = {}
        pos = 0
        for cap in self.captures:
            n_rec = len(cap.records)
            for local, factor in factors_for(cap, list(grads[pos : pos + n_rec])).items():
                result[f"{cap.name}.{local}" if cap.name else local] = factor
            pos += n_rec
            cap.records.clear()
        return result, outputs.detach(), losses.detach(), tuple(grads[len(targets) :])

    def factors(
        self, xs: tuple[torch.Tensor, ...], y: torch.Tensor, first_row: int = 0
    ) -> tuple[dict[str, Factor], torch.Tensor]:
        """Per-example gradients of every selected parameter, and the model's outputs.

        ``first_row`` is the position of the batch's first row in the data (for error messages).
        """
        if not self._verified and self._capture_of:
            self._check_fast_path(xs, y, first_row)
        result, outputs, _, _ = self._forward_factors(xs, y, first_row)
        for name, g in self._fallback(xs, y).items():
            result[name] = DenseFactor(g.reshape(g.shape[0], -1))
        # rows the fast path never touched (module unused for this batch) have zero gradient
        for name in self.param_names:
            if name not in result:
                p = self.model.get_parameter(name)
                result[name] = DenseFactor(p.new_zeros(y.shape[0], p.numel()))
        return result, outputs

    def _check_fast_path(self, xs: tuple[torch.Tensor, ...], y: torch.Tensor, first_row: int) -> None:
        """Run the first-batch check on the batch's rows with a finite loss (NaN rows would spoil
        every sum); a batch without any leaves the check to the next batch."""
        with torch.no_grad():
            outputs = self.model(*xs)
            if self.label_check is not None:
                self.label_check(outputs, y, first_row)
            losses = self.loss_fn(outputs, y)
        finite = torch.isfinite(losses)
        if not bool(finite.any()):
            return
        if not bool(finite.all()):
            xs, y = tuple(x[finite] for x in xs), y[finite]
        params = [self.model.get_parameter(n) for n in self._capture_of]
        result, _, _, batch_grads = self._forward_factors(xs, y, first_row, params)
        self._verified = self._verify(result, dict(zip(self._capture_of, batch_grads))) is not None

    def _verify(self, result: dict[str, Factor], batch_grads: dict[str, torch.Tensor | None]) -> bool | None:
        """Compare Σ per-row gradients with autograd's batch gradient; demote layers that differ.

        Returns True when layers were moved to the generic path, False when all agree, and None
        when the batch cannot tell (non-finite gradients; the next batch is checked instead).
        """
        tol = 1e-9 if self.dtype == torch.float64 else (1e-3 if self.dtype == torch.float32 else 3e-2)
        bad_modules = set()
        for name, (cap, _local) in self._capture_of.items():
            ref = batch_grads.get(name)
            ref = torch.zeros_like(self.model.get_parameter(name)) if ref is None else ref
            ours = batch_sum(result[name]) if name in result else torch.zeros(ref.numel(), device=ref.device, dtype=ref.dtype)
            err = (ours.reshape(-1) - ref.reshape(-1)).norm()
            scale = ref.norm() + ours.norm() + 1e-30
            if not torch.isfinite(err):
                return None
            if err <= tol * scale:
                continue
            bad_modules.add(cap.name)
        if not bad_modules:
            return False
        logger.warning(
            "Layers %s: per-row gradients from the layer's own inputs do not add up to the batch "
            "gradient (is the weight also used outside the layer's forward?); using the generic "
            "torch.func path for them.",
            sorted(bad_modules),
        )
        for cap in [c for c in self.captures if c.name in bad_modules]:
            self.captures.remove(cap)
            for local in cap.params:
                name = f"{cap.name}.{local}" if cap.name else local
                self._capture_of.pop(name, None)
        self.fallback_names = [n for n in self.param_names if n not in self._capture_of]
        return True

    def _fallback(self, xs: tuple[torch.Tensor, ...], y: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.fallback_names:
            return {}
        params = {n: self.model.get_parameter(n).detach() for n in self.fallback_names}

        def row_loss(p: dict[str, torch.Tensor], x_row: tuple[torch.Tensor, ...], y_row: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, p, tuple(x.unsqueeze(0) for x in x_row))
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
                out = self.model(*(x[i : i + 1] for x in xs))
                g = torch.autograd.grad(self.loss_fn(out, y[i : i + 1]).sum(), live, allow_unused=True)
            rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, live)])
        return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(self.fallback_names)}
