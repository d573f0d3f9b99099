"""Every fast path of TracIn equals the per-row autograd oracle (tests/core/oracle.py).

Models are float64 and TracIn runs with ``dtype=torch.float64``, so the agreement is to rtol
1e-6; a float32 model is checked to rtol 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin_tasks import TracIn

build_checkpoints = oracle.build_checkpoints

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in=5, hidden=7, n_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class CNN2d(nn.Module):
    """(B, 2, 7, 7): reflect / circular / replicate padding, stride, dilation, groups, 'same'
    padding with an even kernel, BatchNorm2d (running stats), MaxPool, Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular")
        self.conv3 = nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="replicate", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        h = self.pool(torch.tanh(self.conv3(h)))
        return self.head(h.flatten(1))


class CNN1d(nn.Module):
    """(B, 3, 12): grouped strided Conv1d with circular padding, GroupNorm, dilated Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, stride=2, padding=1, groups=3, padding_mode="circular")
        self.gn = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv1d(6, 4, 2, dilation=2, padding=1)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x):
        h = torch.tanh(self.gn(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


class EmbedSeq(nn.Module):
    """(B, T) tokens: Embedding with padding_idx, Linear on (B, T, d), mean over T."""

    def __init__(self, vocab=10, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.seq1 = nn.Linear(d, 5)
        self.seq2 = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        h = torch.tanh(self.seq1(self.emb(tokens)))
        h = torch.tanh(self.seq2(h))
        return self.head(h.mean(1))


class Affine(nn.Module):
    """A layer TracIn has no closed form for: its own parameters, its own forward."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift.sin()


class NormGeneric(nn.Module):
    """LayerNorm plus parameters that only the torch.func path handles (PReLU, Affine)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.act = nn.PReLU(6)
        self.affine = Affine(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.affine(self.act(self.ln(self.fc1(x)))))


class GRUNet(nn.Module):
    """(B, T, 3) sequences through an nn.GRU (generic path), LayerNorm, Linear head."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(self.ln(out[:, -1]))


class RMSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.rms(self.fc1(x))))


class ReusedLinear(nn.Module):
    """One Linear called twice in forward."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)


class TiedWeights(nn.Module):
    """One Parameter in two modules: a token embedding and the output layer (LM-style)."""

    def __init__(self, vocab=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.emb(tokens))).mean(1)
        return self.head(h)


class ParentUsesChildWeight(nn.Module):
    """The parent's forward also uses ``mix.weight`` directly, outside ``mix.forward``."""

    def __init__(self, detach=False):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.detach = detach  # True: what mix's own inputs and outputs alone would give

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        w = self.mix.weight.detach() if self.detach else self.mix.weight
        h = torch.tanh(self.mix(h)) + 0.5 * F.linear(h, w)
        return self.head(h)


# --------------------------------------------------------------------------------------------
# cases: a model, a way to draw (x, y) rows, and module names for layers=[...]
# --------------------------------------------------------------------------------------------
def _features(*shape):
    def draw(n, gen):
        x = torch.randn(n, *shape, generator=gen, dtype=F64)
        y = torch.randint(0, 3, (n,), generator=gen)
        return x, y

    return draw


def _tokens(vocab, length, n_classes=3):
    def draw(n, gen):
        x = torch.randint(0, vocab, (n, length), generator=gen)
        x[0] = torch.tensor([3, 3, 3, 0, 0, 5][:length]) % vocab  # repeats and padding in one row
        x[1, :3] = vocab - 1
        y = torch.randint(0, n_classes, (n,), generator=gen)
        return x, y

    return draw


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    draw: Callable
    names: tuple[str, ...]


CASES = {
    "mlp": Case(MLP, _features(5), ("fc1", "head")),
    "cnn2d": Case(CNN2d, _features(2, 7, 7), ("conv2", "bn", "conv3")),
    "cnn1d": Case(CNN1d, _features(3, 12), ("conv1", "gn")),
    "embedding": Case(EmbedSeq, _tokens(10, 6), ("emb", "seq1")),
    "layernorm_generic": Case(NormGeneric, _features(5), ("ln", "act", "affine")),
    "gru": Case(GRUNet, _features(4, 3), ("gru", "ln")),
    "rmsnorm": Case(RMSNet, _features(5), ("rms", "fc1")),
    "reused_linear": Case(ReusedLinear, _features(5), ("shared",)),
    "tied_weights": Case(TiedWeights, _tokens(6, 5, n_classes=6), ("emb", "proj")),
    "parent_uses_child_weight": Case(ParentUsesChildWeight, _features(5), ("mix", "head")),
}

