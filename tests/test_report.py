"""The HTML report: self-contained, figures embedded as valid PNGs, tables and findings shown, and a browser
really draws the figures (headless Chromium screenshot)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

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
    assert scores == ["layer", "fidelity", "group", "0", "0.123", "video", "1", "12,346", "audio<x>", "2", "–", "last"]
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


# ---------------------------------------------------------------------------------------------------------
# The analyses' figures, tables and the run's report, on a tiny model run end to end
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """P1's, P2's and P3's analyses on a tiny model and 8 organism clips: the run directory, and model -> tables."""
    from test_reproduce import WORDS

    from avlens.data import counterfactual
    from avlens.models.tiny import tiny_model
    from avlens.organism.world import LABEL_GROUPS, WorldConfig, write_world
    from avlens.reproduce import reproduce

    root = tmp_path_factory.mktemp("tiny-run")
    tiny_model("qwen2.5-omni", layers=3, words=WORDS, save_to=root / "model", seed=4)
    write_world(root / "world", 8, 0, cfg=WorldConfig(height=112, width=112), workers=1)
    counterfactual(root / "world" / "manifest.jsonl", root / "cf", groups={k: list(v) for k, v in LABEL_GROUPS.items()})
    model = str(root / "model")
    out = reproduce(root / "out", models={"tiny": model}, base=model, data=root / "cf" / "manifest.jsonl").out
    return out


def _tables_of(out, name: str) -> dict[str, pd.DataFrame]:
    from avlens.analyses import get

    tables = {p.name.split(".")[1]: pd.read_parquet(p).drop(columns="model") for p in out.glob(f"results/{name}.*")}
    spec = get(name)
    return spec.finalize(tables, spec.config()) if spec.finalize else tables


P1 = ("counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share")
P2 = ("sinks", "causal_trace", "mitigate")
P3 = ("flow", "route", "discard")
ANALYSES = P1 + P2 + P3


