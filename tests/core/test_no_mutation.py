"""TracIn never changes the caller's model: mode, requires_grad flags, hooks, weights, dtype."""

from __future__ import annotations

import numpy as np
import oracle
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin_tasks import TracIn


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 6)  # a frozen feature extractor
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.frozen(x)))
        return self.head(self.drop(torch.tanh(self.ln(self.fc(h)))))


def _hook(module, args, output):
    return None


def _pre_hook(module, args):
    return None


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "dtypes": {n: p.dtype for n, p in model.state_dict().items()},
        "forward_hooks": {n: dict(m._forward_hooks) for n, m in model.named_modules()},
        "forward_pre_hooks": {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()},
    }


@pytest.fixture
def setup(make_checkpoints):
    torch.manual_seed(0)
    model = DropoutNet()  # float32
    model.frozen.weight.requires_grad_(False)
    model.frozen.bias.requires_grad_(False)
    model.ln.bias.requires_grad_(False)
    ckpts = make_checkpoints(model, lrs=(0.4, 0.1))
    model.train()
    model.fc.register_forward_hook(_hook)
    model.register_forward_pre_hook(_pre_hook)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(14, 4, generator=gen), torch.randint(0, 3, (14,), generator=gen)
    xt, yt = torch.randn(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    return model, ckpts, (x, y), (xt, yt)


@pytest.mark.parametrize("layers", [None, "last", ["frozen", "ln"]], ids=["all", "last", "frozen+ln"])
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["model-dtype", "float64"])
def test_model_is_not_mutated_and_scores_are_eval_mode(setup, layers, dtype):
    model, ckpts, (x, y), (xt, yt) = setup
    before = _snapshot(model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt_weights = [{k: v.clone() for k, v in c.state_dict.items()} for c in ckpts]

    t = TracIn(model, ckpts, layers=layers, dtype=dtype)
    scores = t.self_influence(TensorDataset(x, y), batch_size=4)
    m = t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=4)
    t.proponents(TensorDataset(xt, yt), TensorDataset(x, y), k=3, batch_size=4)

    after = _snapshot(model)
    for key in before:
        assert after[key] == before[key], key
    assert model.training and model.drop.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for c, saved in zip(ckpts, ckpt_weights):
        for k, v in c.state_dict.items():
            assert torch.equal(v, saved[k]), k

    # eval-mode scores (no dropout), frozen parameters left out unless named
    rtol, atol = (1e-6, None) if dtype == torch.float64 else (1e-4, 1e-5)
    oracle.assert_matches(scores, oracle.self_influence(model, ckpts, x, y, layers=layers), rtol=rtol, atol_frac=atol)
    oracle.assert_matches(m, oracle.influence(model, ckpts, x, y, xt, yt, layers=layers), rtol=rtol, atol_frac=atol and 1e-4)
    assert model.training  # the oracle works on its own copy too


def test_frozen_parameters_change_the_answer(setup):
    """Control for the test above: scoring the frozen layer too would give other numbers."""
    model, ckpts, (x, y), _ = setup
    trainable = oracle.self_influence(model, ckpts, x, y)
    with_frozen = oracle.self_influence(model, ckpts, x, y, layers=["frozen", "fc", "ln", "head"])
    assert not np.allclose(trainable, with_frozen, rtol=1e-3)


def test_scores_are_deterministic_for_a_model_in_train_mode(setup):
    """With dropout active, two passes would differ; TracIn scores in eval mode."""
    model, ckpts, (x, y), _ = setup
    t = TracIn(model, ckpts)
    first = t.self_influence(TensorDataset(x, y))
    again = t.self_influence(TensorDataset(x, y))
    np.testing.assert_array_equal(first, again)  # deterministic: dropout is off
    assert model.training