N_TRAIN, N_TEST = 16, 7
_SETUP_CACHE: dict = {}
_ORACLE_CACHE: dict = {}


def setup(name):
    """(model, checkpoints, (x_train, y_train), (x_test, y_test)) for a case; built once."""
    if name not in _SETUP_CACHE:
        case = CASES[name]
        torch.manual_seed(1)
        model = case.build().to(F64)
        ckpts = build_checkpoints(model, lrs=(0.5, 0.2, 0.05), seed=2)
        gen = torch.Generator().manual_seed(3)
        train = case.draw(N_TRAIN, gen)
        test = case.draw(N_TEST, gen)
        _SETUP_CACHE[name] = (model, ckpts, train, test)
    return _SETUP_CACHE[name]


def layers_arg(name, layers):
    return list(CASES[name].names) if layers == "names" else layers


def ref(name, kind, layers):
    """Oracle self-influence of the training rows, or the (test × train) influence matrix
    (cross-entropy); the oracle's per-row gradients are computed once per case and layers."""
    key = (name, layers)
    if key not in _ORACLE_CACHE:
        model, ckpts, (xtr, ytr), (xte, yte) = setup(name)
        lay = layers_arg(name, layers)
        si, inf = 0.0, 0.0
        for c in ckpts:
            g_train = oracle.per_row_grads(model, c.state_dict, xtr, ytr, "cross_entropy", lay)
            g_test = oracle.per_row_grads(model, c.state_dict, xte, yte, "cross_entropy", lay)
            si = si + c.learning_rate * g_train.pow(2).sum(1)
            inf = inf + c.learning_rate * (g_test @ g_train.T)
        _ORACLE_CACHE[key] = {"self": si.numpy(), "influence": inf.numpy()}
    return _ORACLE_CACHE[key][kind]


def tracin(name, layers=None, form=None, **kw):
    model, ckpts, _, _ = setup(name)
    t = TracIn(model, ckpts, layers=layers_arg(name, layers), dtype=F64, **kw)
    if form is not None:
        t._engine().form_override = form
    return t


def ds(xy):
    return TensorDataset(*xy)


FORMS = [None, "gram", "materialise"]


def _case_params(names):
    """Every case with layers=None under each form (auto / forced Gram / forced materialise),
    and with layers="last" and layers=[names] under the automatic choice."""
    out = []
    for name in names:
        for form in FORMS:
            out.append(pytest.param(name, None, form, id=f"{name}-all-form={form}"))
        for layers in ("last", "names"):
            if name == "tied_weights" and layers == "last":
                continue  # the head's weight is the embedding's: see test_tied_weight_through_second_owner
            out.append(pytest.param(name, layers, None, id=f"{name}-{layers}"))
    return out


# --------------------------------------------------------------------------------------------
# the oracle's own sanity: it is not trivially zero, and the checkpoints matter
# --------------------------------------------------------------------------------------------
def test_oracle_depends_on_checkpoints_and_rows():
    model, ckpts, (x, y), _ = setup("mlp")
    full = oracle.self_influence(model, ckpts, x, y)
    first = oracle.self_influence(model, ckpts[:1], x, y)
    assert np.all(full > 0)
    assert not np.allclose(full, first)
    assert len(np.unique(np.round(full, 10))) == len(full)


