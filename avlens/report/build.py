"""The HTML report of a run: one section per analysis (its figure, its figures by model, its comparison with
the paper), opened by an overview of every finding and closed by the run's provenance.

Everything about an analysis (title, headline figure, findings, figure) comes from its registry spec
(:mod:`avlens.analyses.registry`); summaries are the analyses' typed results, read by attribute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..analyses import get
from ..analyses.base import flat, jsonable
from .html import Report

PAPERS = {"P1": "P1, arXiv 2604.02605"}


def headlines(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """analysis -> {"figure": its headline field, "models": model -> value} (for summary.json)."""
    out = {}
    for name, per in summary.items():
        spec = get(name)
        out[name] = {"figure": spec.headline, "models": {m: jsonable(spec.headline_of(s)) for m, s in per.items()}}
    return out


def build_report(
    path: Path,
    results: Mapping[str, Mapping[str, dict[str, pd.DataFrame]]],
    summary: Mapping[str, Mapping[str, Any]],
    config: dict,
    meta: dict,
) -> Path:
    """Write the report: ``results`` is analysis -> model -> tables, ``summary`` analysis -> model -> the
    analysis's Summary."""
    models = list(config["models"])
    report = Report(
        "Do audio-visual LLMs really see and hear? — reproduced with avlens",
        f"Models: {', '.join(f'{k} ({v})' for k, v in config['models'].items())}. "
        "Each finding is set beside the paper's figure (P1, arXiv 2604.02605, unless noted).",
    )
    specs = {name: get(name) for name in results}
    findings = {name: spec.findings(dict(summary[name])) for name, spec in specs.items()}
    overview = [f for fs in findings.values() for f in fs]
    report.add_section(
        "Overview: where the organism agrees with the paper, and where it does not",
        _overview_text(summary, models, overview),
        tables=[_recipe_table(summary)],
        comparison=overview,
    )
    for name, per_model in results.items():
        spec = specs[name]
        about = spec.about or ""
        doc = about.strip().split("\n\n")[0].replace("\n", " ")
        if spec.paper != "P1":
            doc = f"{doc} (tests {PAPERS.get(spec.paper, spec.paper)}: {spec.claim})".strip()
        table = pd.DataFrame({m: flat(s) for m, s in summary[name].items()})
        table.index.name = "figure"
        report.add_section(
            spec.title, doc, figures=[spec.plot(dict(per_model))], tables=[table], comparison=findings[name]
        )
    report.add_section(
        "Provenance",
        "The run's configuration and the sha256 of every model's weights; results/ holds every record as Parquet.",
        tables=[
            pd.DataFrame(
                {"value": [json.dumps(config, default=str), json.dumps(meta, default=str)]}, index=["config", "meta"]
            )
        ],
    )
    return report.save(path)


def _recipe_table(summary: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One headline figure per analysis (rows) for each model (columns)."""
    rows = {}
    for name, per_model in summary.items():
        spec = get(name)
        rows[f"{name}: {spec.headline}"] = {m: spec.headline_of(s) for m, s in per_model.items()}
    out = pd.DataFrame(rows).T
    out.index.name = "headline figure"
    return out


def _overview_text(summary: Mapping[str, Mapping[str, Any]], models: list[str], findings: list) -> str:
    """Plain sentences: which findings hold on these models, which do not, and how the models differ."""
    blocks = []
    if any(m in ("vision-heavy", "balanced") for m in models):
        blocks.append(
            "The organism is a small Qwen2.5-Omni trained by avlens; its two recipes differ only in stage-2 data: "
            "**vision-heavy** never sees a clip whose sound disagrees with its picture, **balanced** does (30% of "
            "audio-visual clips), with the hearing answer taken from the sound."
        )
    for verdict, title in (
        ("agrees", "Agrees with the paper"),
        ("partly", "Partly agrees"),
        ("disagrees", "Does not agree"),
    ):
        chosen = [f for f in findings if f.verdict == verdict]
        if chosen:
            blocks.append(f"**{title}:**\n" + "\n".join(f"- {f.claim} — measured: {f.measured}" for f in chosen))
    lines = []
    for name, per in summary.items():
        spec = get(name)
        values = ", ".join(f"{m} {_fmt(spec.headline_of(s))}" for m, s in per.items())
        lines.append(f"- {name} ({spec.headline}): {values}")
    blocks.append("**How the models differ** (one headline figure per analysis):\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
