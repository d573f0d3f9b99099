"""Models as frameworks build them, against the float64 per-row autograd loop.

* a Hugging Face ``BertForSequenceClassification`` (eager and sdpa attention) fed dicts
  (``input_ids``, ``attention_mask`` with padding, ``token_type_ids``) and returning a
  ``SequenceClassifierOutput``: every parameter is Linear, LayerNorm or Embedding, so none may be
  left to the generic path and the slow-path warning must not fire;
* models whose position embedding is called with an index made inside ``forward`` (shape
  ``(1, L)``, or ``(L,)`` without a batch dim) and that return a dict or a tuple;
* an ``nn.Embedding`` text model fed int64 token columns through :class:`TrainingTable`
  (a dict of sequences, and one column per token), with the planning preflight on the same rows;
* torchvision's ResNet-18 itself: tests/core/test_resnet18.py (in the vision environment where needed).

The reference here is a per-row loop of its own (``model(**row)`` for dict rows), in float64.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import oracle
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracin_tasks import TracIn
from tracin_tasks.core.data import TensorDictDataset
from tracin_tasks.core.preflight import check_labels_fit
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import LabelOutOfRangeError

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# the reference: one row at a time, float64, any input structure, any output structure
# --------------------------------------------------------------------------------------------
def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "logits"):
        return out["logits"] if isinstance(out, dict) else out.logits
    return out[0]


def _row(inputs, i):
    if isinstance(inputs, dict):
        return (), {k: v[i : i + 1] for k, v in inputs.items()}
    return (inputs[i : i + 1],), {}


def per_row_grads(model, state_dict, inputs, y):
    """``(n, D)`` float64 gradients of each row's cross-entropy, every trainable parameter."""
    m = copy.deepcopy(model).to(F64).eval()
    m.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state_dict.items()})
    params = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(y.shape[0]):
        args, kwargs = _row(inputs, i)
        loss = F.cross_entropy(_logits(m(*args, **kwargs)), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def reference(model, ckpts, inputs, y, test=None):
    """Self-influence of the rows, and (given ``test=(inputs, y)``) the test × train influence."""
    si, inf = 0.0, 0.0
    for c in ckpts:
        g = per_row_grads(model, c.state_dict, inputs, y)
        si = si + c.learning_rate * g.pow(2).sum(1)
        if test is not None:
            inf = inf + c.learning_rate * (per_row_grads(model, c.state_dict, *test) @ g.T)
    return si.numpy(), (inf.numpy() if test is not None else None)


@pytest.fixture
def warnings_logged(caplog):
    """The WARNING records tracin_tasks logs during the test."""
    caplog.set_level(logging.WARNING, logger="tracin_tasks")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("tracin_tasks")]