@pytest.mark.parametrize("name", ["cnn2d", "embedding", "tied_weights"])
def test_oracle_rows_add_up_to_the_batch_gradient(name):
    """The oracle's per-row gradients sum to autograd's gradient of the summed batch loss."""
    model, ckpts, (x, y), _ = setup(name)
    rows = oracle.per_row_grads(model, ckpts[1].state_dict, x, y)
    m = type(model)().to(F64).eval()
    m.load_state_dict(ckpts[1].state_dict)
    params = oracle.select(m, None)
    batch = torch.autograd.grad(F.cross_entropy(m(x), y, reduction="sum"), params)
    torch.testing.assert_close(rows.sum(0), torch.cat([g.reshape(-1) for g in batch]), rtol=1e-10, atol=1e-12)
    assert rows.shape == (N_TRAIN, oracle.gradient_size(model))


def test_oracle_layer_selection():
    mlp, _, _, _ = setup("mlp")
    assert oracle.gradient_size(mlp, "last") == 7 * 3 + 3
    assert oracle.gradient_size(mlp, ["fc1", "head"]) == (5 * 7 + 7) + (7 * 3 + 3)
    tied, _, _, _ = setup("tied_weights")
    assert [p is tied.emb.weight for p in oracle.select(tied, "last")] == [True, False]
    assert oracle.gradient_size(tied) == 6 * 4 + (4 * 4 + 4) + 6


def test_parent_use_of_child_weight_matters():
    """A layer-local computation (ignoring the parent's F.linear use) would be wrong, so the
    parent_uses_child_weight case can only pass if the engine notices."""
    model, ckpts, (x, y), _ = setup("parent_uses_child_weight")
    naive = ParentUsesChildWeight(detach=True).to(F64)
    naive.load_state_dict(model.state_dict())
    full = oracle.self_influence(model, ckpts, x, y, layers=["mix"])
    local = oracle.self_influence(naive, ckpts, x, y, layers=["mix"])
    assert not np.allclose(full, local, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# exactness on every model, every layer selection, every form
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,layers,form", _case_params(CASES))
def test_self_influence_matches_oracle(name, layers, form):
    _, _, train, _ = setup(name)
    scores = tracin(name, layers, form).self_influence(ds(train), batch_size=8)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    oracle.assert_matches(scores, ref(name, "self", layers), what=f"{name} layers={layers} form={form}")


@pytest.mark.parametrize("name,layers,form", _case_params(CASES))
def test_influence_matches_oracle(name, layers, form):
    _, _, train, test = setup(name)
    m = tracin(name, layers, form).influence(ds(train), ds(test), batch_size=8)
    assert m.shape == (N_TEST, N_TRAIN) and m.dtype == np.float64
    oracle.assert_matches(m, ref(name, "influence", layers), what=f"{name} layers={layers} form={form}")


@pytest.mark.parametrize(
    "name,form",
    [(n, None) for n in CASES] + [(n, f) for n in ("cnn2d", "embedding", "reused_linear") for f in FORMS[1:]],
)
def test_self_influence_is_diagonal_of_influence(name, form):
    _, _, train, _ = setup(name)
    t = tracin(name, None, form)
    si = t.self_influence(ds(train), batch_size=8)
    m = t.influence(ds(train), ds(train), batch_size=8)
    assert m.shape == (N_TRAIN, N_TRAIN)
    oracle.assert_matches(np.diag(m), si, what="diag(influence(train, train)) vs self_influence")
    oracle.assert_matches(si, ref(name, "self", None))
    np.testing.assert_allclose(m, m.T, rtol=1e-9, atol=1e-12 * np.abs(m).max())


@pytest.mark.parametrize("layers", ["last", ["head"]], ids=["last", "head"])
def test_tied_weight_through_second_owner(layers):
    model, ckpts, train, test = setup("tied_weights")
    t = TracIn(model, ckpts, layers=layers, dtype=F64)
    x, y = train
    oracle.assert_matches(t.self_influence(ds(train), batch_size=8), oracle.self_influence(model, ckpts, x, y, "cross_entropy", layers))


def test_generic_per_row_loop_matches_oracle():
    """The per-row autograd loop the engine falls back to when vmap cannot trace a model."""
    for name in ("layernorm_generic", "gru", "tied_weights"):
        _, _, train, test = setup(name)
        t = tracin(name)
        t._engine()._vmap_ok = False
        oracle.assert_matches(t.self_influence(ds(train), batch_size=8), ref(name, "self", None), what=name)
        oracle.assert_matches(t.influence(ds(train), ds(test), batch_size=8), ref(name, "influence", None), what=name)


# --------------------------------------------------------------------------------------------
# proponents / opponents
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "embedding", "cnn2d"])
@pytest.mark.parametrize("k", [1, 4, N_TRAIN])
def test_proponents_and_opponents_are_oracle_argsort(name, k):
    _, _, train, test = setup(name)
    t = tracin(name)
    expected = ref(name, "influence", None)
    for method, sign in ((t.proponents, -1.0), (t.opponents, 1.0)):
        top = method(ds(test), ds(train), k=k, batch_size=6)
        order = np.argsort(sign * expected, axis=1, kind="stable")[:, :k]
        assert top.indices.shape == (N_TEST, k) and top.scores.shape == (N_TEST, k)
        np.testing.assert_array_equal(top.indices, order, err_msg=method.__name__)
        oracle.assert_matches(top.scores, np.take_along_axis(expected, order, 1), what=method.__name__)
        step = np.diff(top.scores, axis=1)
        assert np.all(step <= 0) if sign < 0 else np.all(step >= 0)


