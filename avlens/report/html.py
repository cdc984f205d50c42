"""A self-contained HTML report: one file, readable offline, with figures, tables and the paper comparison.

    report = Report("Qwen2.5-Omni on AVQA", subtitle="run 3f2a9c, 2 000 samples")
    report.add_section(
        "Counterfactual dominance",
        "Blocking **video** in layers 15-30 raises audio fidelity.\\n\\n- 2 000 samples\\n- `sdpa` attention",
        figures=[fig],
        tables=[summary_df],
        comparison=[Finding("vision wins in deep layers", paper="...", measured="...", verdict="agrees")],
    )
    report.save("report.html")

Everything is inline (figures as base64 PNG, CSS in a <style>): no network, no JavaScript, so the file can be
mailed, archived or opened years later as it is. Figures are rendered to PNG when the section is added, so
the caller may close them straight away.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..analyses.base import Finding

# Colours are chosen to read in print and for colour-blind readers alongside the verdict's own word.
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       line-height: 1.5; background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { margin-bottom: 0.2rem; }
.subtitle { color: #555; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.5rem; }
nav.toc { background: #f6f7f9; border: 1px solid #e2e4e8; padding: 0.6rem 1.2rem; display: inline-block; }
nav.toc ol { margin: 0.3rem 0; padding-left: 1.4rem; }
code { background: #f0f1f3; padding: 0 0.25em; border-radius: 3px; font-size: 0.92em; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 0.9em; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #d8dade; padding: 0.25rem 0.6rem; vertical-align: top; }
th { background: #f0f1f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 0.3rem; }
.verdict { font-weight: bold; white-space: nowrap; }
.verdict-agrees { background: #d7f0d9; color: #1b5e20; }
.verdict-partly { background: #fff1c2; color: #7a5a00; }
.verdict-disagrees { background: #f9d6d5; color: #a4161a; }
.verdict-not-measured { background: #e8e9eb; color: #555; }
"""


@dataclass(frozen=True)
class _Figure:
    png: bytes
    alt: str


@dataclass(frozen=True)
class _Section:
    title: str
    anchor: str
    text: str
    figures: tuple[_Figure, ...]
    tables: tuple[pd.DataFrame, ...]
    comparison: tuple[Finding, ...]


