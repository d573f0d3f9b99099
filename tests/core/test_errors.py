"""Bad input gives the typed errors of tracin_tasks.exceptions, with messages that say what."""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin_tasks import Checkpoint, TracIn
from tracin_tasks import exceptions as E

F64 = torch.float64


class Net(nn.Module):
    def __init__(self, n_classes=3):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, n_classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ParentUsesChildWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.mix(h)) + 0.5 * F.linear(h, self.mix.weight))


@pytest.fixture
def net(make_checkpoints):
    torch.manual_seed(0)
    model = Net().to(F64)
    return model, make_checkpoints(model, lrs=(0.3, 0.1))


def _data(n=16, seed=1, n_classes=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=F64), torch.randint(0, n_classes, (n,), generator=gen)


def _ds(n=16, seed=1):
    return TensorDataset(*_data(n, seed))


# --------------------------------------------------------------------------------------------
# the hierarchy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,builtin",
    [
        (E.ConfigurationError, ValueError),
        (E.CheckpointError, ValueError),
        (E.CheckpointNotFoundError, FileNotFoundError),
        (E.CheckpointNotFoundError, E.CheckpointError),
        (E.StateDictMismatchError, KeyError),
        (E.StateDictMismatchError, E.CheckpointError),
        (E.LayerNotFoundError, KeyError),
        (E.UnsupportedModelError, TypeError),
        (E.DataError, ValueError),
        (E.EmptyDatasetError, E.DataError),
        (E.LabelOutOfRangeError, E.DataError),
        (E.LossError, ValueError),
        (E.NonFiniteGradientError, ArithmeticError),
        (E.UnsafeCheckpointError, E.CheckpointError),
        (E.NoCheckpointsError, E.CheckpointError),
    ],
    ids=lambda v: v.__name__,
)
def test_exception_inherits_builtin(cls, builtin):
    assert issubclass(cls, builtin)
    assert issubclass(cls, E.TracInError)


def test_key_error_subclasses_keep_readable_messages():
    # KeyError's str() would repr() the message (quotes, escaped newlines)
    assert str(E.LayerNotFoundError("Layer 'x' does not exist")) == "Layer 'x' does not exist"
    assert str(E.StateDictMismatchError("missing keys ['a']")) == "missing keys ['a']"


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _mangled(sd, how):
    sd = dict(sd)
    if how == "missing":
        del sd["fc1.bias"]
        return sd, ["missing", "fc1.bias"]
    if how == "unexpected":
        sd["fc3.weight"] = torch.zeros(2, 2, dtype=F64)
        return sd, ["unexpected", "fc3.weight"]
    sd["fc2.weight"] = torch.zeros(7, 5, dtype=F64)
    return sd, ["shape", "fc2.weight", "(7, 5)", "(3, 5)"]


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape"])
def test_state_dict_that_does_not_fit(net, how):
    model, ckpts = net
    sd, words = _mangled(ckpts[1].state_dict, how)
    with pytest.raises(E.StateDictMismatchError) as info:
        TracIn(model, [ckpts[0], Checkpoint(state_dict=sd, learning_rate=0.1, step=7)])
    msg = str(info.value)
    for word in words + ["step 7"]:
        assert word in msg, msg


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape"])
def test_state_dict_file_that_does_not_fit(net, how, tmp_path):
    model, ckpts = net
    sd, words = _mangled(ckpts[0].state_dict, how)
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    t = TracIn(model, [Checkpoint(path=path, learning_rate=0.1, step=4)])  # files are read when used
    with pytest.raises(E.StateDictMismatchError) as info:
        t.self_influence(_ds())
    for word in words + ["step 4"]:
        assert word in str(info.value), str(info.value)


def test_no_checkpoints(net):
    model, _ = net
    with pytest.raises(E.CheckpointError, match="(?i)no checkpoints"):
        TracIn(model, [])


def test_checkpoint_list_of_wrong_things(net):
    model, ckpts = net
    with pytest.raises(E.CheckpointError, match=r"checkpoints\[1\]"):
        TracIn(model, [ckpts[0], ckpts[1].state_dict])


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf])
def test_non_finite_learning_rate(net, lr):
    _, ckpts = net
    with pytest.raises(E.CheckpointError) as info:
        Checkpoint(state_dict=ckpts[0].state_dict, learning_rate=lr, step=5)
    assert "non-finite" in str(info.value) and "step=5" in str(info.value)


def test_learning_rate_that_is_not_a_number(net):
    _, ckpts = net
    with pytest.raises(E.CheckpointError, match="not a number"):
        Checkpoint(state_dict=ckpts[0].state_dict, learning_rate="fast")


def test_checkpoint_needs_exactly_one_source(net, tmp_path):
    _, ckpts = net
    with pytest.raises(E.CheckpointError, match="neither"):
        Checkpoint(learning_rate=0.1)
    with pytest.raises(E.CheckpointError, match="both"):
        Checkpoint(state_dict=ckpts[0].state_dict, path=tmp_path / "x.pt", learning_rate=0.1)


UNPICKLED: list[str] = []


