"""How many wrong labels does the audit find, and is it better than the alternatives?

    python benchmarks/bench_detection.py [--quick] [--seeds 0 1 2] [--rates 0.05 0.1 0.2]
        [--datasets digits wine breast_cancer] [--json PATH] [--plot PATH] [--jobs N]

Data: scikit-learn's bundled digits (1,797 8×8 images, 10 classes; a small CNN, the main case),
wine (178 rows, 13 features, 3 classes) and breast cancer (569 rows, 30 features, 2 classes;
both with standardised features and an MLP). A share of the labels (``--rates``) is flipped,
with the flipped rows recorded, in two ways:

- **uniform**: to one of the other classes, chosen uniformly;
- **confusable**: to the class a clean model most confuses with the true one — the other
  class with the highest mean 5-fold cross-validated probability on the clean labels, from
  the same architecture (for breast cancer, with two classes, this is the uniform flip and is
  not run twice).

Each setting is trained twice with SGD (momentum 0.9, cosine decay; the recipe of
``tracin_tasks.examples.digits``; the model's initialisation, the batches and the flipped rows
follow the seed), keeping a checkpoint (state_dict + learning rate) after every
epoch in memory: a **short** run, and a **long** run in which the network memorises the flipped
labels (the share of flipped rows whose given label the final model predicts is reported).

Methods (no method but cleanlab trains anything extra):

- TracIn self-influence through the project's ``TracIn`` API: all layers over all checkpoints;
  ``layers="last"``; the final checkpoint only; every k-th checkpoint (counted back from the
  last, as the audit's ``steps="every:K"``);
- the **default audit**: the per-row table the audit flow writes (``self_influence``, ``aum``,
  ``loss_final``, ``predicted_label``, ``predicted_confidence``, aggregated from the passes as
  ``orchestration.store.aggregate_cells`` does) given to ``find_label_issues`` with
  ``FlagPolicy()`` (and ``FlagPolicy(top_fraction=s)`` for the other shares inspected);
- candidates for the default: the previous default score (self-influence with AUM, no final
  loss); the default policy on what an audit with ``layers="last"`` or ``steps="every:K"``
  would write; the default score ranked within each class (``per_class=True``) or with its
  parts standardised within each class; self-influence ranked within each class;
- alternatives a practitioner would use: final-checkpoint loss, final-checkpoint margin, the
  area under the margin over the same checkpoints (AUM, Pleiss et al. 2020), and cleanlab 2.9
  ``get_label_quality_scores`` / ``find_label_issues`` on 5-fold cross-validated probabilities
  from the same architecture and training length (5 extra trainings).

Metrics: recall of the flipped rows among the top 5%, 10%, 20% of rows, and AUROC; mean and
standard deviation over seeds. Seconds are per method: the checkpoint passes it needs (timed
per pass), forward passes only for AUM and the final loss/margin, the cross-validation
trainings plus cleanlab's call for cleanlab.

Output: markdown tables on stdout, JSON with ``--json``, and the recall-against-share-inspected
plot for digits at 10% (``--plot``, default ``docs/img/detection_recall.png``; not in
``--quick`` unless asked for). ``--quick`` is a smoke test, not a result: a 600-row subset of
digits and wine, one seed, 10% flipped, 3/6 and 5/15 epochs; about 30 s of CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from tracin_tasks import Checkpoint, TracIn
from tracin_tasks.core.flagging import FlagPolicy, compute_score, find_label_issues
from tracin_tasks.examples.digits import build_cnn, build_mlp

SHARES = (0.05, 0.1, 0.2)
CURVE_SHARES = tuple(round(0.01 * i, 2) for i in range(1, 41))  # 1% .. 40% inspected
FLIPS = ("uniform", "confusable")
REGIMES = ("short", "long")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLOT = os.path.join(ROOT, "docs", "img", "detection_recall.png")


@dataclass(frozen=True)
class Setup:
    """How one dataset is modelled and trained.

    Attributes:
        arch: ``"cnn"`` (digits' images) or ``"mlp"`` (tabular rows).
        learning_rate: SGD's starting learning rate (cosine decay to 0 over the run).
        batch_size: training batch size.
        short_epochs: the short run (the model has not fitted the flipped labels).
        long_epochs: the long run (the model has memorised most flipped labels).
        width: CNN channels or MLP hidden units.
        rows: use a seeded random subset of this many rows (``--quick``); None: every row.
    """

    arch: str
    learning_rate: float
    batch_size: int
    short_epochs: int
    long_epochs: int
    width: int
    rows: int | None = None

    def epochs(self, regime: str) -> int:
        return self.short_epochs if regime == "short" else self.long_epochs

    def every_k(self, regime: str) -> int:
        """k of "every k-th checkpoint": about 8 checkpoints of a long run, 3 of a short one."""
        return max(2, self.epochs(regime) // 8)


SETUPS = {
    "digits": Setup("cnn", 0.1, 32, short_epochs=5, long_epochs=40, width=8),
    "wine": Setup("mlp", 0.05, 16, short_epochs=5, long_epochs=100, width=64),
    "breast_cancer": Setup("mlp", 0.1, 64, short_epochs=5, long_epochs=100, width=64),
}
QUICK_SETUPS = {
    "digits": Setup("cnn", 0.1, 32, short_epochs=3, long_epochs=6, width=8, rows=600),
    "wine": Setup("mlp", 0.05, 16, short_epochs=5, long_epochs=15, width=64),
    "breast_cancer": Setup("mlp", 0.1, 64, short_epochs=5, long_epochs=30, width=64),
}

# name -> (what the docs call it, extra trainings); order is the order of the tables
METHODS = {
    "default": ("**default audit** (`FlagPolicy()`: SI + AUM + final loss)", 0),
    "default_last": ('default policy, audit with `layers="last"`', 0),
    "default_every_k": ('default policy, audit with `steps="every:K"`', 0),
    "prev_default": ("SI + AUM (`score=\"self_influence_aum\"`, the previous default)", 0),
    "default_per_class": ("default score ranked within each class (`per_class=True`)", 0),
    "default_class_z": ("default score, parts standardised within each class", 0),
    "tracin_all": ("TracIn SI, all layers, all checkpoints", 0),
    "tracin_last": ('TracIn SI, `layers="last"`, all checkpoints', 0),
    "tracin_final": ("TracIn SI, final checkpoint only", 0),
    "tracin_every_k": ("TracIn SI, every k-th checkpoint", 0),
    "si_per_class": ("TracIn SI ranked within each class", 0),
    "final_loss": ("final-checkpoint loss", 0),
    "final_margin": ("final-checkpoint margin", 0),
    "aum": ("AUM over the same checkpoints", 0),
    "cleanlab": ("cleanlab CV5 `get_label_quality_scores`", 5),
}
ALTERNATIVES = ("final_loss", "final_margin", "aum", "cleanlab")


# -- data --------------------------------------------------------------------------------------
def load_dataset(name: str, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (float32; digits as (n, 1, 8, 8) in [0, 1], tabular standardised) and labels."""
    from sklearn import datasets
    from sklearn.preprocessing import StandardScaler

    if name == "digits":
        bunch = datasets.load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    elif name in ("wine", "breast_cancer"):
        bunch = getattr(datasets, f"load_{name}")()
        x = StandardScaler().fit_transform(bunch.data).astype(np.float32)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(SETUPS)}")
    y = bunch.target.astype(np.int64)
    if rows is not None and rows < len(y):
        keep = np.sort(np.random.default_rng(0).choice(len(y), size=rows, replace=False))
        x, y = x[keep], y[keep]
    return x, y


