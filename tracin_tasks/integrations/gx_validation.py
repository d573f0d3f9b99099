"""Great Expectations (GX Core 1.x) validation of an audit's per-row result, with Data Docs.

A file context lives under the audit's output folder (``<output>/gx``); each validation runs as
a GX Checkpoint whose ``UpdateDataDocsAction`` builds the Data Docs site there. Two batches are
validated: the per-row table, and a one-row table of audit facts (checkpoints used, rows
expected). Users add expectations through configuration::

    [{"type": "expect_column_values_to_be_between", "kwargs": {"column": "self_influence", "max_value": 1e6}}]

Known trap: ``ExpectColumnQuantileValuesToBeBetween`` crashes on numpy bools, so nothing here
uses it; the flagged column is validated as 0/1 integers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks.exceptions import ConfigurationError, require_extra

logger = logging.getLogger(__name__)
_BIG = sys.float_info.max
_IN_SET_LIMIT = 50_000  # beyond this, row-id completeness is checked by count + uniqueness


@dataclass
class ValidationOutcome:
    """What GX said about an audit."""

    success: bool
    results: list[dict[str, Any]]
    data_docs_index: str | None
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def failed_names(self) -> list[str]:
        """The failed expectations as ``expectation(column)``, for messages."""
        return [f"{r['expectation']}({r.get('column') or ''})" for r in self.failed]

    def to_dict(self) -> dict[str, Any]:
        """As JSON (for reports, MLflow and the flow's result)."""
        return {"success": self.success, "results": self.results, "statistics": self.statistics,
                "data_docs": self.data_docs_index}


def _expectation(gxe: Any, spec: dict[str, Any]) -> Any:
    """Build an expectation from ``{"type": "expect_...", "kwargs": {...}}``."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigurationError(
            f"An extra expectation must be a dict like {{'type': 'expect_column_values_to_be_between', "
            f"'kwargs': {{...}}}}, got {spec!r}."
        )
    name = "".join(part.capitalize() for part in str(spec["type"]).split("_"))
    cls = getattr(gxe, name, None)
    if cls is None:
        raise ConfigurationError(f"Unknown Great Expectations expectation {spec['type']!r} (class {name}).")
    try:
        return cls(**spec.get("kwargs", {}))
    except Exception as exc:
        raise ConfigurationError(f"Expectation {spec['type']!r} rejected its arguments: {exc}") from exc


def validate_audit(
    issues: pd.DataFrame,
    *,
    expected_row_ids: Sequence[Any],
    known_classes: Sequence[int],
    n_checkpoints: int,
    max_flagged_share: float | None,
    output_dir: str,
    extra_expectations: Sequence[dict[str, Any]] = (),
    suite_name: str = "tracin-audit",
) -> ValidationOutcome:
    """Validate the per-row result of an audit and build Data Docs under ``output_dir/gx``.

    Args:
        issues: the per-row table of :func:`tracin_tasks.core.flagging.find_label_issues`.
        expected_row_ids: every row id of the training data.
        known_classes: the classes a label may take.
        n_checkpoints: checkpoints the audit used.
        max_flagged_share: the largest share of rows the policy may flag (None: no bound).
        output_dir: the audit's output folder.
        extra_expectations: user expectations over the per-row table.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    gx = require_extra("great_expectations", "gx")
    import great_expectations.expectations as gxe

    extras = [_expectation(gxe, s) for s in extra_expectations]  # bad config fails before any work
    rows = issues.copy()
    rows["flagged"] = rows["flagged"].astype(np.int64)
    facts = pd.DataFrame({"checkpoints": [int(n_checkpoints)], "rows_expected": [len(expected_row_ids)]})

    context = gx.get_context(mode="file", project_root_dir=output_dir)  # GX adds its own gx/ folder
    source = context.data_sources.add_or_update_pandas("tracin")
    assets = {a.name: a for a in source.assets}
    batches = {}
    for name in ("rows", "audit"):
        asset = assets.get(name) or source.add_dataframe_asset(name)
        existing = {b.name: b for b in asset.batch_definitions}
        batches[name] = existing.get("whole") or asset.add_batch_definition_whole_dataframe("whole")

    row_suite = gx.ExpectationSuite(name=f"{suite_name}-rows")
    row_suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=len(expected_row_ids)))
    row_suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="row_id"))
    row_suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="row_id"))
    if len(expected_row_ids) <= _IN_SET_LIMIT:
        row_suite.add_expectation(
            gxe.ExpectColumnValuesToBeInSet(column="row_id", value_set=[_plain(v) for v in expected_row_ids])
        )
    for col, low in (("self_influence", 0.0), ("score", -_BIG)):
        row_suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col))
        row_suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=low, max_value=_BIG))
    row_suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[int(c) for c in known_classes]))
    if max_flagged_share is not None:
        row_suite.add_expectation(
            gxe.ExpectColumnMeanToBeBetween(column="flagged", min_value=0.0, max_value=float(max_flagged_share))
        )
    for e in extras:
        row_suite.add_expectation(e)
    fact_suite = gx.ExpectationSuite(name=f"{suite_name}-facts")
    fact_suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="checkpoints", min_value=1))

    definitions = []
    for suite, batch in ((row_suite, batches["rows"]), (fact_suite, batches["audit"])):
        suite = context.suites.add_or_update(suite)
        definitions.append(
            context.validation_definitions.add_or_update(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
        )
    # each validation definition takes its own dataframe, so run them one by one in one checkpoint each
    results: list[dict[str, Any]] = []
    success = True
    for definition, frame in zip(definitions, (rows, facts)):
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=definition.name,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="update-data-docs")],
                result_format={"result_format": "SUMMARY"},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        success &= bool(run.success)
        for vr in run.run_results.values():
            for r in vr.results:
                cfg = r.expectation_config
                results.append(
                    {
                        "expectation": cfg.type,
                        "column": cfg.kwargs.get("column"),
                        "success": bool(r.success),
                        "observed": _plain((r.result or {}).get("observed_value")),
                        "unexpected_count": _plain((r.result or {}).get("unexpected_count")),
                    }
                )
    sites = context.get_docs_sites_urls()
    index = next((s["site_url"] for s in sites if s.get("site_url")), None)
    if index and index.startswith("file://"):
        index = index[len("file://") :]
    outcome = ValidationOutcome(success, results, index, {"evaluated": len(results),
                                                            "failed": sum(not r["success"] for r in results)})
    log = logger.info if success else logger.warning
    log("Great Expectations: %d of %d expectations met", len(results) - outcome.statistics["failed"], len(results))
    return outcome


def _plain(value: Any) -> Any:
    """numpy scalars to Python values (GX and JSON want plain types)."""
    if isinstance(value, np.generic):
        return value.item()
    return value
