"""The reference TracIn: one row at a time, plain autograd, float64.

Nothing here imports tracin_tasks' gradient machinery; it only reads a Checkpoint's weights and
learning rate. For every checkpoint the weights go into a float64 copy of the model in eval
mode, and for every row the loss of a batch of one is differentiated with
``torch.autograd.grad`` with respect to the selected parameters:

    self_influence[i] = Σ_c lr_c ‖g_c(z_i)‖²
    influence[j, i]   = Σ_c lr_c g_c(train_i) · g_c(test_j)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def select(model: nn.Module, layers: None | str | Sequence[str]) -> list[nn.Parameter]:
    """The parameter objects TracIn's ``layers`` argument stands for (each shared one once).

    None: every trainable parameter. "last": the own trainable parameters of the last module (in
    ``named_modules`` order) that has some. Module names: every parameter under those modules.
    """
    if layers is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
    elif layers == "last":
        last = None
        for _, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                last = own
        assert last is not None
        chosen = last
    else:
        if isinstance(layers, str):
            layers = [layers]
        chosen = [p for name in layers for p in model.get_submodule(name).parameters()]
    out, seen = [], set()
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def row_loss(loss: str | Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of a batch of one, as a scalar."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none").sum()
    if loss == "mse":
        return F.mse_loss(out, y.reshape(out.shape).to(out.dtype), reduction="none").sum()
    value = loss(out, y)
    assert value.shape == (1,), value.shape
    return value.sum()


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def per_row_grads(
    model: nn.Module, state_dict, x, y: torch.Tensor, loss="cross_entropy", layers=None
) -> torch.Tensor:
    """``(n, D)`` float64: row i is the flattened gradient of row i's loss at ``state_dict``."""
    m = copy.deepcopy(model).double().eval()
    m.load_state_dict({k: _f64(v.detach().clone()) for k, v in state_dict.items()}, strict=True)
    params = select(m, layers)
    for p in params:
        p.requires_grad_(True)
    xs = tuple(_f64(t) for t in _as_tuple(x))
    y = _f64(y)
    rows = []
    for i in range(y.shape[0]):
        with torch.enable_grad():
            out = m(*(t[i : i + 1] for t in xs))
            grads = torch.autograd.grad(row_loss(loss, out, y[i : i + 1]), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def _weights(ckpt):
    return ckpt.load_state_dict(), float(ckpt.learning_rate)


def self_influence(model, checkpoints, x, y, loss="cross_entropy", layers=None) -> np.ndarray:
    total = 0.0
    for ckpt in checkpoints:
        sd, lr = _weights(ckpt)
        g = per_row_grads(model, sd, x, y, loss, layers)
        total = total + lr * g.pow(2).sum(1)
    return total.numpy()


def influence(model, checkpoints, x_train, y_train, x_test, y_test, loss="cross_entropy", layers=None) -> np.ndarray:
    """``(n_test, n_train)`` float64."""
    total = 0.0
    for ckpt in checkpoints:
        sd, lr = _weights(ckpt)
        g_train = per_row_grads(model, sd, x_train, y_train, loss, layers)
        g_test = per_row_grads(model, sd, x_test, y_test, loss, layers)
        total = total + lr * (g_test @ g_train.T)
    return total.numpy()


def gradient_size(model: nn.Module, layers=None) -> int:
    return sum(p.numel() for p in select(model, layers))


def assert_matches(actual, expected, rtol: float = 1e-6, what: str = "", atol_frac: float | None = None) -> None:
    """Elementwise rtol, with an absolute floor of atol_frac·max|expected| (default rtol·1e-3) for
    entries near 0 (influence entries are dot products and can cancel to ~0)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.nanmax(np.abs(expected))) if expected.size else 0.0
    assert scale > 0, f"{what}: the reference is all zeros; the test could not fail"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=(rtol * 1e-3 if atol_frac is None else atol_frac) * scale, err_msg=what)


def build_checkpoints(model, lrs=(0.5, 0.2, 0.05), seed=0, scale=0.3):
    """One Checkpoint per learning rate; each perturbs the model's weights with fresh noise and
    gives BatchNorm layers non-trivial running statistics. The model itself is not changed."""
    from tracin_tasks import Checkpoint

    gen = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    out = []
    for step, lr in enumerate(lrs):
        sd, done = {}, {}
        for k, v in base.items():
            key = (v.data_ptr(), tuple(v.shape))
            if key in done:  # tied weights stay tied
                sd[k] = done[key]
                continue
            if not v.is_floating_point():
                sd[k] = v.clone()
            elif k.endswith("running_var"):
                sd[k] = (0.5 + torch.rand(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype)
            else:
                sd[k] = v + scale * torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
            done[key] = sd[k]
        out.append(Checkpoint(state_dict=sd, learning_rate=lr, step=step))
    return out
