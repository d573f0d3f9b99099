"""FlagPolicy and find_label_issues on small constructed inputs whose answer is worked out by hand.

Most tests rank by plain self-influence (``score="self_influence"``) and switch the default
``top_fraction=0.1`` off, so one criterion is tested at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tracin_tasks.core.flagging import FlagPolicy, compute_score, find_label_issues
from tracin_tasks.exceptions import ConfigurationError, DataError


def scores_frame(si, labels=None, row_ids=None, **extra) -> pd.DataFrame:
    n = len(si)
    return pd.DataFrame({
        "row_id": list(row_ids) if row_ids is not None else list(range(100, 100 + n)),
        "label": list(labels) if labels is not None else [0] * n,
        "self_influence": np.asarray(si, dtype=np.float64),
        **extra,
    })


def flag(frame: pd.DataFrame, **policy):
    policy.setdefault("score", "self_influence")
    policy.setdefault("top_fraction", None)
    return find_label_issues(frame, FlagPolicy(**policy))


def flagged_ids(issues: pd.DataFrame) -> list:
    """Flagged row ids in rank order."""
    return issues.loc[issues["flagged"], "row_id"].tolist()


# -- single criteria ------------------------------------------------------------------------------
def test_top_k_ranks_highest_first_with_percentile_and_reason():
    frame = scores_frame([0.5, 3.0, 1.0, 2.0, 0.1])  # row ids 100..104
    issues, summary, info = flag(frame, top_k=2)
    # sorted by rank, rank 1 = highest score
    assert issues["row_id"].tolist() == [101, 103, 102, 100, 104]
    assert issues["rank"].tolist() == [1, 2, 3, 4, 5]
    assert issues["self_influence"].tolist() == [3.0, 2.0, 1.0, 0.5, 0.1]
    assert issues["score"].tolist() == [3.0, 2.0, 1.0, 0.5, 0.1]
    # percentile = share of the other rows that score lower: 100 for the top, 0 for the bottom
    assert issues["percentile"].tolist() == pytest.approx([100.0, 75.0, 50.0, 25.0, 0.0])
    assert flagged_ids(issues) == [101, 103]
    assert issues["reason"].tolist() == ["top 2", "top 2", "", "", ""]
    assert summary["rows"] == 5 and summary["flagged"] == 2
    assert summary["flagged_share"] == pytest.approx(0.4)
    assert summary["score_cutoff"] == 2.0
    assert summary["policy"] == "top 2, ranked by self-influence"
    assert info["score"] == "self_influence"
    assert info["policy"]["top_k"] == 2


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 0.25, 3),  # 2.5 rows -> ceil -> 3
        (10, 0.2, 2),  # exactly 2
        (10, 0.3, 3),  # 0.3 * 10 = 3.0000000000000004 in floating point: still 3, not 4
        (30, 0.1, 3),  # 0.1 * 30 = 3.0000000000000004: still 3
        (7, 0.01, 1),  # a tiny share of a few rows still flags one
        (5, 1.0, 5),  # everything
        (1797, 0.1, 180),  # digits with the default policy: ceil(179.7)
    ],
)
def test_top_fraction_uses_ceil(n, fraction, expected):
    rng = np.random.default_rng(n)
    si = rng.permutation(np.arange(1, n + 1)).astype(float)
    issues, summary, _ = flag(scores_frame(si), top_fraction=fraction)
    assert summary["flagged"] == expected
    # the flagged rows are exactly the highest `expected` scores
    assert sorted(issues.loc[issues.flagged, "self_influence"]) == list(np.arange(n - expected + 1, n + 1, dtype=float))
    assert set(issues.loc[issues.flagged, "reason"]) == {f"top {fraction:.1%}"}


def test_threshold_is_inclusive():
    issues, summary, _ = flag(scores_frame([0.5, 3.0, 1.0, 2.0, 0.1]), threshold=1.0)
    assert flagged_ids(issues) == [101, 103, 102]
    assert set(issues.loc[issues.flagged, "reason"]) == {"score ≥ 1"}
    assert summary["score_cutoff"] == 1.0


@pytest.mark.parametrize(("z", "expected"), [(0.6, [104, 103]), (0.7, [104]), (66.0, [])])
def test_robust_z_uses_median_and_scaled_mad(z, expected):
    # median 3; absolute deviations 2,1,0,1,97 -> MAD 1; robust z = (x - 3) / 1.4826:
    # -1.349, -0.674, 0, 0.674, 65.42. Without the 1.4826 factor, 4 would have z = 1 >= 0.7.
    issues, summary, _ = flag(scores_frame([1.0, 2.0, 3.0, 4.0, 100.0]), robust_z=z)
    assert flagged_ids(issues) == expected
    assert summary["flagged"] == len(expected)
    if expected:
        assert set(issues.loc[issues.flagged, "reason"]) == {f"robust z ≥ {z:g}"}
    else:
        assert summary["score_cutoff"] is None
        assert (issues["reason"] == "").all()


# -- per class, budget, combinations ------------------------------------------------------------
HARD = [10.0, 11.0, 12.0, 13.0, 14.0]  # class 0: a hard class, every row scores high
EASY = [1.0, 2.0, 3.0, 4.0, 5.0]  # class 1


def two_classes() -> pd.DataFrame:
    return scores_frame(HARD + EASY, labels=[0] * 5 + [1] * 5)  # row ids 100..104 class 0, 105..109 class 1


def test_per_class_keeps_a_hard_class_from_taking_every_flag():
    glob, _, _ = flag(two_classes(), top_fraction=0.2)
    assert flagged_ids(glob) == [104, 103]  # both from the hard class
    per, summary, _ = flag(two_classes(), top_fraction=0.2, per_class=True)
    assert flagged_ids(per) == [104, 109]  # the top row of each class
    reasons = per.set_index("row_id").loc[[104, 109], "reason"].tolist()
    assert reasons == ["top 20.0% of class 0", "top 20.0% of class 1"]
    # ranks stay global: the easy class's top row is 6th overall
    assert per.set_index("row_id").loc[109, "rank"] == 6
    assert summary["policy"] == "top 20.0% within each class, ranked by self-influence"
    assert summary["per_class"] == [
        {"label": 0, "rows": 5, "flagged": 1, "flagged_share": 0.2},
        {"label": 1, "rows": 5, "flagged": 1, "flagged_share": 0.2},
    ]
    per_k, _, _ = flag(two_classes(), top_k=1, per_class=True)
    assert flagged_ids(per_k) == [104, 109]


def test_per_class_budget_is_shared_between_classes():
    issues, summary, _ = flag(two_classes(), top_k=2, per_class=True, budget=2)
    assert summary["flagged"] == 2
    by_class = {c["label"]: c["flagged"] for c in summary["per_class"]}
    assert by_class == {0: 1, 1: 1}  # each class keeps its own top row: 104 and 109


def test_budget_caps_to_the_highest_ranked():
    frame = scores_frame(np.arange(10, dtype=float))  # row 100 + i has score i
    issues, summary, _ = flag(frame, top_fraction=0.5, budget=3)
    assert flagged_ids(issues) == [109, 108, 107]
    assert set(issues.loc[issues.flagged, "reason"]) == {"top 50.0%"}
    assert summary["policy"] == "top 50.0%, at most 3 rows, ranked by self-influence"
    # a budget alone flags the `budget` highest rows
    only, summary, _ = flag(frame, budget=3)
    assert flagged_ids(only) == [109, 108, 107]
    assert set(only.loc[only.flagged, "reason"]) == {"top 3 (budget)"}
    # a budget larger than what the criteria flag changes nothing
    loose, summary, _ = flag(frame, top_k=2, budget=5)
    assert flagged_ids(loose) == [109, 108]


def test_budget_only_per_class_reason_names_the_budget():
    issues, _, _ = flag(two_classes(), budget=3, per_class=True)
    reasons = set(issues.loc[issues.flagged, "reason"])
    assert all(r and not r.startswith(" ") and "budget" in r for r in reasons), reasons


def test_budget_smaller_than_one_class():
    frame = scores_frame([6.0, 5.0, 4.0, 3.0, 2.0, 1.5, 0.5, 0.4], labels=[0] * 6 + [1] * 2)
    issues, summary, _ = flag(frame, threshold=1.0, budget=2)
    assert flagged_ids(issues) == [100, 101]
    assert summary["per_class"][0]["flagged"] == 2 and summary["per_class"][1]["flagged"] == 0
    issues, _, _ = flag(frame, top_fraction=0.5, per_class=True, budget=2)  # class 0: 3 rows, class 1: 1 row
    assert flagged_ids(issues) == [100, 106]  # per class, each class's best row comes first


def test_criteria_intersect():
    frame = scores_frame(np.arange(10, dtype=float))
    issues, summary, _ = flag(frame, top_k=5, threshold=6.5)
    assert flagged_ids(issues) == [109, 108, 107]  # top 5 = 9..5, >= 6.5 = 9,8,7
    assert set(issues.loc[issues.flagged, "reason"]) == {"top 5 and score ≥ 6.5"}
    issues, _, _ = flag(frame, top_k=2, threshold=8.5)
    assert flagged_ids(issues) == [109]
    # the default "top 10%" applies only when no other criterion is given
    issues, summary, _ = find_label_issues(frame, FlagPolicy(score="self_influence", threshold=5.0))
    assert flagged_ids(issues) == [109, 108, 107, 106, 105]
    assert summary["policy"] == "score ≥ 5, ranked by self-influence"
    issues, summary, _ = find_label_issues(frame, FlagPolicy(score="self_influence", threshold=5.0, top_fraction=0.1))
    assert flagged_ids(issues) == [109]


def test_ties_are_stable_earlier_row_wins():
    issues, _, _ = flag(scores_frame([1.0, 5.0, 5.0, 5.0, 0.0]), top_k=2)
    assert flagged_ids(issues) == [101, 102]
    assert issues["row_id"].tolist() == [101, 102, 103, 100, 104]
    assert issues["rank"].tolist() == [1, 2, 3, 4, 5]
    per, _, _ = flag(scores_frame([5.0, 5.0, 5.0, 5.0], labels=[1, 0, 1, 0]), top_k=1, per_class=True)
    assert flagged_ids(per) == [100, 101]  # the first row of each class


def test_all_equal_scores():
    frame = scores_frame([2.0] * 6)
    issues, _, _ = flag(frame, top_k=2)
    assert flagged_ids(issues) == [100, 101]
    assert issues["row_id"].tolist() == list(range(100, 106))
    issues, _, _ = flag(frame, threshold=2.0)
    assert len(flagged_ids(issues)) == 6
    issues, summary, _ = flag(frame, robust_z=0.5)  # MAD = 0 and nothing above the median: nothing flagged
    assert summary["flagged"] == 0 and summary["score_cutoff"] is None
    issues, summary, _ = flag(frame, top_fraction=0.5)
    assert flagged_ids(issues) == [100, 101, 102]
    # with AUM present and all scores equal the combined score is still finite
    issues, summary, info = find_label_issues(scores_frame([2.0] * 6, aum=[1.0] * 6), FlagPolicy(top_k=1))
    assert info["score"] == "self_influence_aum"
    assert np.isfinite(issues["score"]).all() and flagged_ids(issues) == [100]


def test_tiny_classes():
    frame = scores_frame([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5], labels=[0] * 9 + [1])
    issues, summary, _ = flag(frame, top_fraction=0.1, per_class=True)
    # class 0: ceil(0.9) = 1 row; class 1 (one row): ceil(0.1) = 1 row, its only one
    assert flagged_ids(issues) == [100, 109]
    assert summary["per_class"][1] == {"label": 1, "rows": 1, "flagged": 1, "flagged_share": 1.0}
    issues, _, _ = flag(frame, robust_z=1.0, per_class=True)  # a one-row class has MAD 0 and z 0
    assert 109 not in flagged_ids(issues)
    single, summary, _ = flag(scores_frame([3.0]), top_k=5)
    assert flagged_ids(single) == [100]
    assert single["percentile"].tolist() == [100.0] and single["rank"].tolist() == [1]


def test_suggested_label_and_confidence_are_carried():
    frame = scores_frame([0.2, 0.9, 0.5], labels=[0, 1, 2], predicted_label=[3, 4, 5],
                         predicted_confidence=[0.31, 0.97, 0.55])
    issues, _, _ = flag(frame, top_k=1)
    by_id = issues.set_index("row_id")
    assert by_id["suggested_label"].to_dict() == {100: 3, 101: 4, 102: 5}
    assert by_id["suggested_label_confidence"].to_dict() == pytest.approx({100: 0.31, 101: 0.97, 102: 0.55})
    assert by_id["label"].to_dict() == {100: 0, 101: 1, 102: 2}
    bare, _, _ = flag(scores_frame([0.2, 0.9]), top_k=1)
    assert (bare["suggested_label"] == -1).all()
    assert bare["suggested_label_confidence"].isna().all()


def test_summary_counts_per_class_and_quantiles():
    frame = scores_frame([6.0, 1.0, 5.0, 4.0, 2.0, 3.0], labels=[0, 0, 0, 1, 1, 2], row_ids=list("abcdef"))
    issues, summary, info = flag(frame, top_k=3)  # flags a (6), c (5), d (4)
    assert flagged_ids(issues) == ["a", "c", "d"]
    assert summary["per_class"] == [
        {"label": 0, "rows": 3, "flagged": 2, "flagged_share": pytest.approx(2 / 3)},
        {"label": 1, "rows": 2, "flagged": 1, "flagged_share": 0.5},
        {"label": 2, "rows": 1, "flagged": 0, "flagged_share": 0.0},
    ]
    assert summary["score_cutoff"] == 4.0
    assert summary["score_quantiles"]["min"] == 1.0 and summary["score_quantiles"]["max"] == 6.0
    assert summary["score_quantiles"]["median"] == 3.5
    assert summary["self_influence_quantiles"]["median"] == 3.5
    assert list(issues.columns) == ["row_id", "label", "self_influence", "score", "rank", "percentile", "flagged",
                                    "reason", "suggested_label", "suggested_label_confidence"]
    full_info = find_label_issues(frame, FlagPolicy(score="self_influence", top_k=3), {"run_id": "r1"})[2]
    assert full_info["run_id"] == "r1" and full_info["score"] == "self_influence"


# -- the combined score ------------------------------------------------------------------------------
def _z(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()  # population standard deviation


def test_self_influence_aum_is_standardised_log_si_minus_standardised_aum():
    si = [1.0, 10.0, 100.0, 0.5, 3.0]
    aum = [2.0, -1.0, 0.5, 3.0, 1.0]
    expected = _z(np.log(si)) - _z(aum)
    frame = scores_frame(si, aum=aum)
    issues, summary, info = find_label_issues(frame, FlagPolicy(score="self_influence_aum", top_k=2, top_fraction=None))
    by_id = issues.set_index("row_id")["score"]
    assert by_id.loc[list(range(100, 105))].to_numpy() == pytest.approx(expected)
    order = np.argsort(-expected, kind="stable")
    assert issues["row_id"].tolist() == [100 + i for i in order]
    assert flagged_ids(issues) == [100 + i for i in order[:2]]
    assert info["score"] == "self_influence_aum"
    assert summary["policy"].endswith("ranked by self-influence combined with the area under the margin")
    # "auto" picks the combination when every row has an AUM ...
    auto, summary, info = find_label_issues(frame, FlagPolicy(top_k=2, top_fraction=None))
    assert info["score"] == "self_influence_aum"
    assert auto["score"].to_numpy() == pytest.approx(issues["score"].to_numpy())
    # ... and plain self-influence when any AUM is missing
    frame_nan = scores_frame(si, aum=[2.0, np.nan, 0.5, 3.0, 1.0])
    plain, summary, info = find_label_issues(frame_nan, FlagPolicy(top_k=2, top_fraction=None))
    assert info["score"] == "self_influence"
    assert summary["policy"] == "top 2, ranked by self-influence"
    assert flagged_ids(plain) == [102, 101]
    assert compute_score(np.array(si), None, "self_influence") == pytest.approx(si)


def test_self_influence_aum_without_aum_is_a_data_error():
    with pytest.raises(DataError, match="area under the margin"):
        find_label_issues(scores_frame([1.0, 2.0]), FlagPolicy(score="self_influence_aum"))


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [
        {"budget": 0},
        {"budget": -3},
        {"top_fraction": 1.5},
        {"top_fraction": 0},
        {"top_fraction": 0.0},
        {"top_k": 0},
        {"threshold": math.nan},
        {"robust_z": math.inf},
        {"score": "loss"},
        {"top_fraction": None},  # no criterion left
        {"top_fraction": None, "per_class": True},
        {"top_fraction": 0.1, "unknown": 1},
        {"budgt": 10},
    ],
    ids=lambda p: repr(p),
)
def test_invalid_policies_raise_configuration_error(policy):
    with pytest.raises(ConfigurationError):
        FlagPolicy.from_dict(policy)
    with pytest.raises(ConfigurationError):
        find_label_issues(scores_frame([1.0, 2.0]), policy)


def test_from_dict_names_the_unknown_key():
    with pytest.raises(ConfigurationError, match="budgt"):
        FlagPolicy.from_dict({"budgt": 10})
    assert FlagPolicy.from_dict(None) == FlagPolicy()
    assert FlagPolicy.from_dict({"top_k": 3, "top_fraction": None}).to_dict()["top_k"] == 3


def test_non_finite_self_influence_names_the_rows():
    frame = scores_frame([1.0, np.nan, 2.0, np.inf, -np.inf], row_ids=[11, 22, 33, 44, 55])
    with pytest.raises(DataError, match=r"3 rows .*\[22, 44, 55\]"):
        find_label_issues(frame)


@pytest.mark.parametrize("drop", ["row_id", "label", "self_influence"])
def test_missing_columns_and_empty_tables_are_data_errors(drop):
    with pytest.raises(DataError, match=drop):
        find_label_issues(scores_frame([1.0, 2.0]).drop(columns=[drop]))
    with pytest.raises(DataError, match="empty"):
        find_label_issues(scores_frame([1.0]).iloc[:0])