# --------------------------------------------------------------------------------------------
# how the data is given does not matter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn2d", "embedding", "parent_uses_child_weight"])
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_size_does_not_matter(name, batch_size):
    _, _, train, test = setup(name)
    t = tracin(name)
    oracle.assert_matches(t.self_influence(ds(train), batch_size=batch_size), ref(name, "self", None))
    oracle.assert_matches(t.influence(ds(train), ds(test), batch_size=batch_size), ref(name, "influence", None))


@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_dataloader_equals_dataset(name):
    _, _, train, test = setup(name)
    t = tracin(name)
    train_dl = DataLoader(ds(train), batch_size=6, shuffle=False)
    test_dl = DataLoader(ds(test), batch_size=4, shuffle=False)
    from_dl = t.self_influence(train_dl)
    oracle.assert_matches(from_dl, ref(name, "self", None))
    np.testing.assert_allclose(from_dl, t.self_influence(ds(train), batch_size=5), rtol=1e-12)
    m = t.influence(train_dl, test_dl)
    oracle.assert_matches(m, ref(name, "influence", None))
    np.testing.assert_allclose(m, t.influence(ds(train), ds(test), batch_size=5), rtol=1e-10, atol=1e-13 * np.abs(m).max())


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
class Regressor(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.head = nn.Linear(6, n_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("n_out,y_shape", [(2, (2,)), (1, ()), (1, (1,))], ids=["2d", "1d-flat", "1d"])
def test_mse_regression_matches_oracle(n_out, y_shape):
    torch.manual_seed(4)
    model = Regressor(n_out).double()
    ckpts = build_checkpoints(model, lrs=(0.3, 0.1))
    gen = torch.Generator().manual_seed(5)
    x, xt = torch.randn(17, 4, generator=gen, dtype=F64), torch.randn(6, 4, generator=gen, dtype=F64)
    y, yt = torch.randn(17, *y_shape, generator=gen, dtype=F64), torch.randn(6, *y_shape, generator=gen, dtype=F64)
    t = TracIn(model, ckpts, loss="mse", dtype=F64)
    oracle.assert_matches(t.self_influence(TensorDataset(x, y), batch_size=5), oracle.self_influence(model, ckpts, x, y, "mse"))
    oracle.assert_matches(
        t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=5),
        oracle.influence(model, ckpts, x, y, xt, yt, "mse"),
    )


def _weighted_ce(outputs, targets):
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=outputs.dtype)
    return F.cross_entropy(outputs, targets, weight=weights, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(reduction="none"), _weighted_ce], ids=["module", "function"])
@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_callable_loss_matches_oracle(name, loss):
    model, ckpts, (x, y), (xt, yt) = setup(name)
    t = TracIn(model, ckpts, loss=loss, dtype=F64)
    oracle.assert_matches(t.self_influence(TensorDataset(x, y), batch_size=8), oracle.self_influence(model, ckpts, x, y, loss))
    oracle.assert_matches(
        t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=8),
        oracle.influence(model, ckpts, x, y, xt, yt, loss),
    )
    if loss is _weighted_ce:  # the custom loss really is different from plain cross-entropy
        assert not np.allclose(oracle.self_influence(model, ckpts, x, y, loss), ref(name, "self", None))