def _record(tag):
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this runs code (_record); a safe loader must refuse it."""

    def __reduce__(self):
        return (_record, ("payload ran",))


def test_pickled_custom_object_is_refused(net, tmp_path):
    model, ckpts = net
    path = tmp_path / "evil.pt"
    torch.save({**ckpts[0].state_dict, "extra": Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(E.CheckpointError) as info:
        Checkpoint(path=path, learning_rate=0.1, step=2).load_state_dict()
    assert str(path) in str(info.value) and "weights_only" in str(info.value)
    assert UNPICKLED == []
    t = TracIn(model, [Checkpoint(path=path, learning_rate=0.1)])
    with pytest.raises(E.CheckpointError):
        t.self_influence(_ds())
    assert UNPICKLED == []


def test_checkpoint_file_holding_a_model_not_a_state_dict(net, tmp_path):
    _, ckpts = net
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(E.CheckpointError, match="state_dict"):
        Checkpoint(path=path).load_state_dict()


def test_checkpoint_file_with_a_plain_state_dict_works(net, tmp_path):
    model, ckpts = net
    files = []
    for c in ckpts:
        path = tmp_path / f"step{c.step}.pt"
        torch.save(c.state_dict, path)
        files.append(Checkpoint(path=str(path), learning_rate=c.learning_rate, step=c.step))
    loaded = files[1].load_state_dict()
    assert set(loaded) == set(ckpts[1].state_dict)
    for k, v in ckpts[1].state_dict.items():
        assert torch.equal(loaded[k], v)
    x, y = _data()
    scores = TracIn(model, files, dtype=F64).self_influence(TensorDataset(x, y), batch_size=5)
    oracle.assert_matches(scores, oracle.self_influence(model, ckpts, x, y))  # oracle from memory


def test_missing_checkpoint_file(net, tmp_path):
    model, _ = net
    path = tmp_path / "nowhere" / "step3.pt"
    ckpt = Checkpoint(path=path, learning_rate=0.1, step=3)
    with pytest.raises(E.CheckpointNotFoundError) as info:
        ckpt.load_state_dict()
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value) and "step 3" in str(info.value)
    with pytest.raises(E.CheckpointNotFoundError):
        TracIn(model, [ckpt]).self_influence(_ds())


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_empty_dataset(net):
    model, ckpts = net
    empty = TensorDataset(torch.empty(0, 4, dtype=F64), torch.empty(0, dtype=torch.long))
    t = TracIn(model, ckpts)
    with pytest.raises(E.EmptyDatasetError, match="no rows"):
        t.self_influence(empty)
    with pytest.raises(E.EmptyDatasetError, match="training data"):
        t.influence(empty, _ds())
    with pytest.raises(E.EmptyDatasetError, match="test data"):
        t.influence(_ds(), empty)
    with pytest.raises(E.EmptyDatasetError):
        t.proponents(empty, _ds())


@pytest.mark.parametrize("batch_size,bad,named", [(100, {4: 3, 13: -1}, "[4, 13]"), (5, {13: 7}, "[13]")])
def test_labels_outside_the_classes(net, batch_size, bad, named):
    model, ckpts = net
    x, y = _data()
    for row, label in bad.items():
        y[row] = label
    with pytest.raises(E.LabelOutOfRangeError) as info:
        TracIn(model, ckpts).self_influence(TensorDataset(x, y), batch_size=batch_size)
    msg = str(info.value)
    assert f"rows {named}" in msg and "3 classes" in msg, msg
    for label in bad.values():
        assert str(label) in msg


def test_labels_outside_the_classes_in_test_data(net):
    model, ckpts = net
    x, y = _data(8)
    y[6] = 3
    with pytest.raises(E.LabelOutOfRangeError, match=r"rows \[6\]"):
        TracIn(model, ckpts).influence(_ds(), TensorDataset(x, y), batch_size=4)


def test_float_labels_for_cross_entropy(net):
    model, ckpts = net
    x, y = _data()
    with pytest.raises(E.DataError, match="integers"):
        TracIn(model, ckpts).self_influence(TensorDataset(x, y.double()))


def test_unknown_layer_name(net):
    model, ckpts = net
    with pytest.raises(E.LayerNotFoundError) as info:
        TracIn(model, ckpts, layers=["fc1", "fc22"])
    msg = str(info.value)
    assert "'fc22'" in msg and "Did you mean" in msg and "'fc2'" in msg, msg
    assert isinstance(info.value, KeyError)


def test_unknown_loss_name(net):
    model, ckpts = net
    with pytest.raises(E.ConfigurationError, match="cross_entropy"):
        TracIn(model, ckpts, loss="hinge")


@pytest.mark.parametrize(
    "loss,words",
    [
        (lambda out, y: F.cross_entropy(out, y), ["single value", "reduction='none'"]),
        (lambda out, y: F.cross_entropy(out, y, reduction="none")[:, None], ["shape", "one loss per row"]),
    ],
    ids=["scalar", "wrong-shape"],
)
def test_loss_callable_not_per_row(net, loss, words):
    model, ckpts = net
    with pytest.raises(E.LossError) as info:
        TracIn(model, ckpts, loss=loss).self_influence(_ds())
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs,word", [({"shuffle": True}, "shuffle"), ({"drop_last": True}, "drop_last")])
def test_dataloader_that_would_reorder_or_skip_rows(net, kwargs, word):
    model, ckpts = net
    bad = DataLoader(_ds(), batch_size=5, **kwargs)
    t = TracIn(model, ckpts)
    with pytest.raises(E.ConfigurationError, match=word):
        t.self_influence(bad)
    with pytest.raises(E.ConfigurationError, match=f"(?s)training data.*{word}|{word}.*training data"):
        t.influence(bad, _ds())
    with pytest.raises(E.ConfigurationError, match=f"(?s)test data.*{word}|{word}.*test data"):
        t.influence(_ds(), bad)


def test_batch_norm_without_running_stats(make_checkpoints):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3))
    with pytest.raises(E.UnsupportedModelError) as info:
        TracIn(model, make_checkpoints(model)).self_influence(_ds(), batch_size=8)
    msg = str(info.value)
    assert "'1'" in msg and "BatchNorm1d" in msg and "running" in msg, msg


# --------------------------------------------------------------------------------------------
# non-finite gradients
# --------------------------------------------------------------------------------------------
def _with_nan_rows(rows, n=16, seed=1):
    x, y = _data(n, seed)
    for r in rows:
        x[r, 1] = math.nan
    return x, y


def test_nonfinite_rows_raise_with_their_positions(net):
    model, ckpts = net
    x, y = _with_nan_rows([3, 11])
    t = TracIn(model, ckpts, dtype=F64)
    with pytest.raises(E.NonFiniteGradientError) as info:
        t.self_influence(TensorDataset(x, y), batch_size=5)
    assert info.value.rows == [3, 11]
    assert "[3, 11]" in str(info.value) and "on_nonfinite" in str(info.value)
    with pytest.raises(E.NonFiniteGradientError) as info:
        t.influence(TensorDataset(x, y), _ds(6, seed=2), batch_size=5)
    assert info.value.rows == [3]  # the first training batch that holds one (rows 0-4)


def test_nonfinite_test_rows_raise_with_their_positions(net):
    model, ckpts = net
    xt, yt = _with_nan_rows([2], n=7, seed=3)
    with pytest.raises(E.NonFiniteGradientError) as info:
        TracIn(model, ckpts).influence(_ds(), TensorDataset(xt, yt), batch_size=5)
    assert info.value.rows == [2] and "test rows" in str(info.value)


def test_single_nonfinite_test_row_is_the_one_blamed(net):
    model, ckpts = net
    xt, yt = _with_nan_rows([0], n=1, seed=3)
    with pytest.raises(E.NonFiniteGradientError) as info:
        TracIn(model, ckpts).influence(_ds(), TensorDataset(xt, yt), batch_size=5)
    assert info.value.rows == [0] and "test rows" in str(info.value)


def test_nonfinite_rows_scored_nan_on_request(net):
    model, ckpts = net
    x, y = _with_nan_rows([3, 11])
    xt, yt = _data(6, seed=2)
    clean = [i for i in range(16) if i not in (3, 11)]
    t = TracIn(model, ckpts, dtype=F64, on_nonfinite="nan")
    scores = t.self_influence(TensorDataset(x, y), batch_size=5)
    assert np.isnan(scores[[3, 11]]).all()
    oracle.assert_matches(scores[clean], oracle.self_influence(model, ckpts, x[clean], y[clean]))
    m = t.influence(TensorDataset(x, y), TensorDataset(xt, yt), batch_size=5)
    assert np.isnan(m[:, [3, 11]]).all()
    oracle.assert_matches(m[:, clean], oracle.influence(model, ckpts, x[clean], y[clean], xt, yt))


def test_nan_row_in_first_batch_does_not_hide_outside_weight_use(make_checkpoints):
    torch.manual_seed(0)
    model = ParentUsesChildWeight().to(F64)
    ckpts = make_checkpoints(model, lrs=(0.3, 0.1))
    x, y = _with_nan_rows([0])
    scores = TracIn(model, ckpts, dtype=F64, on_nonfinite="nan").self_influence(TensorDataset(x, y), batch_size=5)
    assert np.isnan(scores[0])
    oracle.assert_matches(scores[1:], oracle.self_influence(model, ckpts, x[1:], y[1:]))


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"dtype": torch.int64}, "dtype"),
        ({"layers": []}, "layers"),
    ],
)
def test_bad_settings(net, kwargs, word):
    model, ckpts = net
    with pytest.raises(E.ConfigurationError, match=word):
        TracIn(model, ckpts, **kwargs)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(net, batch_size):
    model, ckpts = net
    with pytest.raises(E.ConfigurationError, match="batch_size"):
        TracIn(model, ckpts).self_influence(_ds(), batch_size=batch_size)


def test_bad_k(net):
    model, ckpts = net
    with pytest.raises(E.ConfigurationError, match="k must"):
        TracIn(model, ckpts).proponents(_ds(4), _ds(), k=0)
