"""The HTML report: self-contained, figures embedded as valid PNGs, tables and findings shown, and a browser
really draws the figures (headless Chromium screenshot)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from conftest import count_colour, screenshot
from matplotlib.figure import Figure
from PIL import Image

from avlens.report import Finding, Report

MAGENTA = (255, 0, 255)


def magenta_figure(title: str = "") -> Figure:
    """A figure whose axes are one solid block of pure magenta, a colour nothing else in a report has."""
    fig = Figure(figsize=(5, 3))
    ax = fig.add_axes((0.05, 0.05, 0.9, 0.8))
    ax.set_facecolor(np.array(MAGENTA) / 255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig


def line_figure() -> Figure:
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot(np.arange(10), np.arange(10) ** 2)
    ax.set_xlabel("layer")
    return fig


FINDINGS = [
    Finding("vision wins in deep layers", "blocking video in 15-30 raises audio fidelity ~50%", "+38%", "agrees"),
    Finding("audio sinks", "2 sink tokens", "1 sink token", "partly", note="only on **long** clips"),
    Finding("late fusion", "fusion after layer 20", "fusion from layer 8", "disagrees"),
    Finding("multi-clip recall", "drops with 4 clips", "", "not measured", note="needs the `multiclip` set"),
]


def build_report(with_figure: bool = True) -> Report:
    scores = pd.DataFrame(
        {"layer": [0, 1, 2], "fidelity": [0.123456, 12345.6, float("nan")], "group": ["video", "audio<x>", "last"]}
    )
    scores.attrs["caption"] = "Fidelity by layer"
    report = Report("Qwen2.5-Omni <tiny>", subtitle="run **3f2a9c**")
    report.add_section(
        "Counterfactual dominance",
        "Blocking **video** changes the answer.\n\n- 3 samples\n- `sdpa` attention\n\n<script>alert(1)</script>",
        figures=[magenta_figure("Audio fidelity per layer")] if with_figure else [],
        tables=[scores],
    )
    report.add_section("Logit lens", "Second section.", figures=[line_figure()] if with_figure else [])
    report.add_section("Compared with the paper", comparison=FINDINGS)
    return report


class _Tables(HTMLParser):
    """The text of every table cell, per table (the standard library's parser: no extra dependency)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_tables(doc: str) -> list[list[str]]:
    parser = _Tables()
    parser.feed(doc)
    return parser.tables


def test_report_is_self_contained(tmp_path):
    doc = build_report().save(tmp_path / "report.html").read_text(encoding="utf-8")
    assert doc.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", doc, re.IGNORECASE)
    assert not re.search(r"<script|<link|<iframe|@import|url\(", doc, re.IGNORECASE)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc  # text is escaped, not run
    hrefs = re.findall(r'href="([^"]*)"', doc)
    assert hrefs and all(h.startswith("#") for h in hrefs)
    for h in hrefs:  # every table-of-contents entry leads to a section
        assert f'id="{h[1:]}"' in doc


def test_figures_are_embedded_valid_pngs(tmp_path):
    doc = build_report().save(tmp_path / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]*)" alt="([^"]*)"', doc)
    assert len(images) == 2 and doc.count("<img") == 2
    for src, _ in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
        image = Image.open(io.BytesIO(png))
        image.verify()  # checks the chunks' CRCs
        assert image.format == "PNG" and min(image.size) > 200
    # Alt text: the suptitle, else the section title.
    assert [alt for _, alt in images] == ["Audio fidelity per layer", "Logit lens"]


def test_tables_and_findings_appear(tmp_path):
    doc = build_report().save(tmp_path / "report.html").read_text(encoding="utf-8")
    scores, findings = parse_tables(doc)
    assert scores == ["layer", "fidelity", "group", "0", "0.1235", "video", "1", "12,346", "audio<x>", "2", "–", "last"]
    assert "<caption>Fidelity by layer</caption>" in doc and "audio&lt;x&gt;" in doc
    assert findings[:5] == ["Claim", "Paper", "Measured", "Verdict", "Note"]
    rows = [findings[i : i + 5] for i in range(5, len(findings), 5)]
    assert [r[3] for r in rows] == ["agrees", "partly", "disagrees", "not measured"]
    assert rows[0][:3] == ["vision wins in deep layers", "blocking video in 15-30 raises audio fidelity ~50%", "+38%"]
    for verdict in ("agrees", "partly", "disagrees", "not-measured"):
        assert f'class="verdict verdict-{verdict}"' in doc
        assert re.search(rf"\.verdict-{verdict} {{ background: #", doc)  # each verdict has its own colour
    assert "only on <strong>long</strong> clips" in doc and "<code>multiclip</code>" in doc


def test_markdownish_text():
    from avlens.report.html import markdownish

    out = markdownish("Lead **in**:\n- one `a**b**`\n- two\n  continued\n\nSecond & <last> para.")
    assert out == (
        "<p>Lead <strong>in</strong>:</p>\n"
        "<ul><li>one <code>a**b**</code></li><li>two continued</li></ul>\n"
        "<p>Second &amp; &lt;last&gt; para.</p>"
    )


def test_section_details():
    with pytest.raises(ValueError, match="verdict"):
        Finding("c", "p", "m", "maybe")
    long = pd.DataFrame({"x": range(250)}, index=pd.Index(range(250), name="sample"))
    report = Report("T").add_section("Same", tables=[long]).add_section("Same")
    doc = report.to_html()
    assert "(first 200 of 250 rows)" in doc and "<th>sample</th>" in doc
    anchors = re.findall(r'<section id="([^"]+)"', doc)
    assert len(set(anchors)) == 2


def test_browser_shows_the_figures(tmp_path):
    with_figures = screenshot(build_report(with_figure=True).save(tmp_path / "with.html"), tmp_path)
    without = screenshot(build_report(with_figure=False).save(tmp_path / "without.html"), tmp_path)
    assert with_figures.shape == (3000, 1200, 3)
    # The magenta axes are 4.5 x 2.4 inches at 120 dpi, about 150 000 pixels; ask for well over half of that.
    assert count_colour(with_figures, MAGENTA) > 80_000
    assert count_colour(without, MAGENTA) == 0
    # The verdicts are visibly coloured (the "agrees" cell background, #d7f0d9).
    assert count_colour(without, (0xD7, 0xF0, 0xD9), tolerance=2) > 500
