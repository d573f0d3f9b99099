"""Which parameters get the closed-form fast path, and how their factors are captured.

A forward hook on each supported module keeps what went into it and its output; after one
backward pass to those outputs (never to the weights), :func:`factors_for` turns each
(input, output-gradient) pair into the factors of :mod:`tracin_tasks.core.factors`.

Supported exactly (``type(module) is ...``, so subclasses with their own ``forward`` go to the
generic path): ``nn.Linear`` (any number of leading dimensions), ``nn.Conv1d``/``nn.Conv2d``
(any padding mode, stride, dilation, groups), ``nn.Embedding`` and the affine parameters of
``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d`` (running statistics) and
``InstanceNorm1d/2d/3d``. An ``nn.Embedding`` called with an index tensor the rows share (batch
dim 1, or none: position ids made inside ``forward``) has its output expanded to the batch so
that its gradient stays per row (see :class:`Capture`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tracin_tasks.core.factors import DenseFactor, Factor, OuterFactor

_NORMS = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding) + _NORMS


def fast_param_names(module: nn.Module) -> set[str]:
    """Names of the module's own parameters that the closed-form path can handle."""
    if type(module) not in _FAST_TYPES:
        return set()
    if isinstance(module, nn.Embedding):
        # scale_grad_by_freq divides by token counts over the whole batch: rows interact
        return set() if module.scale_grad_by_freq else {"weight"}
    return {"weight", "bias"}


