"""tracin_tasks agrees with Captum 0.9's TracInCP and TracInCPFast on the same checkpoints.

Both libraries are fed the same checkpoint files (``torch.save(model.state_dict(), path)``) and
the same learning rates: tracin_tasks as ``Checkpoint(path=..., learning_rate=...)``, Captum
through a ``checkpoints_load_func`` that loads the weights into its model and returns the
learning rate. Models are float64 (Captum runs float64 fine), so agreement is to rtol 1e-6.

Captum conventions worth knowing (0.9.0):

* ``TracInCP(sample_wise_grads_per_batch=True)`` wants a *reducing* loss (``reduction="sum"``;
  with ``"mean"`` it rescales by the batch size) and supports only ``nn.Linear`` / ``nn.Conv2d``
  parameters; with ``sample_wise_grads_per_batch=False`` it wants ``reduction="none"`` and
  loops over rows.
* ``TracInCP.influence(test_batch)`` with ``k=None`` ("influence mode") returns
  ``(n_test, n_train)``: the same orientation as ``TracIn.influence(train, test)``.
* ``TracInCPFast`` uses only the *weight* of the final layer, ``‖∂ℓ/∂out‖²·‖a‖²``; its bias is
  ignored, whereas ``TracIn(layers="last")`` differentiates every own parameter of the last
  layer, bias included. The two agree exactly when that layer has no bias, and otherwise
  differ by exactly the bias term ``Σ_c η_c ‖∂ℓ/∂out‖²`` (checked below).
"""

from __future__ import annotations

import copy

import numpy as np
import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin_tasks import Checkpoint, TracIn

captum_influence = pytest.importorskip("captum.influence")
TracInCP = captum_influence.TracInCP
TracInCPFast = captum_influence.TracInCPFast

pytestmark = [
    # Captum sets requires_grad on the (float64) input batch it clones, and says so
    pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*has no 'reduction' attribute:UserWarning"),
]

F64 = torch.float64
RTOL = 1e-6
LEARNING_RATES = (0.5, 0.2, 0.05)
N_TRAIN, N_TEST, BATCH = 40, 7, 16  # batches of 16 leave a ragged last batch; n_test != n_train


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 12, n_classes: int = 4, last_bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, n_classes, bias=last_bias)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Two 3×3 convolutions (one strided, one unpadded), max-pooling, a linear head."""

    def __init__(self, n_classes: int = 4, last_bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=1, padding=0)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3, n_classes, bias=last_bias)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.pool(torch.tanh(self.conv2(h)))
        return self.fc(h.flatten(1))


def _data(kind: str, n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 1, 8, 8)
    x = torch.randn(shape, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x, y)


def _model(kind: str, last_bias: bool = True) -> nn.Module:
    torch.manual_seed(1)
    model = MLP(last_bias=last_bias) if kind == "mlp" else CNN(last_bias=last_bias)
    return model.to(F64)


def _save_checkpoints(model: nn.Module, tmp_path) -> tuple[list[Checkpoint], list[str], dict[str, float]]:
    """Perturb the weights a few times, saving each state to its own file with an lr."""
    gen = torch.Generator().manual_seed(2)
    work = copy.deepcopy(model)
    ckpts, paths, lrs = [], [], {}
    for step, lr in enumerate(LEARNING_RATES):
        with torch.no_grad():
            for p in work.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        path = str(tmp_path / f"ckpt_{step}.pt")
        torch.save(work.state_dict(), path)
        ckpts.append(Checkpoint(path=path, learning_rate=lr, step=step))
        paths.append(path)
        lrs[path] = lr
    return ckpts, paths, lrs


def _loader_fn(lrs: dict[str, float]):
    """Captum's checkpoints_load_func: load the weights in place, return the learning rate."""

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        return lrs[path]

    return load


