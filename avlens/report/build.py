"""The HTML report of a run: one section per analysis (its figure, its tables, its comparison with the paper),
opened by an overview of every finding and closed by the run's provenance.

Everything about an analysis (title, headline figure, findings, figure, tables) comes from its registry spec
(:mod:`avlens.analyses.registry`); summaries are the analyses' typed results, read by attribute.

A report of ``reproduce`` (several analyses of P1, P2 and P3, usually two models side by side) is titled after the paper
and compares the models; a report of ``avlens run`` (one analysis, one model) is titled after the analysis.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..analyses import get
from ..analyses.base import flat, jsonable
from ..analyses.tables import object_frame
from .html import Report

PAPERS = {"P1": "P1, arXiv 2604.02605", "P2": "P2, arXiv 2605.10815", "P3": "P3, arXiv 2606.10147"}
ORGANISM = ("vision-heavy", "balanced")


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
    analysis's Summary; ``config`` the run's config (``models``: label -> model name; ``analysis`` set for a
    single-analysis ``avlens run``), ``meta`` its provenance. run.json beside ``path``, when there is one, adds
    the versions and start time."""
    path = Path(path)
    models = dict(config.get("models") or {})
    specs = {name: get(name) for name in results}
    single = "analysis" in config or len(specs) == 1
    if single:
        spec = next(iter(specs.values()))
        title = f"{spec.title} — avlens run {spec.name}"
    else:
        papers = sorted({s.paper for s in specs.values()})
        listed = papers[0] if len(papers) == 1 else f"{', '.join(papers[:-1])} and {papers[-1]}"
        title = f"Do audio-visual LLMs really see and hear? — {listed} reproduced with avlens"
    alone = len(models) == 1 and next(iter(models)) == "model"  # avlens run: the label says nothing
    subtitle = f"Model{'s' if len(models) > 1 else ''}: " + ", ".join(
        str(v) if alone or k == v else f"{k} ({v})" for k, v in models.items()
    )
    subtitle += ". Each finding is set beside the paper's figure (P1, arXiv 2604.02605, unless noted)."
    report = Report(title, subtitle)
    findings = {name: spec.findings(dict(summary[name])) for name, spec in specs.items()}
    overview = [f for fs in findings.values() for f in fs]
    if not single:
        report.add_section(
            "Overview: where the models agree with the paper, and where they do not",
            _overview_text(list(models), overview),
            tables=[_headline_table(summary)],
            comparison=overview,
        )
    for name, per_model in results.items():
        spec = specs[name]
        doc = (spec.about or "").strip().split("\n\n")[0].replace("\n", " ")
        if spec.paper != "P1":
            doc = f"{doc} (tests {PAPERS.get(spec.paper, spec.paper)}: {spec.claim})".strip()
        per = dict(summary[name])
        tables = spec.tables(per) if spec.tables is not None else [summary_table(per)]
        report.add_section(
            spec.title, doc, figures=[spec.plot(dict(per_model))], tables=tables, comparison=findings[name]
        )
    report.add_section(
        "Provenance",
        "How this run was made; `results/` beside this report holds every record as Parquet "
        "(columns: docs/results.md).",
        tables=[provenance_table(config, meta, _run_info(path.parent))],
    )
    return report.save(path)


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def words(key: str) -> str:
    """A summary field's name as words: ``"hear/factual"`` -> "hear · factual", ``"follows_vision_rate"`` ->
    "follows vision rate"."""
    return " · ".join(part.replace("_", " ") for part in str(key).split("/"))


def summary_table(summaries: Mapping[str, Any]) -> pd.DataFrame:
    """Every field of the models' summaries (rows, in words) for each model (columns), values as they are (ints
    stay ints; None is "–")."""
    figures = {m: flat(s) for m, s in summaries.items()}
    keys = list(dict.fromkeys(k for f in figures.values() for k in f))
    table = object_frame({words(k): {m: f.get(k) for m, f in figures.items()} for k in keys})
    table.index.name = "figure"
    return table