# --------------------------------------------------------------------------------------------
# Hugging Face BERT
# --------------------------------------------------------------------------------------------
def _bert(attn: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    assert model.config._attn_implementation == attn
    return model


def _bert_rows(n: int, length: int, seed: int, token_types: bool = True) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, keep in enumerate([length, length - 3, length - 5, length, length - 1, length][:n]):
        mask[i, keep:] = 0
        ids[i, keep:] = 0  # the pad token: BERT's word embedding has padding_idx=0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        types = torch.zeros(n, length, dtype=torch.long)
        types[:, length // 2 :] = 1
        inputs["token_type_ids"] = types
    return inputs, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_dict_rows_match_the_float64_loop(attn, warnings_logged):
    model = _bert(attn)
    kinds = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds == {nn.Linear, nn.LayerNorm, nn.Embedding}
    ckpts = oracle.build_checkpoints(model, lrs=(0.1, 0.02), seed=1, scale=0.05)
    train, y = _bert_rows(5, 10, seed=2)
    test, yt = _bert_rows(3, 10, seed=3)
    expected_si, expected_inf = reference(model, ckpts, train, y, test=(test, yt))

    tracin = TracIn(model, ckpts, dtype=F64)
    si = tracin.self_influence(TensorDictDataset(train, y), batch_size=3)
    assert tracin._engine().fallback_names == []
    oracle.assert_matches(si, expected_si, rtol=1e-8, what=f"BERT {attn} self-influence")
    inf = tracin.influence(TensorDictDataset(train, y), TensorDictDataset(test, yt), batch_size=4)
    oracle.assert_matches(inf, expected_inf, rtol=1e-8, what=f"BERT {attn} influence")
    top = tracin.proponents(TensorDictDataset(test, yt), TensorDictDataset(train, y), k=2, batch_size=2)
    np.testing.assert_array_equal(top.indices, np.argsort(-expected_inf, axis=1, kind="stable")[:, :2])

    (first, _) = list(tracin.checkpoint_passes(TensorDictDataset(train, y), batch_size=3))
    with torch.no_grad():
        m = copy.deepcopy(model).double()
        m.load_state_dict(ckpts[0].state_dict)
        logits = m(**train).logits
    np.testing.assert_allclose(first.loss, F.cross_entropy(logits, y, reduction="none").numpy(), rtol=1e-10)
    np.testing.assert_array_equal(first.predicted, logits.argmax(1).numpy())

    # float32, as models are trained: the key projection's bias has a gradient that is zero but
    # for rounding (softmax ignores it); the first-batch check must not send it to the slow path
    tracin32 = TracIn(model, ckpts)
    si32 = tracin32.self_influence(TensorDictDataset(train, y), batch_size=3)
    assert tracin32._engine().fallback_names == []
    oracle.assert_matches(si32, expected_si, rtol=1e-3, atol_frac=1e-5, what=f"BERT {attn} float32")
    assert warnings_logged() == []


def test_bert_without_token_type_ids_uses_the_buffered_ids(warnings_logged):
    """Without token_type_ids BERT expands a buffer of zeros to the batch; position ids are a
    ``(1, L)`` slice of a buffer, shared by every row."""
    model = _bert("sdpa")
    ckpts = oracle.build_checkpoints(model, lrs=(0.1, 0.02), seed=4, scale=0.05)
    rows, y = _bert_rows(6, 8, seed=5, token_types=False)
    tracin = TracIn(model, ckpts, dtype=F64)
    si = tracin.self_influence(TensorDictDataset(rows, y), batch_size=4)
    assert tracin._engine().fallback_names == []
    oracle.assert_matches(si, reference(model, ckpts, rows, y)[0], rtol=1e-8, what="BERT, no token_type_ids")
    assert warnings_logged() == []


def test_bert_position_embedding_gradient_is_per_row():
    """The (1, L) position ids give a gradient summed over the batch unless expanded: the score
    of a row must not depend on the rows batched with it."""
    model = _bert("eager")
    ckpts = oracle.build_checkpoints(model, lrs=(0.1,), seed=6, scale=0.05)
    rows, y = _bert_rows(4, 8, seed=7)
    tracin = TracIn(model, ckpts, layers=["bert.embeddings.position_embeddings"], dtype=F64)
    together = tracin.self_influence(TensorDictDataset(rows, y), batch_size=4)
    alone = tracin.self_influence(TensorDictDataset(rows, y), batch_size=1)
    np.testing.assert_allclose(together, alone, rtol=1e-10)
    assert tracin._engine().fallback_names == []


# --------------------------------------------------------------------------------------------
# index tensors made inside forward; dict and tuple outputs
# --------------------------------------------------------------------------------------------
class PositionalText(nn.Module):
    """Token + position embeddings, masked mean pool, Linear head. ``pos`` is called with
    ``arange(L)`` (no batch dim) or ``arange(L)[None]`` (batch dim 1); returns a dict or a tuple."""

    def __init__(self, unbatched: bool, vocab=20, d=6):
        super().__init__()
        self.unbatched = unbatched
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(16, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.ln(self.tok(input_ids) + self.pos(positions if self.unbatched else positions[None]))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head(torch.tanh((h * m).sum(1) / m.sum(1)))
        return {"logits": logits, "hidden": h} if self.unbatched else (logits, h)


@pytest.mark.parametrize("unbatched", [True, False], ids=["arange(L)", "arange(L)[None]"])
@pytest.mark.parametrize("batch_size", [4, 6], ids=["batch!=L", "batch==L"])
def test_position_ids_made_in_forward(unbatched, batch_size, warnings_logged):
    torch.manual_seed(8)
    model = PositionalText(unbatched).to(F64)
    ckpts = oracle.build_checkpoints(model, lrs=(0.3, 0.1), seed=9)
    gen = torch.Generator().manual_seed(10)
    n, length = 10, 6
    rows = {"input_ids": torch.randint(1, 20, (n, length), generator=gen),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}
    rows["attention_mask"][1, 4:] = 0
    rows["input_ids"][1, 4:] = 0
    y = torch.randint(0, 3, (n,), generator=gen)
    expected = reference(model, ckpts, rows, y)[0]
    tracin = TracIn(model, ckpts, dtype=F64)
    oracle.assert_matches(tracin.self_influence(TensorDictDataset(rows, y), batch_size=batch_size), expected)
    fallback = tracin._engine().fallback_names
    if unbatched and batch_size == length:
        # a (6,) index in a batch of 6 reads as one token per row: the row check sees it is not
        assert fallback == ["pos.weight"] and any("pos" in w for w in warnings_logged())
    else:
        assert fallback == [] and warnings_logged() == []


# --------------------------------------------------------------------------------------------
# an Embedding text model fed int64 token columns through TrainingTable
# --------------------------------------------------------------------------------------------
class BagOfTokens(nn.Module):
    """nn.Embedding, mean over the (unmasked) tokens, Linear head."""

    def __init__(self, vocab=30, d=5, n_classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is None:
            return self.head(h.mean(1))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _token_frame(n=9, length=5, seed=11) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, (n, length))
    ids[0] = [4, 4, 4, 7, 7]  # repeated tokens in one row
    mask = np.ones((n, length), dtype=np.int64)
    mask[2, 3:] = 0
    ids[2, 3:] = 0
    return pd.DataFrame({
        "row_id": [f"r{i}" for i in range(n)],
        "label": rng.integers(0, 4, n).astype(np.int64),
        "input_ids": [list(map(int, r)) for r in ids],  # lists, as a tokenizer writes them
        "attention_mask": list(mask),  # numpy arrays, as parquet reads them back
    })


def test_token_sequences_through_training_table(tmp_path):
    frame = _token_frame()
    torch.manual_seed(12)
    model = BagOfTokens().to(F64)
    ckpts = oracle.build_checkpoints(model, lrs=(0.4, 0.1), seed=13)
    table = TrainingTable.from_frame(frame)
    ds = table.dataset()
    x, y = ds[[0, 1]]
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].dtype == torch.int64
    check_labels_fit(model, table.inputs(slice(0, 1)), table.labels, table.row_ids, "cross_entropy", "run-1")

    inputs = {k: torch.tensor(np.stack(frame[k].map(np.asarray))) for k in ("input_ids", "attention_mask")}
    expected = reference(model, ckpts, inputs, torch.tensor(frame["label"].to_numpy()))[0]
    tracin = TracIn(model, ckpts, dtype=F64)
    oracle.assert_matches(tracin.self_influence(ds, batch_size=4), expected, what="dict of token sequences")
    assert tracin._engine().fallback_names == []
    # a DataLoader collates the ({name: tensor}, label) rows itself
    oracle.assert_matches(tracin.self_influence(DataLoader(ds, batch_size=3)), expected, what="DataLoader of dict rows")

    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    again = TrainingTable.from_frame(pd.read_parquet(tmp_path / "rows.parquet"))
    assert again.fingerprint() == table.fingerprint()
    oracle.assert_matches(tracin.self_influence(again.dataset(), batch_size=5), expected, what="read back from parquet")

    bad = frame.copy()
    bad.loc[3, "label"] = 7
    with pytest.raises(LabelOutOfRangeError, match=r"r3"):
        t = TrainingTable.from_frame(bad)
        check_labels_fit(model, t.inputs(slice(0, 1)), t.labels, t.row_ids, "cross_entropy", "run-1")


def test_one_token_column_each_through_training_table():
    seq = _token_frame()
    ids = np.stack(seq["input_ids"].map(np.asarray))
    frame = pd.DataFrame({f"t{j}": ids[:, j] for j in range(ids.shape[1])})
    frame.insert(0, "label", seq["label"])
    frame.insert(0, "row_id", seq["row_id"])
    torch.manual_seed(14)
    model = BagOfTokens().to(F64)
    ckpts = oracle.build_checkpoints(model, lrs=(0.4, 0.1), seed=15)
    table = TrainingTable.from_frame(frame)
    assert table.inputs().dtype == np.int64 and table.features().dtype == np.float32
    ds = table.dataset()
    assert isinstance(ds, TensorDataset) and ds.tensors[0].dtype == torch.int64
    check_labels_fit(model, table.inputs(slice(0, 1)), table.labels, table.row_ids, "cross_entropy", "run-1")
    expected = oracle.self_influence(model, ckpts, torch.as_tensor(ids), torch.tensor(frame["label"].to_numpy()))
    tracin = TracIn(model, ckpts, dtype=F64)
    oracle.assert_matches(tracin.self_influence(ds, batch_size=4), expected, what="one token per column")
    assert tracin._engine().fallback_names == []


# --------------------------------------------------------------------------------------------
# torchvision's ResNet-18, and its basic block without torchvision
# --------------------------------------------------------------------------------------------
class BasicBlockNet(nn.Module):
    """torchvision's pattern: conv -> BatchNorm2d -> ReLU(inplace=True), a residual add, pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        out += h
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_outputs_changed_in_place_downstream(warnings_logged):
    """The BatchNorm outputs are overwritten by the in-place ReLU (and ``out += h``) before the
    backward pass; the gradient must still be the one to the layer's own output."""
    torch.manual_seed(16)
    model = BasicBlockNet().to(F64).eval()
    ckpts = oracle.build_checkpoints(model, lrs=(0.2, 0.05), seed=17)
    gen = torch.Generator().manual_seed(18)
    x, y = torch.randn(7, 3, 6, 6, generator=gen, dtype=F64), torch.randint(0, 5, (7,), generator=gen)
    tracin = TracIn(model, ckpts, dtype=F64)
    expected = oracle.self_influence(model, ckpts, x, y)
    oracle.assert_matches(tracin.self_influence(TensorDataset(x, y), batch_size=4), expected)
    assert tracin._engine().fallback_names == []
    assert warnings_logged() == []