class Report:
    """An HTML report built section by section, saved as one self-contained file."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[_Section] = []

    def add_section(
        self,
        title: str,
        text_markdownish: str = "",
        figures: Sequence[Figure] = (),
        tables: Sequence[pd.DataFrame] = (),
        comparison: Sequence[Finding] = (),
    ) -> Report:
        """Add a section (returns the report, so calls can be chained).

        Args:
            title: the section heading, also its entry in the table of contents.
            text_markdownish: paragraphs separated by blank lines, ``**bold**``, ```code```, and bullet lists
                of lines starting with ``- ``. Everything else is shown as written (HTML is escaped).
            figures: matplotlib figures, embedded as PNG now (the caller may close them afterwards). The alt
                text is the figure's suptitle, or else the section title.
            tables: DataFrames, shown in order; a caption may be set as ``df.attrs["caption"]``.
            comparison: findings set against the paper, shown as a table with coloured verdicts.
        """
        anchor = f"s{len(self.sections) + 1}-{_slug(title)}"
        rendered = tuple(_Figure(_png(fig), _alt_text(fig, title)) for fig in figures)
        copies = tuple(df.copy() for df in tables)  # the caller may go on changing its frames
        self.sections.append(_Section(title, anchor, text_markdownish, rendered, copies, tuple(comparison)))
        return self

    def to_html(self) -> str:
        """The whole report as one HTML document."""
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            "<main>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.subtitle:
            parts.append(f'<p class="subtitle">{_inline(self.subtitle)}</p>')
        if self.sections:
            items = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in self.sections)
            parts.append(f'<nav class="toc"><strong>Contents</strong><ol>{items}</ol></nav>')
        parts.extend(_section_html(s) for s in self.sections)
        parts += ["</main>", "</body>", "</html>", ""]
        return "\n".join(parts)

    def save(self, path: str | Path) -> Path:
        """Write the report to ``path`` (UTF-8). Returns the path."""
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _section_html(section: _Section) -> str:
    parts = [f'<section id="{section.anchor}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        parts.append(markdownish(section.text))
    for fig in section.figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(fig.alt)}"></figure>')
    parts.extend(table_html(df) for df in section.tables)
    if section.comparison:
        parts.append(findings_html(section.comparison))
    parts.append("</section>")
    return "\n".join(parts)


def markdownish(text: str) -> str:
    """A tiny Markdown subset as HTML: paragraphs (blank-line separated), ``- `` bullet lists, bold, code.

    Everything else is escaped, so the text may hold <, > and & freely.
    """
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        # A block may open with a lead-in sentence followed by its bullets.
        lead = []
        while lines and not lines[0].startswith("- "):
            lead.append(lines.pop(0))
        if lead:
            blocks.append(f"<p>{_inline(' '.join(lead))}</p>")
        if lines:
            items = []
            for line in lines:
                if line.startswith("- "):
                    items.append(line[2:])
                else:  # a continuation line of the previous bullet
                    items[-1] += " " + line
            blocks.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
    return "\n".join(blocks)


def _inline(text: str) -> str:
    """Escape ``text`` and turn ```code``` and ``**bold**`` into HTML (nothing is formatted inside code)."""
    out = []
    for i, part in enumerate(re.split(r"`([^`]+)`", text)):
        if i % 2:  # the odd parts of the split are the code spans
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def format_number(x: object) -> str:
    """A table cell: ints as they are, floats to 3 decimals (one precision for every figure; large ones whole,
    with thousands separators), missing values as an en dash."""
    if x is None or (pd.api.types.is_scalar(x) and pd.isna(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.0f}" if 1e4 <= abs(x) < 1e12 else f"{x:.3f}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 1e4 else str(x)
    return str(x)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def table_html(df: pd.DataFrame, max_rows: int = 200) -> str:
    """A DataFrame as an HTML table: numbers right-aligned and rounded, long tables cut at ``max_rows``; columns
    with two levels (a MultiIndex, e.g. (model, figure)) get two header rows."""
    shown = df.head(max_rows)
    # A default, unnamed 0..n-1 index says nothing; a named or labelled one (e.g. set_index("layer")) does.
    show_index = any(n is not None for n in df.index.names) or not isinstance(df.index, pd.RangeIndex)
    index_head = html.escape(", ".join(str(n) for n in df.index.names if n is not None))
    if isinstance(df.columns, pd.MultiIndex) and df.columns.nlevels == 2:
        top: list[tuple[str, int]] = []
        for a, _ in df.columns:
            if top and top[-1][0] == a:
                top[-1] = (a, top[-1][1] + 1)
            else:
                top.append((a, 1))
        first = "<tr>" + (f'<th rowspan="2">{index_head}</th>' if show_index else "")
        first += "".join(f'<th colspan="{n}">{html.escape(str(a))}</th>' for a, n in top) + "</tr>"
        second = "<tr>" + "".join(f"<th>{html.escape(str(b))}</th>" for _, b in df.columns) + "</tr>"
        head = [first, second]
    else:
        head = ["<tr>"]
        if show_index:
            head.append(f"<th>{index_head}</th>")
        head += [f"<th>{html.escape(str(c))}</th>" for c in df.columns]
        head.append("</tr>")
    rows = []
    for index, values in zip(shown.index, shown.itertuples(index=False, name=None), strict=True):
        label = ", ".join(map(str, index)) if isinstance(index, tuple) else str(index)  # tuple: a MultiIndex row
        cells = [f"<th>{html.escape(label)}</th>"] if show_index else []
        for value in values:
            value = _python(value)
            text = html.escape(format_number(value))
            cells.append(f'<td class="num">{text}</td>' if _is_number(value) else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = df.attrs.get("caption", "")
    if len(df) > max_rows:
        caption = f"{caption} (first {max_rows} of {len(df)} rows)".strip()
    return (
        '<div class="table-wrap"><table>'
        + (f"<caption>{html.escape(caption)}</caption>" if caption else "")
        + f"<thead>{''.join(head)}</thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def findings_html(findings: Sequence[Finding]) -> str:
    """Findings as a table: claim, the paper's figure, ours, and the verdict in its colour."""
    head = "".join(f"<th>{h}</th>" for h in ("Claim", "Paper", "Measured", "Verdict", "Note"))
    rows = []
    for f in findings:
        verdict_class = "verdict-" + f.verdict.replace(" ", "-")
        rows.append(
            f"<tr><td>{_inline(f.claim)}</td><td>{_inline(f.paper)}</td><td>{_inline(f.measured)}</td>"
            f'<td class="verdict {verdict_class}">{html.escape(f.verdict)}</td><td>{_inline(f.note)}</td></tr>'
        )
    return (
        '<div class="table-wrap"><table class="findings"><caption>Compared with the paper</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _python(value: object) -> object:
    # numpy scalars -> Python scalars, so that format_number sees floats and ints.
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _alt_text(fig: Figure, fallback: str) -> str:
    return fig.get_suptitle() or fallback


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "section"