def _headline_table(summary: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One headline figure per analysis (rows) for each model (columns)."""
    rows = {}
    for name, per_model in summary.items():
        spec = get(name)
        rows[f"{spec.name}: {words(spec.headline)}"] = {m: spec.headline_of(s) for m, s in per_model.items()}
    out = object_frame(rows)
    out.index.name = "analysis: headline figure"
    out.attrs["caption"] = "How the models differ: one headline figure per analysis (the tables below give each n)"
    return out


def _overview_text(models: list[str], findings: list) -> str:
    """Plain sentences: which findings hold on these models and which do not."""
    blocks = []
    if set(ORGANISM) & set(models):
        blocks.append(
            "The organism is a small Qwen2.5-Omni trained by avlens; its two recipes differ only in stage-2 data: "
            "**vision-heavy** never sees a clip whose sound disagrees with its picture, **balanced** does (30% of "
            "audio-visual clips), with the hearing answer taken from the sound."
        )
    for verdict, title in (
        ("agrees", "Agrees with the paper"),
        ("partly", "Partly agrees"),
        ("disagrees", "Does not agree"),
        ("not measured", "Not measured"),
    ):
        chosen = [f for f in findings if f.verdict == verdict]
        if chosen:
            blocks.append(f"**{title}:**\n" + "\n".join(f"- {f.claim}" for f in chosen))
    return "\n\n".join(blocks)


def provenance_table(config: Mapping[str, Any], meta: Mapping[str, Any], info: Mapping[str, Any]) -> pd.DataFrame:
    """The run's provenance as rows a reader can scan: avlens version and git commit, library versions, start,
    models and their weights' sha256, base, data, seed, and each analysis's settings."""
    rows: dict[str, Any] = {"avlens version": _avlens_version()}
    commit = _git_commit()
    rows["avlens git commit"] = commit or "not a git checkout"
    for lib, version in (info.get("versions") or {}).items():
        if lib != "avlens":
            rows[f"{lib} version"] = version
    if info.get("started"):
        rows["started"] = info["started"]
    models = dict(config.get("models") or {})
    alone = list(models) == ["model"]  # avlens run: one model, labelled "model"
    for label, name in models.items():
        rows["model" if alone else f"model {label}"] = name
    hashes = meta.get("model_sha256")
    if isinstance(hashes, Mapping):
        rows |= {"model sha256" if alone else f"model {label} sha256": h for label, h in hashes.items()}
    elif hashes:
        rows["model sha256"] = hashes
    if config.get("base"):
        rows["base model"] = config["base"]
    if meta.get("base_sha256"):
        rows["base model sha256"] = meta["base_sha256"]
    if config.get("data") is not None:
        rows["data"] = _compact(config["data"])
    if config.get("seed") is not None:
        rows["seed"] = config["seed"]
    settings = config.get("analyses") or ({config["analysis"]: config.get("config")} if "analysis" in config else {})
    for name, cfg in settings.items():
        rows[f"{name} settings"] = _compact(cfg)
    out = pd.DataFrame({"value": [str(v) if v is not None else None for v in rows.values()]}, index=list(rows))
    out.index.name = "provenance"
    return out


def _compact(value: Any) -> str:
    """A config value as ``key=value`` pairs (nested ones as JSON), strings as they are."""
    if isinstance(value, Mapping):
        return "; ".join(
            f"{k}={v if isinstance(v, str | int | float | bool) or v is None else json.dumps(jsonable(v))}"
            for k, v in value.items()
        )
    return str(value)


def _avlens_version() -> str:
    try:
        return importlib.metadata.version("avlens")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _git_commit() -> str | None:
    """The commit of the avlens checkout this runs from ("<sha> (modified)" with uncommitted changes), None
    outside a git checkout or without git."""
    where = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha} (modified)" if dirty else sha or None


def _run_info(directory: Path) -> dict:
    """run.json of the run directory (versions, start time), or {} when there is none."""
    try:
        return json.loads((directory / "run.json").read_text())
    except (OSError, ValueError):
        return {}