def _captum_cp(model, train, paths, lrs, sample_wise: bool, layers=None):
    loss = nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")
    return TracInCP(
        copy.deepcopy(model),  # Captum loads checkpoints into, and flips requires_grad on, its model
        train,
        paths,
        checkpoints_load_func=_loader_fn(lrs),
        layers=layers,
        loss_fn=loss,
        batch_size=BATCH,
        sample_wise_grads_per_batch=sample_wise,
    )


def _assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shapes {ours.shape} vs {theirs.shape}"
    # relative to the largest magnitude: influence entries can be ~0 by cancellation
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@pytest.fixture(params=["mlp", "cnn"])
def setup(request, tmp_path):
    kind = request.param
    model = _model(kind)
    ckpts, paths, lrs = _save_checkpoints(model, tmp_path)
    return kind, model, ckpts, paths, lrs, _data(kind, N_TRAIN, 3), _data(kind, N_TEST, 4)


@pytest.mark.parametrize("sample_wise", [True, False], ids=["batched-hooks", "per-row"])
def test_self_influence_matches_tracincp(setup, sample_wise):
    kind, model, ckpts, paths, lrs, train, _ = setup
    ours = TracIn(model, ckpts).self_influence(train, batch_size=BATCH)
    cap = _captum_cp(model, train, paths, lrs, sample_wise)
    theirs = cap.self_influence(DataLoader(train, batch_size=BATCH), outer_loop_by_checkpoints=True)
    assert theirs.dtype == F64
    _assert_close(ours, theirs.numpy(), f"{kind} self-influence")
    # Captum's default order (outer loop over batches) gives the same numbers
    theirs_by_batch = cap.self_influence(DataLoader(train, batch_size=BATCH))
    _assert_close(ours, theirs_by_batch.numpy(), f"{kind} self-influence (by batches)")


def test_influence_matches_tracincp(setup):
    kind, model, ckpts, paths, lrs, train, test = setup
    ours = TracIn(model, ckpts).influence(train, test, batch_size=BATCH)
    assert ours.shape == (N_TEST, N_TRAIN)
    cap = _captum_cp(model, train, paths, lrs, sample_wise=True)
    x_test, y_test = test.tensors
    theirs = cap.influence((x_test, y_test), k=None)  # influence mode: (n_test, n_train)
    assert tuple(theirs.shape) == (N_TEST, N_TRAIN)
    _assert_close(ours, theirs.numpy(), f"{kind} influence")
    # a DataLoader of test batches gives the same matrix
    theirs_loader = cap.influence(DataLoader(test, batch_size=3), k=None)
    _assert_close(ours, theirs_loader.numpy(), f"{kind} influence (test DataLoader)")


def test_proponents_match_tracincp(setup):
    kind, model, ckpts, paths, lrs, train, test = setup
    k = 5
    ours = TracIn(model, ckpts).proponents(test, train, k=k, batch_size=BATCH)
    cap = _captum_cp(model, train, paths, lrs, sample_wise=True)
    idx, scores = cap.influence(test.tensors, k=k, proponents=True)
    np.testing.assert_array_equal(ours.indices, idx.numpy(), err_msg=f"{kind} proponents")
    _assert_close(ours.scores, scores.numpy(), f"{kind} proponent scores")


def test_named_layers_match_tracincp(setup):
    kind, model, ckpts, paths, lrs, train, _ = setup
    layers = ["fc2", "fc"] if kind == "mlp" else ["conv2", "fc"]
    ours = TracIn(model, ckpts, layers=layers).self_influence(train, batch_size=BATCH)
    cap = _captum_cp(model, train, paths, lrs, sample_wise=True, layers=layers)
    theirs = cap.self_influence(DataLoader(train, batch_size=BATCH), outer_loop_by_checkpoints=True)
    _assert_close(ours, theirs.numpy(), f"{kind} self-influence of {layers}")