def batch_coupling(module: nn.Module) -> str | None:
    """Say why a module makes one row's output depend on the other rows of its batch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return (
            f"{type(module).__name__} without running statistics normalises each batch with "
            "its own statistics, so a row's gradient depends on the rest of its batch"
        )
    return None


@dataclass
class Capture:
    """Records (input, output) of one module during a forward pass.

    The engine sets ``batch`` to the number of rows of the pass. An ``nn.Embedding`` may be
    called with an index tensor that the whole batch shares: batch dim 1 (BERT's
    ``position_ids`` of shape ``(1, L)``) or none at all (``torch.arange(L)``). The output's
    gradient would then already be summed over the rows, so the hook expands that output to the
    batch (a view with the same values, which broadcasts downstream as the original did) and the
    gradient to it is per row. Whether an index tensor lacks the batch dim is decided per call
    the first time the module runs (first dim neither 1 nor the batch) and kept for later
    batches, whose size may differ; the engine's first-batch check confirms the choice.

    An output that the model later changes in place (``nn.ReLU(inplace=True)`` after a
    BatchNorm, as in torchvision's ResNets) would no longer be the layer's output when the
    gradient to it is taken; the engine sees this (the tensor's version counter moved) and sets
    ``clone``, after which the hook hands the model a copy and keeps the original.
    """

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]  # selected own parameters on the fast path
    records: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    active: bool = False
    batch: int | None = None  # rows in the current forward pass
    spread: bool = True  # may expand a shared embedding index to the batch
    spread_calls: int = 0  # calls expanded in the current pass
    unbatched: dict[int, bool] = field(default_factory=dict)  # call number -> index has no batch dim
    clone: bool = False  # hand the model a copy of the output (it modifies the output in place)
    versions: list[int] = field(default_factory=list)  # version counter of each recorded output

    def modified_in_place(self) -> bool:
        """Whether the model changed a recorded output in place after this module returned it."""
        return any(out._version != v for (_, out), v in zip(self.records, self.versions))

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
        if not (self.active and isinstance(output, torch.Tensor) and output.requires_grad):
            return None
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        x = x.detach()
        out = output
        b = self.batch
        if self.spread and b is not None and isinstance(module, nn.Embedding):
            call = len(self.records)
            if call not in self.unbatched:
                self.unbatched[call] = x.dim() == 0 or x.shape[0] not in (1, b)
            if self.unbatched[call]:
                x, out = x.unsqueeze(0), out.unsqueeze(0)
            if x.shape[0] == 1 and b > 1:
                x, out = x.expand(b, *x.shape[1:]), out.expand(b, *out.shape[1:])
        self.records.append((x, out))
        self.versions.append(out._version)
        if out is not output:
            self.spread_calls += 1
        handed = out.clone() if self.clone else out
        return None if handed is output else handed


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfold the input of a 1-D or 2-D convolution into patches, per group: ``(B, G, L, C_in/G·k)``."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    b, c = x.shape[:2]
    groups = module.groups
    if tuple(dilation) == (1, 1):
        # strided views are much cheaper than F.unfold's im2col on CPU
        win = x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])  # (B, C, oh, ow, kh, kw)
        length = win.shape[2] * win.shape[3]
        win = win.permute(0, 2, 3, 1, 4, 5).reshape(b, length, groups, -1)
        return win.transpose(1, 2)
    patches = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)  # (B, C·k, L)
    return patches.reshape(b, groups, -1, patches.shape[-1]).transpose(2, 3)


def _normalised(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The normalised input x̂ (before the affine part) and how many trailing dims are affine."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), len(module.normalized_shape)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps), len(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), -1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        xh = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
        return xh, -1
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        use_input_stats = module.training or not module.track_running_stats
        xh = F.instance_norm(
            x, module.running_mean, module.running_var, None, None, use_input_stats, 0.0, module.eps
        )
        return xh, -1
    raise TypeError(type(module).__name__)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate the positions of a module's calls; one call needs no copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def factors_for(capture: Capture, grads: list[torch.Tensor | None]) -> dict[str, Factor]:
    """Turn the recorded calls of one module and their output gradients into factors.

    A module called several times in one forward pass (a shared block) contributes the sum of
    its calls' gradients, i.e. its positions are concatenated.
    """
    module = capture.module
    pairs = [(inp, g if g is not None else torch.zeros_like(out)) for (inp, out), g in zip(capture.records, grads)]
    out: dict[str, Factor] = {}
    if isinstance(module, nn.Linear):
        us, vs = [], []
        for a, g in pairs:
            b = a.shape[0]
            us.append(a.reshape(b, 1, -1, a.shape[-1]))
            vs.append(g.reshape(b, 1, -1, g.shape[-1]))
        u, v = _cat(us, 2), _cat(vs, 2)
        if "weight" in capture.params:
            out["weight"] = OuterFactor(u.to(v.dtype), v)
        if "bias" in capture.params:
            out["bias"] = DenseFactor(v.sum(2).reshape(v.shape[0], -1))
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        groups = module.groups
        us, vs = [], []
        for x, g in pairs:
            b = x.shape[0]
            patches = _conv_patches(module, x)  # (B, G, L, C_in/G·k)
            us.append(patches)
            vs.append(g.reshape(b, groups, -1, patches.shape[2]).transpose(2, 3))
        u, v = _cat(us, 2), _cat(vs, 2)
        if "weight" in capture.params:
            out["weight"] = OuterFactor(u.to(v.dtype), v)
        if "bias" in capture.params:
            out["bias"] = DenseFactor(v.sum(2).reshape(v.shape[0], -1))
    elif isinstance(module, nn.Embedding):
        idx_parts, vs = [], []
        for idx, g in pairs:
            b = idx.shape[0]
            idx = idx.reshape(b, -1).long()
            if module.padding_idx is not None:
                idx = torch.where(idx == module.padding_idx, torch.full_like(idx, -1), idx)
            idx_parts.append(idx)
            vs.append(g.reshape(b, 1, -1, g.shape[-1]))
        out["weight"] = OuterFactor(_cat(idx_parts, 1), _cat(vs, 2), module.num_embeddings)
    else:  # normalisation layers: per-row gradients are as small as one activation
        w_parts, b_parts = [], []
        for x, g in pairs:
            xh, n_affine = _normalised(module, x)
            b = x.shape[0]
            if n_affine > 0:  # LayerNorm/RMSNorm: affine over the trailing dims
                reduce = tuple(range(1, g.dim() - n_affine))
            else:  # channel-wise: dim 1 is the channel
                reduce = tuple(range(2, g.dim()))
            wg = (g * xh).sum(reduce) if reduce else g * xh
            bg = g.sum(reduce) if reduce else g
            w_parts.append(wg.reshape(b, -1))
            b_parts.append(bg.reshape(b, -1))
        if "weight" in capture.params:
            out["weight"] = DenseFactor(torch.stack(w_parts).sum(0))
        if "bias" in capture.params:
            out["bias"] = DenseFactor(torch.stack(b_parts).sum(0))
    return out
