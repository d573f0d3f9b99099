"""validate_audit: Great Expectations over an audit's per-row table, with Data Docs.

A good table meets every expectation; each broken table fails exactly the expectation that
guards against its fault.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("great_expectations")

from tracin_tasks.core.flagging import FlagPolicy, find_label_issues  # noqa: E402
from tracin_tasks.exceptions import ConfigurationError  # noqa: E402
from tracin_tasks.exceptions import ValidationFailedError  # noqa: E402
from tracin_tasks.integrations.gx_validation import validate_audit  # noqa: E402

N = 20
ROW_IDS = list(range(500, 500 + N))
CLASSES = [0, 1, 2]
SHARE = 0.1 + 1 / N  # what report_audit allows for the default top 10%


def good_issues() -> pd.DataFrame:
    scores = pd.DataFrame({
        "row_id": ROW_IDS,
        "label": [i % 3 for i in range(N)],
        "self_influence": np.linspace(0.05, 2.0, N),
        "aum": np.linspace(1.0, -1.0, N),
    })
    issues, summary, _ = find_label_issues(scores, FlagPolicy(top_fraction=0.1))
    assert summary["flagged"] == 2
    return issues


def validate(issues, out: Path, **kwargs):
    args = dict(expected_row_ids=ROW_IDS, known_classes=CLASSES, n_checkpoints=2, max_flagged_share=SHARE,
                output_dir=str(out))
    args.update(kwargs)
    return validate_audit(issues, **args)


def failed_keys(outcome) -> set[tuple[str, str | None]]:
    return {(r["expectation"], r["column"]) for r in outcome.failed}


def test_good_table_passes_and_builds_data_docs(tmp_path):
    outcome = validate(good_issues(), tmp_path)
    assert outcome.success is True
    assert outcome.failed == []
    assert all(r["success"] for r in outcome.results)
    expected = {
        ("expect_table_row_count_to_equal", None),
        ("expect_column_values_to_not_be_null", "row_id"),
        ("expect_column_values_to_be_unique", "row_id"),
        ("expect_column_values_to_be_in_set", "row_id"),
        ("expect_column_values_to_not_be_null", "self_influence"),
        ("expect_column_values_to_be_between", "self_influence"),
        ("expect_column_values_to_not_be_null", "score"),
        ("expect_column_values_to_be_between", "score"),
        ("expect_column_values_to_be_in_set", "label"),
        ("expect_column_mean_to_be_between", "flagged"),
        ("expect_column_values_to_be_between", "checkpoints"),
    }
    assert {(r["expectation"], r["column"]) for r in outcome.results} == expected
    assert outcome.statistics == {"evaluated": len(expected), "failed": 0}
    observed = {(r["expectation"], r["column"]): r["observed"] for r in outcome.results}
    assert observed[("expect_table_row_count_to_equal", None)] == N
    assert observed[("expect_column_mean_to_be_between", "flagged")] == pytest.approx(0.1)
    # Data Docs: a real index.html under output_dir/gx/...
    index = Path(outcome.data_docs_index)
    assert index.name == "index.html" and index.is_file()
    assert (tmp_path / "gx") in index.parents
    assert list((tmp_path / "gx").rglob("index.html"))
    docs = index.read_text()
    assert "tracin-audit-rows" in docs and "tracin-audit-facts" in docs
    assert list(index.parent.rglob("validations/**/*.html")), "no validation result page in the Data Docs"


def _dup_id(issues, kw):
    issues.loc[1, "row_id"] = issues.loc[0, "row_id"]


def _negative_si(issues, kw):
    issues.loc[3, "self_influence"] = -0.5


def _nan_score(issues, kw):
    issues.loc[4, "score"] = np.nan


def _label_outside(issues, kw):
    issues.loc[5, "label"] = 7


def _too_many_flagged(issues, kw):
    issues.loc[:9, "flagged"] = True  # half the rows, cap is 15%


def _no_checkpoints(issues, kw):
    kw["n_checkpoints"] = 0


def _missing_row(issues, kw):
    return issues.iloc[:-1]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (_dup_id, {("expect_column_values_to_be_unique", "row_id")}),
        (_negative_si, {("expect_column_values_to_be_between", "self_influence")}),
        (_nan_score, {("expect_column_values_to_not_be_null", "score")}),
        (_label_outside, {("expect_column_values_to_be_in_set", "label")}),
        (_too_many_flagged, {("expect_column_mean_to_be_between", "flagged")}),
        (_no_checkpoints, {("expect_column_values_to_be_between", "checkpoints")}),
        (_missing_row, {("expect_table_row_count_to_equal", None)}),
    ],
    ids=["duplicate-row-id", "negative-self-influence", "nan-score", "label-outside-classes",
         "flagged-share-above-cap", "zero-checkpoints", "row-count-mismatch"],
)
def test_broken_table_fails_the_right_expectation(tmp_path, fault, expected):
    issues, kwargs = good_issues(), {}
    changed = fault(issues, kwargs)
    issues = issues if changed is None else changed
    outcome = validate(issues, tmp_path, **kwargs)
    assert outcome.success is False
    assert failed_keys(outcome) == expected
    assert outcome.statistics["failed"] == len(expected)
    assert Path(outcome.data_docs_index).is_file()  # Data Docs are built for failures too


def test_extra_expectation_from_config_is_applied(tmp_path):
    extra = [
        {"type": "expect_column_max_to_be_between", "kwargs": {"column": "self_influence", "max_value": 1.5}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "percentile", "min_value": 0,
                                                                   "max_value": 100}},
    ]
    outcome = validate(good_issues(), tmp_path, extra_expectations=extra)
    assert outcome.success is False
    assert failed_keys(outcome) == {("expect_column_max_to_be_between", "self_influence")}
    (failed,) = outcome.failed
    assert failed["observed"] == pytest.approx(2.0)
    keys = {(r["expectation"], r["column"]) for r in outcome.results}
    assert ("expect_column_values_to_be_between", "percentile") in keys
    assert outcome.statistics["evaluated"] == 13


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "expect_column_values_to_be_magical", "kwargs": {"column": "score"}},
        {"kwargs": {"column": "score"}},
        "expect_column_values_to_be_unique",
        {"type": "expect_column_max_to_be_between", "kwargs": {"colum": "score", "max_value": 1}},
    ],
    ids=["unknown-type", "no-type", "not-a-dict", "bad-kwargs"],
)
def test_bad_extra_expectation_is_a_configuration_error_before_any_work(tmp_path, spec):
    out = tmp_path / "out"
    with pytest.raises(ConfigurationError):
        validate(good_issues(), out, extra_expectations=[spec])
    assert not out.exists(), "validate_audit wrote files before rejecting its configuration"


def test_validation_failed_error_is_an_assertion_error():
    assert issubclass(ValidationFailedError, AssertionError)
