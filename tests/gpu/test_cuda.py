"""CUDA gives the same scores as the CPU, on every fast path and the generic one."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin_tasks import Checkpoint, TracIn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class _Mixed(nn.Module):
    """Conv, norm, linear and a parameter only the generic path handles."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.scale = nn.Parameter(torch.ones(10))

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return self.fc(h.flatten(1)) * self.scale


def _checkpoints(model, n=3):
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        out.append(Checkpoint(state_dict={k: v.clone() for k, v in model.state_dict().items()}, learning_rate=0.1 / (step + 1), step=step))
    return out


@pytest.mark.parametrize("layers", [None, "last"])
def test_cuda_matches_cpu(layers):
    torch.manual_seed(0)
    model = _Mixed().double()
    ckpts = _checkpoints(model)
    x = torch.rand(300, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (300,))
    data = TensorDataset(x, y)
    cpu = TracIn(model, ckpts, layers=layers, device="cpu").self_influence(data, batch_size=64)
    gpu = TracIn(model, ckpts, layers=layers, device="cuda").self_influence(data, batch_size=64)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-9)

    test = TensorDataset(x[:20], y[:20])
    cpu_m = TracIn(model, ckpts, layers=layers, device="cpu").influence(data, test)
    gpu_m = TracIn(model, ckpts, layers=layers, device="cuda").influence(data, test)
    np.testing.assert_allclose(gpu_m, cpu_m, rtol=1e-9, atol=1e-12)


def test_cuda_float32_close_to_cpu_float64():
    torch.manual_seed(1)
    model = _Mixed()
    ckpts = _checkpoints(model)
    x, y = torch.rand(500, 1, 8, 8), torch.randint(0, 10, (500,))
    ref = TracIn(model, ckpts, dtype=torch.float64, device="cpu").self_influence(TensorDataset(x, y))
    got = TracIn(model.cuda(), ckpts, device="cuda").self_influence(TensorDataset(x, y))
    np.testing.assert_allclose(got, ref, rtol=1e-3)