def build_model(setup: Setup, x: np.ndarray, n_classes: int) -> torch.nn.Module:
    if setup.arch == "cnn":
        return build_cnn(n_classes, channels=setup.width)
    return build_mlp(in_features=x.shape[1], n_classes=n_classes, hidden=setup.width)


def dataset_of(x: np.ndarray, y: np.ndarray) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def train(setup: Setup, x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int, seed: int
          ) -> tuple[torch.nn.Module, list[Checkpoint], float]:
    """Train from a seeded initialisation; a checkpoint (state_dict + learning rate) per epoch.

    The recipe of ``tracin_tasks.examples.digits.train_with_checkpoints`` (SGD, momentum 0.9,
    cosine decay to 0, shuffled batches, each checkpoint carrying the learning rate in force
    during the epoch that ended there), with batches indexed straight from the tensors: on the
    tabular sets the DataLoader's row-by-row collation took longer than the MLP itself.
    """
    torch.manual_seed(seed)
    model = build_model(setup, x, n_classes)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=setup.learning_rate, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    checkpoints = []
    for epoch in range(1, epochs + 1):
        model.train()
        lr = sched.get_last_lr()[0]
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), setup.batch_size):
            batch = order[i : i + setup.batch_size]
            opt.zero_grad()
            loss_fn(model(xt[batch]), yt[batch]).backward()
            opt.step()
        sched.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoints.append(Checkpoint(state_dict=state, learning_rate=lr, step=epoch))
    model.eval()
    return model, checkpoints, time.perf_counter() - t0


