"""The audit report: one self-contained HTML file a model owner can read without knowing TracIn.

Inline CSS, plots as inline PNG (``data:`` URIs), no script and no external URL, so it works in
MLflow's sandboxed artifact preview and offline. Every string that comes from data (row ids,
labels, run names, layer names, GX results) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks._io import atomic_write
from tracin_tasks._png import png_data_uri, to_pixels
from tracin_tasks.exceptions import require_extra

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1080px;color:#1f2328;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f6f8fa}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.muted{color:#57606a}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:1.5em}img.thumb{image-rendering:pixelated;width:48px;height:48px;border:1px solid #d0d7de}
code{background:#f6f8fa;padding:1px 4px;border-radius:3px}img{max-width:100%;height:auto}
"""


@dataclass
class ReportInputs:
    """What the report shows; everything is plain data, nothing is read from disk."""

    issues: pd.DataFrame
    summary: dict[str, Any]
    info: dict[str, Any]
    validation: dict[str, Any] | None = None
    images: dict[Any, np.ndarray] = field(default_factory=dict)  # row_id -> 2-D array, for thumbnails
    links: dict[str, str] = field(default_factory=dict)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _thumbnail(image: np.ndarray) -> str:
    """A 2-D image (or the first channel of one) as a tiny inline PNG, dark on light, 6× its size."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[0]
    factor = max(1, -(-48 // max(img.shape)))
    pixels = np.repeat(np.repeat(to_pixels(img, invert=True), factor, axis=0), factor, axis=1)
    return png_data_uri(pixels)


def _pyplot() -> Any:
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.expanduser("~"), ".cache", "matplotlib"))
    matplotlib = require_extra("matplotlib", "report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_plots(issues: pd.DataFrame, summary: dict[str, Any]) -> dict[str, bytes]:
    """The report's figures as PNG bytes: score histogram with the cut-off, flagged share per class."""
    plt = _pyplot()
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    si = issues["self_influence"].to_numpy()
    positive = si[si > 0]
    bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 50) if len(positive) > 1 else 30
    ax.hist([si[~issues["flagged"].to_numpy()], si[issues["flagged"].to_numpy()]], bins=bins, stacked=True,
            color=["#8c959f", "#cf222e"], label=["not flagged", "flagged"])
    if summary.get("flagged"):
        cut = float(issues.loc[issues["flagged"], "self_influence"].min())
        ax.axvline(cut, color="#cf222e", linestyle="--", linewidth=1)
    if len(positive) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("self-influence (log scale)")
    ax.set_ylabel("rows")
    ax.legend()
    ax.set_title("Self-influence of every training row")
    out["self_influence_histogram.png"] = _fig_bytes(fig)
    plt.close(fig)

    per_class = pd.DataFrame(summary["per_class"])
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(per_class["label"].astype(str), 100 * per_class["flagged_share"], color="#cf222e")
    ax.set_xlabel("given label")
    ax.set_ylabel("% of rows flagged")
    ax.set_title("Flagged share per class")
    out["flagged_share_per_class.png"] = _fig_bytes(fig)
    plt.close(fig)
    return out


