"""The audit report is one self-contained, script-free HTML file, safe with hostile data.

Data-derived strings (row ids, run name, layers, reasons, GX columns, warnings, links) carry
markup that would run script if it were not escaped; the report is checked as source and in
headless Chromium (as a file:// page and through ``page.set_content``).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from tracin_tasks.core.flagging import FlagPolicy, find_label_issues  # noqa: E402
from tracin_tasks.integrations.report import ReportInputs, render_report, write_report  # noqa: E402

from ._browser import chromium  # noqa: E402

XSS = "<script>window.__xss=1</script>"
IMG = '"><img src=x onerror="window.__xss=2">'
SVG = "'><svg onload=window.__xss=3>"
TITLE = "</title><script>window.__xss=4</script>"
STYLE = "</style><script>window.__xss=5</script>"
LINK = "<a href='https://example.com/x'>click</a>"
HOSTILE = [XSS, IMG, SVG, TITLE, STYLE, LINK]
N_FLAGGED = 4


def hostile_inputs(with_images: bool = True) -> ReportInputs:
    n = 12
    row_ids = [XSS, IMG, SVG, STYLE] + [f"row-{i}" for i in range(4, n)]
    scores = pd.DataFrame({
        "row_id": row_ids,
        "label": [i % 3 for i in range(n)],
        "self_influence": np.linspace(5.0, 0.1, n),  # the hostile ids are the highest, so they are flagged
        "predicted_label": [(i + 1) % 3 for i in range(n)],
        "predicted_confidence": np.linspace(0.99, 0.4, n),
    })
    info = {
        "run_id": TITLE + XSS,
        "run_name": IMG,
        "layers": ["fc1", SVG],
        "loss": XSS,
        "tracking_uri": "http://127.0.0.1:9/" + XSS,  # shown as text, never as a link
        "fingerprint": STYLE,
        "settings_hash": IMG,
        "checkpoints": [{"step": 1, "learning_rate": 0.05, "lr_source": XSS},
                        {"step": SVG, "learning_rate": 0.01, "lr_source": "param"}],
        "warnings": [IMG, LINK],
        "audited_at": XSS,
        "version": SVG,
    }
    issues, summary, info = find_label_issues(scores, FlagPolicy(score="self_influence", top_k=N_FLAGGED,
                                                                 top_fraction=None), info)
    issues["reason"] = np.where(issues["flagged"], "top 4 " + IMG + STYLE, "")
    validation = {
        "success": False,
        "results": [
            {"expectation": "expect_column_values_to_be_unique", "column": XSS, "success": False,
             "observed": None, "unexpected_count": 1},
            {"expectation": SVG, "column": LINK, "success": True, "observed": IMG, "unexpected_count": None},
        ],
        "statistics": {"evaluated": 2, "failed": 1},
    }
    rng = np.random.default_rng(0)
    images = {rid: rng.random((8, 8)) for rid in row_ids} if with_images else {}
    return ReportInputs(issues, summary, info, validation, images, links={XSS: "javascript:alert(1)//" + IMG})


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(hostile_inputs(), str(out))
    return Path(paths["report.html"]), paths


def test_write_report_writes_the_report_and_plots(written):
    report, paths = written
    assert set(paths) == {"report.html", "self_influence_histogram.png", "flagged_share_per_class.png"}
    for name, path in paths.items():
        data = Path(path).read_bytes()
        assert data, name
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".tmp-")]  # atomic writes cleaned up


def test_source_has_no_script_no_handlers_no_external_urls(written):
    report, _ = written
    source = report.read_text()
    lower = source.lower()
    assert "<script" not in lower
    assert "<svg" not in lower and "<iframe" not in lower and "<link" not in lower and "<base" not in lower
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in source  # the hostile text is there, escaped
    assert "&quot;&gt;&lt;img src=x onerror=&quot;window.__xss=2&quot;&gt;" in source
    assert "@import" not in lower and "url(" not in lower
    parser = _Collect()
    parser.feed(source)
    tags = {t for t, _ in parser.tags}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "div", "b", "img", "table",
                    "thead", "tbody", "tr", "th", "td", "span", "code", "ul", "li"}, tags
    for tag, attrs in parser.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            if name in attrs:
                assert attrs[name].startswith("data:image/png;base64,"), (tag, name, attrs[name][:80])
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", source, re.I)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len([a for a in imgs if a.get("class") == "thumb"]) == N_FLAGGED
    assert len(imgs) == N_FLAGGED + 2  # thumbnails + histogram + per-class bars


def test_report_without_images_has_no_thumbnails():
    inputs = hostile_inputs(with_images=False)
    source = render_report(inputs, plots={})
    parser = _Collect()
    parser.feed(source)
    assert not [a for t, a in parser.tags if t == "img"]
    assert "<th>image</th>" not in source
    assert "<h1>Label audit of training run" in source


@pytest.mark.parametrize(
    ("validation", "state"),
    [(None, "no validation"), ({"success": True, "results": []}, "passed"),
     ({"success": False, "results": []}, "FAILED")],
)
def test_validation_state_is_shown(validation, state):
    inputs = hostile_inputs(with_images=False)
    inputs.validation = validation
    source = render_report(inputs, plots={})
    assert re.search(rf"data validation<b class='\w+'>{state}</b>", source)


@pytest.mark.parametrize("positions", [False, True])
def test_where_the_rows_came_from_is_shown(positions):
    """The report says where the rows came from, the label column, and when rows are known only by
    their position (a table without a row-id column: docs/runs.md)."""
    inputs = hostile_inputs(with_images=False)
    inputs.info = {**inputs.info, "training_data": {
        "source": "/data/<rows>.parquet", "label_column": "labels", "row_id_column": "row_id",
        "row_ids_are_positions": positions}}
    source = render_report(inputs, plots={})
    assert "<td>rows from</td><td>/data/&lt;rows&gt;.parquet</td>" in source
    assert "<td>label column</td><td><code>labels</code></td>" in source
    assert ("row positions</span> (the data has no row-id column" in source) is positions
    assert ("<td>row ids</td><td><code>row_id</code></td>" in source) is not positions


def _check_page(page, allowed: set[str], requests: list[str], failures: list[str]) -> None:
    assert failures == [], failures
    odd = [u for u in requests if not (u.startswith("data:") or u in allowed)]
    assert odd == [], odd
    assert page.evaluate("typeof window.__xss") == "undefined"
    text = page.inner_text("body")
    for s in HOSTILE:
        assert s in text, s  # shown as text, not interpreted
    h1 = page.inner_text("h1")
    assert "Label audit" in h1 and XSS in h1 and TITLE in h1
    assert XSS in page.title()
    assert page.locator("img.thumb").count() == N_FLAGGED
    assert page.locator("script, svg, iframe, a").count() == 0
    # every image is a decoded data: PNG
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0 "
                         "&& i.src.startsWith('data:image/png;base64,'))")
    assert page.locator("td", has_text="failed").count() >= 1  # the GX failure is shown


def test_report_in_headless_chromium(written, tmp_path):
    report, _ = written
    url = report.resolve().as_uri()
    source = report.read_text()
    with chromium() as browser:
        context = browser.new_context()
        page = context.new_page()
        requests: list[str] = []
        failures: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("requestfailed", lambda r: failures.append(f"{r.url} {r.failure}"))
        page.on("dialog", lambda d: failures.append(f"dialog {d.message}") or d.dismiss())
        page.goto(url, wait_until="load")
        _check_page(page, {url}, requests, failures)
        assert url in requests
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

        # the same HTML set as the page's content (no file behind it)
        page2 = context.new_page()
        requests2: list[str] = []
        failures2: list[str] = []
        page2.on("request", lambda r: requests2.append(r.url))
        page2.on("requestfailed", lambda r: failures2.append(f"{r.url} {r.failure}"))
        page2.on("dialog", lambda d: failures2.append(f"dialog {d.message}") or d.dismiss())
        page2.set_content(source, wait_until="load")
        _check_page(page2, set(), requests2, failures2)
        context.close()
