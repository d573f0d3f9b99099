"""From per-row scores to flagged rows: policies, the per-row result, a summary and an info dict.

Pure functions over numpy/pandas, no I/O. Modelled on cleanlab: one call gives a per-row table
(``row_id, label, self_influence, score, rank, percentile, flagged, reason, suggested_label,
suggested_label_confidence``), a summary and an info dict.

A :class:`FlagPolicy` combines criteria; a row is flagged when it meets **every** criterion
given (top-k, top fraction, score threshold, robust z-score), ranked either over all rows or
within its class (``per_class``), and the hard ``budget`` then keeps the highest-ranked rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks._options import option
from tracin_tasks.exceptions import ConfigurationError, DataError

SCORES = ("auto", "self_influence", "self_influence_aum", "self_influence_aum_loss")

# a cross-entropy loss above log 2 means the model gives the label less than even odds: it does
# not fit the label. Below that, the final loss says nothing the trajectory does not say better.
FITTED_LOSS = math.log(2.0)


@dataclass(frozen=True)
class FlagPolicy:
    """Which rows to flag for relabeling.

    Attributes:
        score: what rows are ranked by: ``"self_influence"`` (pure TracIn);
            ``"self_influence_aum"`` (standardised log self-influence minus standardised area
            under the margin); ``"self_influence_aum_loss"`` (that, plus the standardised log of
            the final checkpoint's loss floored at log 2, so only rows the final model still
            gives less than even odds add to it); or ``"auto"`` (the default: the three-part
            score when the table has ``aum`` and ``loss_final``, self-influence with AUM when
            it has only ``aum``, plain self-influence otherwise). All parts come from the
            audit's own checkpoint passes; see docs/benchmarks.md ("Detection quality").
        top_k: flag at most the k highest-ranked rows (per class with ``per_class``).
        top_fraction: flag the highest-ranked fraction of rows (per class with ``per_class``).
            The default, ``"auto"``, means 0.1 when no other criterion (top_k, threshold,
            robust_z, budget) is given, and no fraction limit when one is.
        threshold: flag rows whose score is at least this.
        robust_z: flag rows whose robust z-score, (score − median) / (1.4826 · MAD), is at least this.
        per_class: rank and select within each class, so one hard class cannot take the budget.
        budget: never flag more than this many rows in all (the relabel team's capacity).
    """

    score: str = option("auto", "what rows are ranked by (see docs/concepts.md)", choices=SCORES)
    top_k: int | None = option(None, "flag at most this many rows (per class with --per-class)", type=int)
    top_fraction: float | str | None = option("auto", "flag this share of rows ('auto': 0.1 when no other "
                                              "criterion is given)", type=float)
    threshold: float | None = option(None, "flag rows whose score is at least this", type=float)
    robust_z: float | None = option(None, "flag rows with robust z-score at least this", type=float)
    per_class: bool = option(False, "rank and select within each class", action="store_true")
    budget: int | None = option(None, "never flag more rows than this (relabel capacity)", type=int)

    def __post_init__(self) -> None:
        if self.top_fraction == "auto":
            others = (self.top_k, self.threshold, self.robust_z, self.budget)
            object.__setattr__(self, "top_fraction", 0.1 if all(o is None for o in others) else None)
        if self.score not in SCORES:
            raise ConfigurationError(f"FlagPolicy.score must be one of {SCORES}, got {self.score!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigurationError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if self.top_fraction is not None and (
            isinstance(self.top_fraction, (str, bool)) or not (0 < float(self.top_fraction) <= 1)
        ):
            raise ConfigurationError(
                f"top_fraction must be in (0, 1], got {self.top_fraction!r}: it is the share of rows to flag."
            )
        for name in ("threshold", "robust_z"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(float(value)):
                raise ConfigurationError(f"{name} must be a finite number, got {value!r}.")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigurationError(
                f"budget must be a positive integer (rows the relabel team can take), got {self.budget!r}; "
                "a budget of 0 would flag nothing — skip flagging instead."
            )
        if all(getattr(self, n) is None for n in ("top_k", "top_fraction", "threshold", "robust_z", "budget")):
            raise ConfigurationError("A FlagPolicy needs at least one of top_k, top_fraction, threshold, robust_z, budget.")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FlagPolicy:
        """Build from JSON (flow parameters); unknown keys are an error."""
        if d is None:
            return cls()
        if isinstance(d, FlagPolicy):
            return d
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigurationError(f"Unknown flag policy keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = []
        if self.top_k is not None:
            parts.append(f"top {self.top_k}")
        if self.top_fraction is not None:
            parts.append(f"top {self.top_fraction:.1%}")
        if self.threshold is not None:
            parts.append(f"score ≥ {self.threshold:g}")
        if self.robust_z is not None:
            parts.append(f"robust z ≥ {self.robust_z:g}")
        where = " within each class" if self.per_class else ""
        text = " and ".join(parts) + where if parts else "highest scores"
        if self.budget is not None:
            text += f", at most {self.budget} rows"
        return f"{text}, ranked by {_SCORE_NAMES[self.score]}"


_SCORE_NAMES = {
    "auto": "self-influence combined with the area under the margin and the final loss (plain "
            "self-influence for non-classifiers)",
    "self_influence": "self-influence",
    "self_influence_aum": "self-influence combined with the area under the margin",
    "self_influence_aum_loss": "self-influence combined with the area under the margin and the final loss",
}


def _standardise(x: np.ndarray) -> np.ndarray:
    finite = x[np.isfinite(x)]
    if len(finite) == 0:
        return np.zeros_like(x)
    sd = finite.std()
    return (x - finite.mean()) / (sd if sd > 0 else 1.0)


def compute_score(
    self_influence: np.ndarray, aum: np.ndarray | None, kind: str, loss_final: np.ndarray | None = None
) -> np.ndarray:
    """The ranking score of a policy (higher = more suspicious).

    ``self_influence``: the raw TracIn self-influence. ``self_influence_aum``:
    ``z(log self_influence) − z(aum)``. ``self_influence_aum_loss``: that plus
    ``z(log max(loss_final, log 2))`` — the final checkpoint's cross-entropy counts only where
    the final model gives the label less than even odds; ``z`` standardises over the rows.

    Example:
        >>> compute_score(si, aum, "self_influence_aum_loss", loss_final)
    """
    si = np.asarray(self_influence, dtype=np.float64)
    if kind == "self_influence":
        return si.copy()
    if aum is None or not np.isfinite(aum).any():
        raise DataError(f"score={kind!r} needs the area under the margin (a classifier's audit).")
    log_si = np.log(np.maximum(si, np.finfo(np.float64).tiny))
    score = _standardise(log_si) - _standardise(np.asarray(aum, dtype=np.float64))
    if kind == "self_influence_aum":
        return score
    if loss_final is None or not np.isfinite(loss_final).any():
        raise DataError(
            f"score={kind!r} needs the final checkpoint's loss per row (column 'loss_final' of the "
            "audit's scores table); use score='self_influence_aum' without it."
        )
    rejected = np.log(np.maximum(np.asarray(loss_final, dtype=np.float64), FITTED_LOSS))
    return score + _standardise(rejected)


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * 1.4826
    if mad == 0:
        return np.where(x > med, np.inf, 0.0)
    return (x - med) / mad


def _select(score: np.ndarray, policy: FlagPolicy) -> tuple[np.ndarray, list[str]]:
    """Rows of one ranking group that meet every criterion; and which criteria applied."""
    n = len(score)
    keep = np.ones(n, dtype=bool)
    reasons: list[str] = []
    order = np.argsort(-score, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    if policy.top_k is not None:
        keep &= rank < policy.top_k
        reasons.append(f"top {policy.top_k}")
    if policy.top_fraction is not None:
        k = int(math.ceil(policy.top_fraction * n - 1e-9))
        keep &= rank < k
        reasons.append(f"top {policy.top_fraction:.1%}")
    if policy.threshold is not None:
        keep &= score >= policy.threshold
        reasons.append(f"score ≥ {policy.threshold:g}")
    if policy.robust_z is not None:
        keep &= _robust_z(score) >= policy.robust_z
        reasons.append(f"robust z ≥ {policy.robust_z:g}")
    return keep, reasons


def find_label_issues(
    scores: pd.DataFrame,
    policy: FlagPolicy | dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Rank rows, flag the likely mislabeled ones, and describe the result.

    Args:
        scores: one row per training row with ``row_id``, ``label``, ``self_influence`` and,
            when available, ``aum``, ``loss_final``, ``predicted_label``, ``predicted_confidence``
            (the audit's ``scores.parquet`` has them all).
        policy: a :class:`FlagPolicy` (or its dict); default: the top 10% by the ``"auto"`` score.
        info: facts about the audit to carry into the info dict (run, checkpoints, layers...).

    Returns:
        ``(issues, summary, info)``: the per-row table sorted by rank (1 = most suspicious),
        a summary (rows, flagged, share, per class, score distribution) and the info dict.

    Example:
        >>> issues, summary, info = find_label_issues(scores, FlagPolicy(top_fraction=0.05, per_class=True))
        >>> issues[issues.flagged].head()
    """
    policy = FlagPolicy.from_dict(policy) if not isinstance(policy, FlagPolicy) else policy
    for col in ("row_id", "label", "self_influence"):
        if col not in scores.columns:
            raise DataError(f"The scores table has no {col!r} column; it needs row_id, label and self_influence.")
    if len(scores) == 0:
        raise DataError("The scores table is empty; there is nothing to flag.")
    si = scores["self_influence"].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(si)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} rows have non-finite self-influence (row ids "
            f"{scores['row_id'].to_numpy()[bad][:10].tolist()}); fix the audit before flagging."
        )
    aum = scores["aum"].to_numpy(dtype=np.float64) if "aum" in scores.columns else None
    loss_final = scores["loss_final"].to_numpy(dtype=np.float64) if "loss_final" in scores.columns else None
    kind = policy.score
    if kind == "auto":
        # the three-part score was best or close to it on every benchmark case (docs/benchmarks.md)
        if aum is None or not np.isfinite(aum).all():
            kind = "self_influence"
        elif loss_final is None or not np.isfinite(loss_final).all():
            kind = "self_influence_aum"
        else:
            kind = "self_influence_aum_loss"
    score = compute_score(si, aum, kind, loss_final)
    labels = scores["label"].to_numpy()
    n = len(scores)

    flagged = np.zeros(n, dtype=bool)
    reason = np.array([""] * n, dtype=object)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if policy.per_class else [np.arange(n)]
    for idx in groups:
        keep, why = _select(score[idx], policy)
        flagged[idx[keep]] = True
        text = " and ".join(why) + (f" of class {labels[idx[0]]}" if policy.per_class and why else "")
        reason[idx[keep]] = text
    order = np.argsort(-score, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    if policy.budget is not None and flagged.sum() > policy.budget:
        if policy.per_class:
            # share the budget between classes: every class's best row, then every second best...
            within = np.empty(n, dtype=np.int64)
            for idx in groups:
                within[idx[np.argsort(-score[idx], kind="stable")]] = np.arange(len(idx))
            global_pos = np.empty(n, dtype=np.int64)
            global_pos[order] = np.arange(n)
            candidates = np.flatnonzero(flagged)
            keep_ids = candidates[np.lexsort((global_pos[candidates], within[candidates]))][: policy.budget]
        else:
            keep_ids = [i for i in order if flagged[i]][: policy.budget]
        capped = np.zeros(n, dtype=bool)
        capped[keep_ids] = True
        reason[flagged & ~capped] = ""
        flagged = capped
    if policy.budget is not None:
        reason[flagged & (reason == "")] = f"top {policy.budget} (budget)"
    # share of the other rows whose score is strictly lower (ties share a percentile)
    lower = np.searchsorted(np.sort(score), score, side="left")
    percentile = 100.0 * lower / (n - 1) if n > 1 else np.full(n, 100.0)

    issues = pd.DataFrame(
        {
            "row_id": scores["row_id"].to_numpy(),
            "label": labels,
            "self_influence": si,
            "score": score,
            "rank": rank,
            "percentile": percentile,
            "flagged": flagged,
            "reason": np.where(flagged, reason, ""),
            "suggested_label": scores["predicted_label"].to_numpy() if "predicted_label" in scores else -1,
            "suggested_label_confidence": (
                scores["predicted_confidence"].to_numpy() if "predicted_confidence" in scores else np.nan
            ),
        }
    ).sort_values("rank", kind="stable").reset_index(drop=True)

    per_class = (
        issues.groupby("label").agg(rows=("row_id", "size"), flagged=("flagged", "sum")).reset_index()
    )
    per_class["flagged_share"] = per_class["flagged"] / per_class["rows"]
    q = np.quantile(score, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    cutoff = float(issues.loc[issues.flagged, "score"].min()) if flagged.any() else None
    summary = {
        "rows": int(n),
        "flagged": int(flagged.sum()),
        "flagged_share": float(flagged.mean()),
        "policy": policy.describe().replace(_SCORE_NAMES["auto"], _SCORE_NAMES[kind]),
        "score_cutoff": cutoff,
        "per_class": per_class.to_dict("records"),
        "score_quantiles": dict(zip(["min", "p25", "median", "p75", "p90", "p99", "max"], map(float, q))),
        "self_influence_quantiles": dict(
            zip(["min", "p25", "median", "p75", "p90", "p99", "max"], map(float, np.quantile(si, [0, .25, .5, .75, .9, .99, 1])))
        ),
    }
    full_info = {**(info or {}), "policy": policy.to_dict(), "score": kind}
    return issues, summary, full_info
