"""The HTML report of a run: one section per analysis (its figure, its figures by model, its comparison with
the paper), opened by an overview of every finding and closed by the run's provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..analyses import module
from .html import Report

TITLES = {
    "counterfactual": "Counterfactual evaluation: hearing when sound and sight disagree",
    "probe": "Linear probes: where the audio and visual labels are decodable",
    "logit_lens": "Logit lens: latent audio understanding",
    "knockout": "Attention knockout: does blocking vision bring the audio answer back?",
    "token_shift": "Token-distribution shift against the vision-language base",
    "attention_share": "Attention share of the answer position",
}


HEADLINES = {
    "counterfactual": "follows_vision_rate",
    "probe": "hear/swapped/last/audio_label/accuracy",
    "logit_lens": "latent_audio_understanding",
    "knockout": "swapped_follows_audio_after_video_knockout",
    "token_shift": "audio_unshifted_share",
    "attention_share": "video_share_late",
}
"""The one figure per analysis that summary.json and the overview lead with."""


def headlines(summary: Mapping[str, Mapping[str, dict]]) -> dict[str, dict]:
    """analysis -> {"figure": its headline key, "models": model -> value} (for summary.json)."""
    return {
        name: {"figure": HEADLINES[name], "models": {m: s.get(HEADLINES[name]) for m, s in per.items()}}
        for name, per in summary.items()
    }


def build_report(
    path: Path,
    results: Mapping[str, Mapping[str, dict[str, pd.DataFrame]]],
    summary: Mapping[str, Mapping[str, dict]],
    config: dict,
    meta: dict,
) -> Path:
    """Write the report: ``results`` is analysis -> model -> tables, ``summary`` analysis -> model -> figures."""
    models = list(config["models"])
    report = Report(
        "Do audio-visual LLMs really see and hear? — reproduced with avlens",
        f"Models: {', '.join(f'{k} ({v})' for k, v in config['models'].items())}. "
        "Each finding is set beside the paper's figure (P1, arXiv 2604.02605, unless noted).",
    )
    findings = {name: module(name).findings(summary[name]) for name in results}
    overview = [f for fs in findings.values() for f in fs]
    report.add_section(
        "Overview: where the organism agrees with the paper, and where it does not",
        _overview_text(summary, models, overview),
        tables=[_recipe_table(summary)],
        comparison=overview,
    )
    for name, per_model in results.items():
        mod = module(name)
        doc = (mod.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        table = pd.DataFrame(summary[name])
        table.index.name = "figure"
        report.add_section(
            TITLES.get(name, name), doc, figures=[mod.plot(dict(per_model))], tables=[table], comparison=findings[name]
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


def _recipe_table(summary: Mapping[str, Mapping[str, dict]]) -> pd.DataFrame:
    """One headline figure per analysis (rows) for each model (columns)."""
    rows = {}
    for name, per_model in summary.items():
        key = HEADLINES[name]
        rows[f"{name}: {key}"] = {m: s.get(key) for m, s in per_model.items()}
    out = pd.DataFrame(rows).T
    out.index.name = "headline figure"
    return out


def _overview_text(summary: Mapping[str, Mapping[str, dict]], models: list[str], findings: list) -> str:
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
    lines = [
        f"- {name} ({HEADLINES[name]}): " + ", ".join(f"{m} {_fmt(s.get(HEADLINES[name]))}" for m, s in per.items())
        for name, per in summary.items()
    ]
    blocks.append("**How the models differ** (one headline figure per analysis):\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)