@pytest.mark.parametrize("name", ANALYSES)
def test_figures_label_every_axis_use_integer_layers_and_keep_legends_off_the_data(tiny_run, name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from avlens.analyses import get

    tables = _tables_of(tiny_run, name)
    if name == "probe":  # 8 clips of 12 classes: no probe can be fitted; a planted table draws every panel
        from test_probe_lens import _planted_features

        assert get(name).plot({"m": tables}).texts  # a figure without data says so
        tables = get(name).finalize({"features": _planted_features(2)}, get(name).Config(folds=3))
    fig = get(name).plot({"vision-heavy": tables, "balanced": tables})
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
    assert axes, name
    for ax in axes:
        where = f"{name}: {ax.get_title()!r}"
        assert ax.get_xlabel() and ax.get_ylabel(), where
        assert ax.get_legend() is None, f"{where}: a legend inside the axes"
        if "layer" in ax.get_xlabel():
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert labels and all(re.fullmatch(r"−?\d+", x) for x in labels), (where, labels)
        if ax.get_yscale() == "log":  # rank axes: only 1, 2, 5, 10... are labelled, no minor labels
            assert not [t for t in ax.yaxis.get_minor_ticks() if t.label1.get_visible() and t.label1.get_text()]
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: the legend covers {ax.get_title()!r}"


def test_a_single_analysis_report_fits_its_run_and_shows_provenance_as_a_table(tiny_run, tmp_path):
    from avlens.analyses import get
    from avlens.report.build import build_report

    name = "probe"
    tables = _tables_of(tiny_run, name)
    summary = {name: {"model": get(name).summarize(tables)}}
    settings = {"folds": 4, "questions": {"hear": "What?"}}
    config = {"models": {"model": "organism:av-balanced"}, "analysis": name, "model": "organism:av-balanced",
              "base": None, "data": "cf/manifest.jsonl", "config": settings}  # fmt: skip
    doc = build_report(
        tmp_path / "report.html", {name: {"model": tables}}, summary, config, {"model_sha256": "ab" * 32}
    )
    doc = doc.read_text()
    title = re.search(r"<h1>(.*?)</h1>", doc).group(1)
    assert "reproduced" not in title and get(name).title in title
    assert "How the models differ" not in doc and "Overview" not in doc
    assert "Model: organism:av-balanced." in doc and "model (organism" not in doc  # no label "model"
    provenance = doc[doc.index("Provenance") :]
    assert "<th>avlens version</th>" in provenance and "<th>avlens git commit</th>" in provenance
    assert "<th>model</th><td>organism:av-balanced</td>" in provenance and "<th>model sha256</th>" in provenance
    assert re.search(
        r"<th>avlens git commit</th><td>([0-9a-f]{40}( \(modified\))?|not a git checkout)</td>", provenance
    )
    assert '{"' not in provenance.split("settings")[0]  # no JSON blob for the run's config
    assert "<th>probe settings</th><td>folds=4; questions={&quot;hear&quot;: &quot;What?&quot;}</td>" in provenance


def test_report_tables_have_named_rows_one_precision_and_n(tiny_run):
    from avlens.analyses import get
    from avlens.report.html import table_html

    for name in ANALYSES:
        tables = _tables_of(tiny_run, name)
        spec = get(name)
        shown = spec.tables({"tiny": spec.summarize(tables)}) if spec.tables else []
        for df in shown:
            html = table_html(df)
            assert "/" not in " ".join(map(str, df.index)), name  # no slash-joined keys
            numbers = re.findall(r'<td class="num">([^<]*)</td>', html)
            decimals = {len(x.split(".")[1]) for x in numbers if "." in x}
            assert decimals <= {3}, (name, decimals)  # one precision
            assert re.search(r"<th>n[ <(]|n \(", html) or ">n<" in html, f"{name}: no n beside its rates"
            for r, row in zip(df.index, df.itertuples(index=False, name=None), strict=True):
                for c, value in zip(df.columns, row, strict=True):
                    label = c[-1] if isinstance(c, tuple) else c
                    rlabel = r[-1] if isinstance(r, tuple) else r
                    if str(label) == "n" or str(rlabel).startswith("n ") or str(label) == "classes":
                        assert value is None or type(value) is int, (name, r, c, value)  # counts as integers
        if name == "probe":
            assert len(shown[0]) <= 2 * 3 * 2 * 2  # conditions x sites x labels x (one) model, not a 72-row dump


DOCS = Path(__file__).parents[1] / "docs" / "results.md"


def documented_columns() -> dict[str, set[str]]:
    """docs/results.md: table heading (``## `name.table` ``) -> the column names of its table's first cells."""
    text = DOCS.read_text()
    out: dict[str, set[str]] = {}
    table = None
    for line in text.splitlines():
        heading = re.match(r"## `([^`]+)`", line)
        if heading:
            table = {"<analysis>.errors": "errors"}.get(heading.group(1), heading.group(1))
            out[table] = set()
        elif line.startswith("## "):
            table = "common"
            out[table] = set()
        elif table and line.startswith("| `"):
            out[table] |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return out


def test_every_column_a_run_writes_is_documented(tiny_run):
    from avlens.analyses import get

    docs = documented_columns()
    common = docs["common"]
    seen = []
    for path in sorted((tiny_run / "results").glob("*.parquet")):
        name, table = path.stem.split(".", 1)
        columns = set(pd.read_parquet(path).columns)
        key = "errors" if table == "errors" else path.stem
        assert key in docs, f"{path.stem} is not in docs/results.md"
        missing = columns - docs[key] - (set() if key == "errors" else common)
        assert not missing, f"{path.stem}: columns {sorted(missing)} are not documented"
        seen.append(path.stem)
    for name in ANALYSES:  # tables computed when the run ends
        spec = get(name)
        if spec.finalize is None:
            continue
        for table, df in _tables_of(tiny_run, name).items():
            key = "errors" if table == "errors" else f"{name}.{table}"
            missing = set(df.columns) - docs.get(key, set()) - (set() if key == "errors" else common) - {"model"}
            assert not missing, f"{key}: columns {sorted(missing)} are not documented"
    assert "knockout.knockout" in seen and "clip" in pd.read_parquet(tiny_run / "results" / "knockout.knockout.parquet")
    window_end = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `window_end`"))
    assert "exclusive" in window_end


@pytest.mark.parametrize("name", ANALYSES)
def test_a_figure_with_no_data_is_null_with_n_zero(tiny_run, name):
    """Every analysis summarised on tables without a row: its figures are None, its counts 0 (never 0.0)."""
    from avlens.analyses import get
    from avlens.analyses.base import flat
    from avlens.jsonvalues import strict_json

    spec = get(name)
    tables = {t: df.iloc[0:0] for t, df in _tables_of(tiny_run, name).items() if t not in ("probes", "skipped")}
    if spec.finalize is not None:
        tables = spec.finalize(tables, spec.config())
    summary = spec.summarize(tables)
    assert spec.headline_of(summary) is None
    figures = flat(strict_json(summary))
    figures.pop("n_layers", None)  # the model's depth, not a count of data
    counts = {k: v for k, v in figures.items() if re.fullmatch(r"(.*_)?n(_.*)?", k.split("/")[-1])}
    assert counts and all(v == 0 and isinstance(v, int) for v in counts.values()), counts
    others = {k: v for k, v in figures.items() if k not in counts}
    assert all(v is None or v == {} for v in others.values()), others