def test_all_three_agree_with_the_oracle(setup):
    """Tie both libraries to the exact per-row float64 autograd loop of tests/core/oracle.py."""
    kind, model, ckpts, paths, lrs, train, _ = setup
    x, y = train.tensors
    exact = oracle.self_influence(model, ckpts, x, y)
    ours = TracIn(model, ckpts).self_influence(train, batch_size=BATCH)
    theirs = _captum_cp(model, train, paths, lrs, sample_wise=True).self_influence(
        DataLoader(train, batch_size=BATCH), outer_loop_by_checkpoints=True
    )
    _assert_close(ours, exact, f"{kind}: tracin_tasks vs oracle")
    _assert_close(theirs.numpy(), exact, f"{kind}: captum vs oracle")


def _captum_fast(model, train, paths, lrs):
    return TracInCPFast(
        copy.deepcopy(model),
        "fc",
        train,
        paths,
        checkpoints_load_func=_loader_fn(lrs),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=BATCH,
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_last_layer_matches_tracincpfast_without_bias(kind, tmp_path):
    model = _model(kind, last_bias=False)
    ckpts, paths, lrs = _save_checkpoints(model, tmp_path)
    train = _data(kind, N_TRAIN, 3)
    ours = TracIn(model, ckpts, layers="last").self_influence(train, batch_size=BATCH)
    theirs = _captum_fast(model, train, paths, lrs).self_influence(
        DataLoader(train, batch_size=BATCH), outer_loop_by_checkpoints=True
    )
    _assert_close(ours, theirs.numpy(), f"{kind} last layer (no bias)")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_last_layer_vs_tracincpfast_differs_by_the_bias_term(kind, tmp_path):
    """TracInCPFast leaves out the final layer's bias; tracin_tasks' layers="last" keeps it."""
    model = _model(kind, last_bias=True)
    ckpts, paths, lrs = _save_checkpoints(model, tmp_path)
    train = _data(kind, N_TRAIN, 3)
    ours = TracIn(model, ckpts, layers="last").self_influence(train, batch_size=BATCH)
    theirs = _captum_fast(model, train, paths, lrs).self_influence(
        DataLoader(train, batch_size=BATCH), outer_loop_by_checkpoints=True
    ).numpy()
    x, y = train.tensors
    bias_term = np.zeros(N_TRAIN)
    probe = copy.deepcopy(model).eval()
    for path in paths:
        probe.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            g = torch.softmax(probe(x), 1) - F.one_hot(y, 4).to(F64)  # ∂CE/∂logits = ∂CE/∂bias
        bias_term += lrs[path] * g.pow(2).sum(1).numpy()
    assert (bias_term > 0).all()
    _assert_close(ours, theirs + bias_term, f"{kind} last layer = Captum fast + bias term")


class _ReflectCNN(nn.Module):
    """Reflect/circular padding and a LayerNorm: outside Captum's hook path (see below)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        self.norm = nn.LayerNorm(4 * 8 * 8)
        self.fc = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.tanh(self.norm(h.flatten(1))))


def test_models_outside_captums_hook_path_match_its_per_row_path(tmp_path):
    """Reflect/circular padding and LayerNorm: tracin_tasks = oracle = Captum's per-row path.

    Captum 0.9's hook path (sample_wise_grads_per_batch=True) is not usable here, and not a
    reference: it unfolds every Conv2d input with zero padding whatever ``padding_mode`` is
    (self-influence off by ~2% on such a model), silently leaves out the parameters of modules
    other than Linear/Conv2d (LayerNorm, Conv1d, ...) when ``layers=None``, and raises on
    ``padding="same"``. Its per-row path (sample_wise_grads_per_batch=False) is exact.
    """
    model = _ReflectCNN().to(F64)
    ckpts, paths, lrs = _save_checkpoints(model, tmp_path)
    train = _data("cnn", 12, 5)
    x, y = train.tensors
    exact = oracle.self_influence(model, ckpts, x, y)
    ours = TracIn(model, ckpts).self_influence(train, batch_size=5)
    per_row = _captum_cp(model, train, paths, lrs, sample_wise=False).self_influence(
        DataLoader(train, batch_size=5), outer_loop_by_checkpoints=True
    )
    _assert_close(ours, exact, "tracin_tasks vs oracle")
    _assert_close(per_row.numpy(), exact, "Captum per-row path vs oracle")