class Tagger(nn.Module):
    """Per-token classes: outputs (B, C, T) for labels (B, T)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4, padding_idx=1)
        self.conv = nn.Conv1d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        h = torch.tanh(self.conv(self.emb(tokens).transpose(1, 2))).transpose(1, 2)
        return self.head(h).transpose(1, 2)


def test_cross_entropy_per_token_sums_over_positions():
    torch.manual_seed(6)
    model = Tagger().double()
    ckpts = build_checkpoints(model, lrs=(0.3, 0.1))
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 8, (12, 5), generator=gen), torch.randint(0, 3, (12, 5), generator=gen)
    xt, yt = torch.randint(0, 8, (5, 5), generator=gen), torch.randint(0, 3, (5, 5), generator=gen)
    t = TracIn(model, ckpts, dtype=F64)
    oracle.assert_matches(t.self_influence(TensorDataset(x, y), batch_size=5), oracle.self_influence(model, ckpts, x, y))
    oracle.assert_matches(
        t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=5), oracle.influence(model, ckpts, x, y, xt, yt)
    )


# --------------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn2d", "cnn1d", "embedding", "layernorm_generic"])
def test_float32_model_matches_float64_oracle(name):
    case = CASES[name]
    torch.manual_seed(1)
    model = case.build()  # float32
    ckpts = build_checkpoints(model, lrs=(0.5, 0.2, 0.05), seed=2)
    gen = torch.Generator().manual_seed(3)
    (x, y), (xt, yt) = case.draw(N_TRAIN, gen), case.draw(N_TEST, gen)
    x, xt = (v.float() if v.is_floating_point() else v for v in (x, xt))
    t = TracIn(model, ckpts)
    si = t.self_influence(TensorDataset(x, y), batch_size=8)
    m = t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=8)
    assert si.dtype == np.float64 and m.dtype == np.float64
    oracle.assert_matches(si, oracle.self_influence(model, ckpts, x, y), rtol=1e-4, atol_frac=1e-5)
    oracle.assert_matches(m, oracle.influence(model, ckpts, x, y, xt, yt), rtol=1e-4, atol_frac=1e-4)
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# random projection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn2d", "embedding", "layernorm_generic"])
def test_projection_at_least_gradient_size_is_exact(name):
    model, _, train, test = setup(name)
    dim = oracle.gradient_size(model)
    for d in (dim, dim + 13):
        m = tracin(name, projection_dim=d, seed=7).influence(ds(train), ds(test), batch_size=8)
        oracle.assert_matches(m, ref(name, "influence", None), what=f"projection_dim={d}")


@pytest.mark.parametrize("name", ["mlp", "embedding", "cnn1d"])
def test_small_projection_is_unbiased_and_seeded(name):
    model, _, train, test = setup(name)
    exact = ref(name, "influence", None).ravel()
    dim = 4  # every weight matrix and most biases are sketched
    assert dim < oracle.gradient_size(model) // 20
    runs = [tracin(name, projection_dim=dim, seed=s).influence(ds(train), ds(test), batch_size=8) for s in range(12)]
    single = [np.corrcoef(r.ravel(), exact)[0, 1] for r in runs]
    mean = np.corrcoef(np.mean(runs, 0).ravel(), exact)[0, 1]
    # noisy per seed, centred on the exact value: averaging seeds converges to it
    assert mean > 0.9, (mean, single)
    assert mean > np.median(single), (mean, single)
    assert not np.allclose(runs[0].ravel(), exact, rtol=1e-2)  # it really is an estimate
    assert not np.allclose(runs[0], runs[1], rtol=1e-2)  # seeds differ
    again = tracin(name, projection_dim=dim, seed=0).influence(ds(train), ds(test), batch_size=5)
    np.testing.assert_allclose(again, runs[0], rtol=1e-10, atol=1e-12 * np.abs(runs[0]).max())