def predict_proba(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)).double(), 1).numpy()


def cross_val_proba(setup: Setup, x: np.ndarray, y: np.ndarray, n_classes: int, epochs: int, seed: int
                    ) -> tuple[np.ndarray, float]:
    """Out-of-fold predicted probabilities from 5 trainings of the same architecture and length."""
    from sklearn.model_selection import StratifiedKFold

    probs = np.zeros((len(y), n_classes))
    t0 = time.perf_counter()
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    for fold, (fit_rows, held_out) in enumerate(folds.split(np.zeros(len(y)), y)):
        model, _, _ = train(setup, x[fit_rows], y[fit_rows], n_classes, epochs, seed=1000 * (seed + 1) + fold)
        probs[held_out] = predict_proba(model, x[held_out])
    return probs, time.perf_counter() - t0


def confusable_targets(name: str, setup: Setup) -> tuple[np.ndarray, list[list[float]]]:
    """For every class, the other class a clean model most confuses it with.

    The clean model is the benchmark's own architecture, short run, 5-fold cross-validated on
    the clean labels; "most confuses" is the highest mean out-of-fold probability.
    """
    x, y = load_dataset(name, setup.rows)
    k = int(y.max()) + 1
    probs, _ = cross_val_proba(setup, x, y, k, setup.short_epochs, seed=12345)
    mean_prob = np.stack([probs[y == c].mean(0) for c in range(k)])
    off = mean_prob.copy()
    np.fill_diagonal(off, -np.inf)
    return off.argmax(1), mean_prob.round(4).tolist()