def _fig_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _data_facts(data: dict[str, Any] | None) -> list[list[str]]:
    """Where the rows came from, and which columns are the label and the row id."""
    if not data:
        return []
    ids = (f"<code>{_e(data['row_id_column'])}</code>" if not data.get("row_ids_are_positions") else
           "<span class='bad'>row positions</span> (the data has no row-id column: a row is known by its place "
           "in the file, so keep the file in the order the training run saw it)")
    return [["rows from", _e(data.get("source") or "")],
            ["label column", f"<code>{_e(data.get('label_column') or '')}</code>"],
            ["row ids", ids]]


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(inputs: ReportInputs, plots: dict[str, bytes] | None = None, top: int = 50) -> str:
    """Render the report as one HTML string."""
    issues, summary, info = inputs.issues, inputs.summary, inputs.info
    plots = plots if plots is not None else make_plots(issues, summary)
    img = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in plots.items()}
    run_id = info.get("run_id", "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Label audit of run {_e(run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Label audit of training run {_e(run_id)}</h1>",
        f"<p class='muted'>audited {_e(info.get('audited_at', ''))} with tracin-tasks {_e(info.get('version', ''))}</p>",
    ]
    v = inputs.validation
    gx_state = "no validation" if v is None else ("passed" if v["success"] else "FAILED")
    gx_class = "muted" if v is None else ("ok" if v["success"] else "bad")
    parts.append(
        "<div class='cards'>"
        f"<div class='card'>rows audited<b>{summary['rows']:,}</b></div>"
        f"<div class='card'>rows flagged<b>{summary['flagged']:,}</b>{summary['flagged_share']:.1%} of all</div>"
        f"<div class='card'>checkpoints<b>{len(info.get('checkpoints', []))}</b></div>"
        f"<div class='card'>data validation<b class='{gx_class}'>{_e(gx_state)}</b></div></div>"
    )
    parts.append("<h2>What was flagged, and why</h2>")
    parts.append(
        f"<p>{summary['flagged']:,} of {summary['rows']:,} rows are flagged for a second look: "
        f"<b>{_e(summary['policy'])}</b>. A flagged row is one the model kept having to bend towards "
        "during training — most often because its label is wrong, sometimes because it is unusual "
        "but right. The suggested label is what the final model predicts for the row.</p>"
    )
    if "self_influence_histogram.png" in img:
        parts.append(f"<img alt='Histogram of self-influence with the cut-off' src='{img['self_influence_histogram.png']}'>")
    if "flagged_share_per_class.png" in img:
        parts.append(f"<img alt='Flagged share per class' src='{img['flagged_share_per_class.png']}'>")

    flagged = issues[issues["flagged"]].head(top)
    has_images = bool(inputs.images)
    rows = []
    for r in flagged.itertuples(index=False):
        cells = [str(int(r.rank)), _e(r.row_id)]
        if has_images:
            image = inputs.images.get(r.row_id)
            cells.append(f"<img class='thumb' alt='row {_e(r.row_id)}' src='{_thumbnail(image)}'>" if image is not None else "")
        conf = r.suggested_label_confidence
        cells += [
            _e(r.label),
            _e(r.suggested_label) if r.suggested_label != -1 else "",
            f"{conf:.0%}" if isinstance(conf, float) and np.isfinite(conf) else "",
            f"{r.self_influence:.4g}",
            f"{r.percentile:.1f}",
            _e(r.reason),
        ]
        rows.append(cells)
    header = ["rank", "row id"] + (["image"] if has_images else []) + [
        "given label", "suggested label", "model confidence", "self-influence", "percentile", "reason"]
    parts.append(f"<h2>Top flagged rows (first {len(flagged)})</h2>")
    parts.append(_table(rows, header) if rows else "<p>No row is flagged.</p>")

    per_class = summary.get("per_class", [])
    parts.append("<h2>Per class</h2>")
    parts.append(_table([[_e(c["label"]), f"{c['rows']:,}", f"{c['flagged']:,}", f"{c['flagged_share']:.1%}"]
                         for c in per_class], ["given label", "rows", "flagged", "share flagged"]))

    parts.append("<h2>What was audited</h2>")
    facts = [
        ["training run", _e(run_id)],
        ["tracking server", _e(info.get("tracking_uri") or "")],
        ["training data", f"{summary['rows']:,} rows, fingerprint <code>{_e(info.get('fingerprint', ''))}</code>"],
        *_data_facts(info.get("training_data")),
        ["layers", _e(info.get("layers") if info.get("layers") is not None else "all trainable layers")],
        ["loss", _e(info.get("loss", ""))],
        ["settings hash", f"<code>{_e(info.get('settings_hash', ''))}</code>"],
    ]
    parts.append(_table(facts, ["", ""]))
    ck_rows = [[_e(c.get("step")), f"{float(c.get('learning_rate', float('nan'))):.4g}", _e(c.get("lr_source", ""))]
               for c in info.get("checkpoints", [])]
    parts.append(_table(ck_rows, ["checkpoint step", "learning rate", "learning rate from"]))
    parts.append("<p class='muted'>Each checkpoint is weighted by the learning rate in force while the model moved to "
                 "it: the rate of the last update before it was saved (an optimizer state saved after its scheduler "
                 "stepped holds the next rate, which is not used).</p>")
    for w in info.get("warnings", []):
        parts.append(f"<p class='bad'>Warning: {_e(w)}</p>")

    parts.append("<h2>Data validation (Great Expectations)</h2>")
    if v is None:
        parts.append("<p class='muted'>Not run.</p>")
    else:
        parts.append(f"<p class='{gx_class}'>{'All expectations met.' if v['success'] else 'Some expectations failed.'}</p>")
        parts.append(_table(
            [[_e(r["expectation"]), _e(r.get("column") or ""), "<span class='ok'>met</span>" if r["success"]
              else "<span class='bad'>failed</span>", _e(r.get("observed") if r.get("observed") is not None else
                                                        r.get("unexpected_count") if r.get("unexpected_count") is not None else "")]
             for r in v["results"]], ["expectation", "column", "outcome", "observed / unexpected"]))
        parts.append("<p class='muted'>The full Great Expectations Data Docs are logged next to this report "
                     "(folder <code>data_docs</code>).</p>")

    parts.append("<h2>How to read this</h2><ul>"
                 "<li><b>Self-influence</b> measures how hard the training run had to work to fit a row: the "
                 "learning rate times the size of the row's loss gradient, summed over the saved checkpoints "
                 "(TracIn, Pruthi et al. 2020). Most rows are fitted early and score low.</li>"
                 "<li>Rows with a <b>wrong label</b> keep pulling the model against the rest of their class, so "
                 "they score high. So do rare but correctly labeled rows — check a flagged row before "
                 "relabeling it.</li>"
                 "<li>When the <b>suggested label</b> differs from the given one with high confidence, the label "
                 "is the likely problem; when they agree, the row is probably just unusual.</li>"
                 "<li>Rows are ranked by a <b>score</b>: by default, self-influence combined with the "
                 "<b>area under the margin</b> — how far, averaged over the checkpoints, the model preferred "
                 "the given label over its best alternative (low or negative for rows the model kept "
                 "disagreeing with) — and the <b>final loss</b> where the final model gives the label less than "
                 "even odds. All three come from the same checkpoints; on digits with 10% flipped labels the "
                 "combination found as many or more of them than each alone (docs/benchmarks.md). The dashed line marks the lowest "
                 "self-influence among the flagged rows.</li>"
                 "<li>The <b>percentile</b> says how many rows score lower (100 = the highest).</li></ul>")
    for name, url in inputs.links.items():
        parts.append(f"<p class='muted'>{_e(name)}: <code>{_e(url)}</code></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(inputs: ReportInputs, output_dir: str) -> dict[str, str]:
    """Write ``report.html`` and the plots into ``output_dir`` (atomically); return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    plots = make_plots(inputs.issues, inputs.summary)
    paths = {}
    for name, data in plots.items():
        paths[name] = atomic_write(os.path.join(output_dir, name), data)
    paths["report.html"] = atomic_write(os.path.join(output_dir, "report.html"), render_report(inputs, plots).encode())
    return paths