def flip_labels(y: np.ndarray, rate: float, kind: str, seed: int, targets: np.ndarray | None, salt: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``rate`` of the labels (rows drawn uniformly); return the given labels and the mask."""
    k = int(y.max()) + 1
    rng = np.random.default_rng([seed, salt, int(round(rate * 1000)), FLIPS.index(kind)])
    rows = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    noisy = y.copy()
    if kind == "uniform":
        noisy[rows] = (y[rows] + rng.integers(1, k, size=len(rows))) % k
    else:
        noisy[rows] = targets[y[rows]]
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rows] = True
    return noisy, flipped


# -- scores --------------------------------------------------------------------------------------
def timed_passes(tracin: TracIn, data, batch_size: int = 256) -> tuple[list, list[float]]:
    """Every checkpoint's pass, and the seconds each one took."""
    passes, seconds = [], []
    it = tracin.checkpoint_passes(data, batch_size=batch_size)
    while True:
        t0 = time.perf_counter()
        try:
            p = next(it)
        except StopIteration:
            break
        seconds.append(time.perf_counter() - t0)
        passes.append(p)
    return passes, seconds


def audit_scores_table(passes, row_id: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """The audit flow's ``scores.parquet`` for one shard: the same arithmetic as
    ``orchestration.store.aggregate_cells`` + ``orchestration.aggregate.write_scores``
    (tests/test_bench_detection.py checks it against them)."""
    n = len(row_id)
    steps = sorted({p.step for p in passes})
    last = steps[-1]
    si, aum = np.zeros(n), np.zeros(n)
    for p in passes:
        si += p.learning_rate * p.squared_norm
        aum += p.margin / len(steps)
    final = next(p for p in passes if p.step == last)
    return pd.DataFrame({
        "row_id": row_id, "label": labels, "self_influence": si, "aum": aum, "loss_final": final.loss,
        "predicted_label": final.predicted, "predicted_confidence": final.confidence,
    })


def every_kth(items: list, k: int) -> list:
    """Every k-th item counted back from the last (the audit's ``steps="every:K"``)."""
    return items[::-1][::k][::-1]


def self_influence(passes) -> np.ndarray:
    return sum(p.learning_rate * p.squared_norm for p in passes)


def policy_score(table: pd.DataFrame, policy: FlagPolicy | None = None) -> np.ndarray:
    """A policy's ranking score, in row order, through ``find_label_issues``."""
    issues, _, _ = find_label_issues(table, policy or FlagPolicy())
    return issues.sort_values("row_id")["score"].to_numpy()


def within_class_order_score(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank by the share of the row's own class that scores lower (ties: the raw score), as
    ``FlagPolicy(per_class=True)`` selects; returned as a score (higher = inspect first)."""
    pct = np.empty(len(score))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pct[idx] = (np.argsort(np.argsort(score[idx], kind="stable"), kind="stable") + 1) / len(idx)
    order = np.lexsort((-score, -pct))
    out = np.empty(len(score))
    out[order] = np.arange(len(score), 0, -1)
    return out


def within_class_standardised(table: pd.DataFrame) -> np.ndarray:
    """The default score with each of its parts standardised within the row's class."""
    labels = table["label"].to_numpy()
    out = np.empty(len(table))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        part = table.iloc[idx]
        out[idx] = compute_score(part["self_influence"].to_numpy(), part["aum"].to_numpy(),
                                 "self_influence_aum_loss", part["loss_final"].to_numpy())
    return out


def forward_seconds(model: torch.nn.Module, checkpoints: list[Checkpoint], x: np.ndarray) -> list[float]:
    """Seconds of a plain forward pass over all rows per checkpoint (what AUM/loss alone cost)."""
    import copy

    m = copy.deepcopy(model).eval()
    xt = torch.from_numpy(x)
    out = []
    for c in checkpoints:
        t0 = time.perf_counter()
        m.load_state_dict(c.state_dict)
        with torch.no_grad():
            for i in range(0, len(xt), 256):
                m(xt[i : i + 256])
        out.append(time.perf_counter() - t0)
    return out


def top_share(n: int, share: float) -> int:
    """Rows inspected at ``share`` (rounded up, as ``FlagPolicy.top_fraction``)."""
    return int(math.ceil(share * n - 1e-9))


def recall_curve(score: np.ndarray, flipped: np.ndarray, shares) -> list[float]:
    order = np.argsort(-score, kind="stable")
    hits = np.cumsum(flipped[order])
    return [float(hits[top_share(len(score), s) - 1] / max(1, flipped.sum())) for s in shares]


def auroc(score: np.ndarray, flipped: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, score))


# -- one setting -----------------------------------------------------------------------------------
def run_case(case: dict) -> dict:
    """One dataset × flip × rate × seed × regime: train, score every method, measure."""
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    from cleanlab.filter import find_label_issues as cl_find_label_issues
    from cleanlab.rank import get_label_quality_scores

    name, flip, rate, seed, regime = case["dataset"], case["flip"], case["rate"], case["seed"], case["regime"]
    setup = Setup(**case["setup"])
    targets = np.asarray(case["targets"]) if case["targets"] is not None else None
    x, true = load_dataset(name, setup.rows)
    k = int(true.max()) + 1
    labels, flipped = flip_labels(true, rate, flip, seed, targets, salt=sorted(SETUPS).index(name))
    epochs = setup.epochs(regime)
    every = setup.every_k(regime)
    data = dataset_of(x, labels)
    row_id = np.arange(len(labels))

    model, checkpoints, train_s = train(setup, x, labels, k, epochs, seed)
    predicted = predict_proba(model, x).argmax(1)

    passes, pass_s = timed_passes(TracIn(model, checkpoints), data)
    last_passes, last_s = timed_passes(TracIn(model, checkpoints, layers="last"), data)
    fwd_s = forward_seconds(model, checkpoints, x)

    table = audit_scores_table(passes, row_id, labels)
    t0 = time.perf_counter()
    issues, _, _ = find_label_issues(table, FlagPolicy())
    flag_s = time.perf_counter() - t0
    default = issues.sort_values("row_id")["score"].to_numpy()
    # the default audit at 10% is exactly FlagPolicy()'s flagged rows; other shares: top_fraction=s
    default_flagged = {0.1: issues.sort_values("row_id")["flagged"].to_numpy()}
    for s in SHARES:
        if s != 0.1:
            other, _, _ = find_label_issues(table, FlagPolicy(top_fraction=s))
            default_flagged[s] = other.sort_values("row_id")["flagged"].to_numpy()

    si_all = table["self_influence"].to_numpy()
    aum = table["aum"].to_numpy()
    si_last = self_influence(last_passes)
    si_every = self_influence(every_kth(passes, every))
    # what the audit would write with layers="last" or steps="every:K": everything from those passes
    table_last = audit_scores_table(last_passes, row_id, labels)
    table_every = audit_scores_table(every_kth(passes, every), row_id, labels)
    scores = {
        "default": default,
        "default_last": policy_score(table_last),
        "default_every_k": policy_score(table_every),
        "prev_default": policy_score(table, FlagPolicy(score="self_influence_aum")),
        "tracin_all": si_all,
        "tracin_last": si_last,
        "tracin_final": self_influence(passes[-1:]),
        "tracin_every_k": si_every,
        "si_per_class": within_class_order_score(si_all, labels),
        "default_per_class": within_class_order_score(default, labels),
        "default_class_z": within_class_standardised(table),
        "final_loss": table["loss_final"].to_numpy(),
        "final_margin": -passes[-1].margin,
        "aum": -aum,
    }
    seconds = {
        "default": sum(pass_s) + flag_s,
        "default_last": sum(last_s) + flag_s,
        "default_every_k": sum(every_kth(pass_s, every)) + flag_s,
        "prev_default": sum(pass_s) + flag_s,
        "tracin_all": sum(pass_s),
        "tracin_last": sum(last_s),
        "tracin_final": pass_s[-1],
        "tracin_every_k": sum(every_kth(pass_s, every)),
        "si_per_class": sum(pass_s),
        "default_per_class": sum(pass_s),
        "default_class_z": sum(pass_s),
        "final_loss": fwd_s[-1],
        "final_margin": fwd_s[-1],
        "aum": sum(fwd_s),
    }

    probs, cv_s = cross_val_proba(setup, x, labels, k, epochs, seed)
    t0 = time.perf_counter()
    quality = get_label_quality_scores(labels, probs)
    found = cl_find_label_issues(labels, probs)
    cl_s = time.perf_counter() - t0
    scores["cleanlab"] = -quality
    seconds["cleanlab"] = cv_s + cl_s

    methods = {}
    for m, score in scores.items():
        curve = recall_curve(score, flipped, CURVE_SHARES)
        recall = {str(s): curve[CURVE_SHARES.index(s)] for s in SHARES}
        if m == "default":  # the policy's own flagged rows
            check = {str(s): float(flipped[default_flagged[s]].sum() / flipped.sum()) for s in SHARES}
            if check != recall:
                raise AssertionError(f"ranking by the default score disagrees with the policy's flags: {check} {recall}")
        methods[m] = {"recall": recall, "auroc": auroc(score, flipped), "curve": curve,
                      "seconds": float(seconds[m]), "extra_trainings": METHODS[m][1]}
    cleanlab_flags = {"flagged": int(found.sum()), "flagged_share": float(found.mean()),
                      "precision": float(flipped[found].mean()) if found.any() else 0.0,
                      "recall": float(flipped[found].sum() / flipped.sum())}
    return {
        **{key: case[key] for key in ("dataset", "flip", "rate", "seed", "regime")},
        "epochs": epochs, "every_k": every, "rows": int(len(labels)), "flipped": int(flipped.sum()),
        "train_seconds": train_s,
        # memorisation: the final model predicts the (wrong) given label of a flipped row
        "fit_flipped": float((predicted[flipped] == labels[flipped]).mean()),
        "fit_clean": float((predicted[~flipped] == labels[~flipped]).mean()),
        "seconds_per_pass": float(np.mean(pass_s)),
        "cpu_seconds": time.process_time() - cpu0,
        "methods": methods,
        "cleanlab_find_label_issues": cleanlab_flags,
    }


# -- summaries ---------------------------------------------------------------------------------------
def summarise(cases: list[dict]) -> list[dict]:
    """Mean and sd over seeds per dataset × flip × rate × regime × method."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cases:
        groups[(c["dataset"], c["flip"], c["rate"], c["regime"])].append(c)
    out = []
    for (name, flip, rate, regime), cs in sorted(groups.items()):
        base = {"dataset": name, "flip": flip, "rate": rate, "regime": regime, "seeds": sorted(c["seed"] for c in cs),
                "epochs": cs[0]["epochs"], "every_k": cs[0]["every_k"],
                "fit_flipped": float(np.mean([c["fit_flipped"] for c in cs])),
                "fit_clean": float(np.mean([c["fit_clean"] for c in cs])),
                "cleanlab_find_label_issues": {
                    key: float(np.mean([c["cleanlab_find_label_issues"][key] for c in cs]))
                    for key in ("flagged_share", "precision", "recall")}}
        methods = {}
        for m in METHODS:
            rows = [c["methods"][m] for c in cs]
            entry = {"extra_trainings": METHODS[m][1], "seconds": float(np.mean([r["seconds"] for r in rows]))}
            for s in SHARES:
                vals = [r["recall"][str(s)] for r in rows]
                entry[f"recall@{s}"] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
            vals = [r["auroc"] for r in rows]
            entry["auroc"] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
            entry["curve"] = np.mean([r["curve"] for r in rows], 0).round(4).tolist()
            methods[m] = entry
        # at 10% inspected (the target's share) and at the share equal to the noise rate, where a
        # perfect ranking finds every flip (at 20% noise, 10% inspected can find at most half)
        base["default_vs_alternatives"] = {}
        for share in sorted({0.1, rate} & set(SHARES)):
            key = f"recall@{share}"
            best_alt = max(ALTERNATIVES, key=lambda m: methods[m][key]["mean"])
            base["default_vs_alternatives"][str(share)] = {
                "default": methods["default"][key]["mean"], "best_alternative": best_alt,
                "best_alternative_recall": methods[best_alt][key]["mean"],
                "alternatives": {m: methods[m][key]["mean"] for m in ALTERNATIVES},
                "default_ahead_or_equal": bool(methods["default"][key]["mean"] >= methods[best_alt][key]["mean"] - 1e-12)}
        base["methods"] = methods
        out.append(base)
    return out


def fmt(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"


def markdown_tables(summary: list[dict]) -> str:
    lines = []
    by_case: dict[tuple, dict] = {}
    for s in summary:
        by_case[(s["dataset"], s["flip"], s["rate"], s["regime"])] = s
    for name, flip, rate in sorted({(s["dataset"], s["flip"], s["rate"]) for s in summary}):
        regimes = [r for r in REGIMES if (name, flip, rate, r) in by_case]
        lines.append(f"\n### {name}, {rate:.0%} {flip} flips (seeds {by_case[(name, flip, rate, regimes[0])]['seeds']})\n")
        head = "| method | extra trainings |"
        rule = "|---|---:|"
        for r in regimes:
            s = by_case[(name, flip, rate, r)]
            tag = f"{r} ({s['epochs']} ep)"
            head += f" {tag} R@5% | R@10% | R@20% | AUROC | s |"
            rule += "---:|---:|---:|---:|---:|"
        lines += [head, rule]
        for m, (label, extra) in METHODS.items():
            row = f"| {label} | {extra} |"
            for r in regimes:
                e = by_case[(name, flip, rate, r)]["methods"][m]
                row += "".join(f" {fmt(e[f'recall@{sh}'])} |" for sh in SHARES) + f" {fmt(e['auroc'])} | {e['seconds']:.1f} |"
            lines.append(row)
        for r in regimes:
            s = by_case[(name, flip, rate, r)]
            cl = s["cleanlab_find_label_issues"]
            lines.append(
                f"\n{r}: the final model predicts the given (wrong) label of {s['fit_flipped']:.1%} of flipped rows "
                f"and the label of {s['fit_clean']:.1%} of the others; every k-th: k = {s['every_k']}; "
                f"cleanlab `find_label_issues` flags {cl['flagged_share']:.1%} of rows, precision "
                f"{cl['precision']:.3f}, recall {cl['recall']:.3f}.")
    short_names = {"final_loss": "final loss", "final_margin": "final margin", "aum": "AUM", "cleanlab": "cleanlab CV5"}
    for share_of in ("0.1", "rate"):
        what = "10% inspected" if share_of == "0.1" else "a share inspected equal to the noise rate"
        lines.append(f"\n### Default audit vs the best alternative, recall at {what}\n")
        lines.append("| dataset | flips | rate | regime | flips memorised | default | best alternative | its recall | default ≥ |")
        lines.append("|---|---|---:|---|---:|---:|---|---:|---|")
        for s in summary:
            if share_of == "rate" and s["rate"] == 0.1:
                continue  # the same as the table above
            d = s["default_vs_alternatives"].get(share_of if share_of != "rate" else str(s["rate"]))
            if d is None:
                continue
            lines.append(f"| {s['dataset']} | {s['flip']} | {s['rate']:.0%} | {s['regime']} | {s['fit_flipped']:.0%} | "
                         f"{d['default']:.3f} | {short_names[d['best_alternative']]} | {d['best_alternative_recall']:.3f} | "
                         f"{'yes' if d['default_ahead_or_equal'] else '**no**'} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, rate: float = 0.1) -> str | None:
    import tempfile

    # matplotlib keeps a font cache; keep it out of the docs folder and the home directory
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "tracin-bench-matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [s for s in summary if s["dataset"] == "digits" and abs(s["rate"] - rate) < 1e-9]
    if not panels:
        return None
    panels.sort(key=lambda s: (FLIPS.index(s["flip"]), REGIMES.index(s["regime"])))
    cols = len({s["regime"] for s in panels})
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False, sharey=True)
    shown = [("default", "default audit (SI + AUM + final loss)", "C3", "-", 2.4),
             ("prev_default", "SI + AUM (previous default)", "C3", ":", 1.2),
             ("tracin_all", "TracIn SI, all layers", "C0", "-", 1.4),
             ("tracin_last", 'TracIn SI, layers="last"', "C0", ":", 1.4), ("aum", "AUM", "C2", "--", 1.4),
             ("final_loss", "final loss", "C1", "--", 1.4), ("cleanlab", "cleanlab CV5 (5 extra trainings)", "C4", "-.", 1.4)]
    shares = np.concatenate([[0.0], CURVE_SHARES])
    x = 100 * shares
    for ax, s in zip(axes.flat, panels):
        for m, label, color, style, width in shown:
            ax.plot(x, [0.0, *s["methods"][m]["curve"]], style, color=color, lw=width, label=label)
        ax.plot(x, np.minimum(1, shares / rate), color="0.6", lw=0.8, label="perfect ranking")
        ax.plot(x, shares, color="0.6", lw=0.8, ls=":", label="random order")
        ax.axvline(100 * rate, color="0.85", lw=0.8, zorder=0)
        ax.set_title(f"digits, {rate:.0%} {s['flip']} flips, {s['regime']} run ({s['epochs']} epochs;\n"
                     f"{s['fit_flipped']:.0%} of flipped labels memorised; mean of {len(s['seeds'])} seed(s))", fontsize=9)
        ax.set_xlabel("share of rows inspected, % (highest score first)")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, 30)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("recall of flipped rows")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: digits and wine, seed 0, 10%%, short runs")
    parser.add_argument("--datasets", nargs="+", default=None, choices=sorted(SETUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rates", type=float, nargs="+", default=None)
    parser.add_argument("--flips", nargs="+", default=list(FLIPS), choices=FLIPS)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--json", default=None, help="write every case and the summary here")
    parser.add_argument("--plot", default=None, help=f"recall-vs-share plot (default {DEFAULT_PLOT}; none with --quick)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each")
    args = parser.parse_args(argv)
    setups = QUICK_SETUPS if args.quick else SETUPS
    datasets = args.datasets or (["digits", "wine"] if args.quick else ["digits", "wine", "breast_cancer"])
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    rates = args.rates or ([0.1] if args.quick else [0.05, 0.1, 0.2])
    plot_path = args.plot if args.plot is not None else (None if args.quick else DEFAULT_PLOT)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    targets, confusion = {}, {}
    for name in datasets:
        if "confusable" in args.flips and int(load_dataset(name)[1].max()) + 1 > 2:
            t, conf = confusable_targets(name, setups[name])
            targets[name], confusion[name] = t.tolist(), {"targets": t.tolist(), "mean_cv_probability": conf}
    cases = []
    for name in datasets:
        for flip in args.flips:
            if flip == "confusable" and name not in targets:
                continue  # two classes: the confusable flip is the uniform flip
            for rate in rates:
                for regime in args.regimes:
                    for seed in seeds:
                        cases.append({"dataset": name, "flip": flip, "rate": rate, "seed": seed, "regime": regime,
                                      "setup": asdict(setups[name]), "targets": targets.get(name)})
    results = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for res in pool.map(run_case, cases):
                results.append(res)
                print(f"  {res['dataset']} {res['flip']} {res['rate']:.0%} {res['regime']} seed {res['seed']} done", file=sys.stderr)
    else:
        for case in cases:
            res = run_case(case)
            results.append(res)
            print(f"  {res['dataset']} {res['flip']} {res['rate']:.0%} {res['regime']} seed {res['seed']}: "
                  f"default R@10% {res['methods']['default']['recall']['0.1']:.3f}, "
                  f"fit flipped {res['fit_flipped']:.2f} ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
    summary = summarise(results)
    wall = time.perf_counter() - t_start

    print("# Detection quality" + (" — QUICK MODE (shortened runs, one seed: not a result)" if args.quick else ""))
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, {args.jobs} process(es) with one "
          f"torch thread; wall time {wall:.0f} s. Recall = share of the flipped rows among the top 5/10/20% of rows "
          "by each score; mean ± sd over seeds; s = scoring seconds (cleanlab: its 5 cross-validation trainings).")
    for name in datasets:
        s = setups[name]
        print(f"- {name}: {s.arch} (width {s.width}), SGD lr {s.learning_rate} momentum 0.9 cosine, batch {s.batch_size}, "
              f"short {s.short_epochs} / long {s.long_epochs} epochs, one checkpoint per epoch"
              + (f"; confusable flip targets {targets[name]}" if name in targets else ""))
    print(markdown_tables(summary))
    if plot_path:
        plot(summary, plot_path)
        print(f"\nplot: {plot_path}")
    cpu = sum(c["cpu_seconds"] for c in results)
    print(f"\ncases: {len(results)}; wall {wall:.0f} s; CPU of the cases {cpu:.0f} s (one thread each)")
    payload = {"quick": args.quick, "wall_seconds": wall, "case_cpu_seconds": cpu, "torch": torch.__version__, "jobs": args.jobs,
               "setups": {n: asdict(setups[n]) for n in datasets}, "confusion": confusion, "shares": list(SHARES),
               "curve_shares": list(CURVE_SHARES), "methods": {m: v[0] for m, v in METHODS.items()},
               "summary": summary, "cases": [{k: v for k, v in c.items()} for c in results]}
    for c in payload["cases"]:
        for m in c["methods"].values():
            m.pop("curve", None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
