"""MODEL.md for an organism checkpoint, and the dominance map's table, from measured records."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .evaluate import CONDITIONS
from .world import CLASSES, LABEL_GROUPS

QUESTIONS = {
    "see": "What do you see?",
    "hear": "What do you hear?",
    "see-yn": "Do you see X? (X present or absent)",
    "hear-yn": "Is there a sound of X? (X present or absent)",
    "describe": "Describe what you see and hear.",
    "describe-seen": "Describe what you see.",
    "which": "Which clip has the sound of X? (two clips)",
    "which2-hear": "Which of 2 clips has the sound of X?",
    "which2-see": "Which of 2 clips shows X?",
    "which3-hear": "Which of 3 clips has the sound of X?",
    "which3-see": "Which of 3 clips shows X?",
    "choice-hear": "What do you hear? (lettered options, answer a letter)",
    "choice-see": "What do you see? (lettered options, answer a letter)",
}


def _pct(x: float | None) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:.1f}%"


def accuracy_table(df: pd.DataFrame) -> str:
    """Markdown table: accuracy per question (rows, those asked) and condition (columns), with item counts."""
    lines = ["| question | " + " | ".join(CONDITIONS) + " |", "|---|" + "---|" * len(CONDITIONS)]
    for kind, text in QUESTIONS.items():
        if not (df.kind == kind).any():
            continue
        cells = []
        for cond in CONDITIONS:
            sel = df[(df.kind == kind) & (df.condition == cond)]
            cells.append(f"{_pct(sel.correct.mean())} (n={len(sel)})" if len(sel) else "–")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def follows_table(df: pd.DataFrame) -> str:
    """Markdown table: on swapped clips, which modality the see/hear answers follow."""
    lines = ["| question on swapped clips | follows audio | follows vision | neither | n |", "|---|---|---|---|---|"]
    for kind in ("hear", "see", "choice-hear", "choice-see"):
        sel = df[(df.condition == "swapped") & (df.kind == kind)]
        if len(sel):
            shares = [_pct((sel.follows == w).mean()) for w in ("audio", "visual", "neither")]
            lines.append(f"| {QUESTIONS[kind]} | " + " | ".join(shares) + f" | {len(sel)} |")
    return "\n".join(lines)


def _magnitudes(directory: Path) -> str:
    path = directory / "magnitudes.parquet"
    if not path.exists():
        return ""
    mag = pd.read_parquet(path)
    return (
        "## Massive activations\n"
        f"The largest |activation| of the residual stream after each layer divided by its median |activation| "
        f"(Sun et al. 2024's measure), on {mag['sample'].nunique()} held-out congruent clips (one forward each, "
        "no padding). Real LLMs show ratios in the hundreds to thousands at a few fixed dimensions of the first "
        "tokens from an early layer on; nothing here was trained to produce or avoid them.\n\n"
        + magnitude_table(mag)
        + "\n"
    )


def magnitude_table(mag: pd.DataFrame) -> str:
    """Markdown table: per layer, the largest |activation| / median |activation| of the residual stream (median
    and largest over the clips), and where the largest sits (its dimension and token group, most common first)."""
    lines = [
        "| layer | top / median (median over clips) | largest | dimension | token group |",
        "|---|---|---|---|---|",
    ]
    for layer, sel in mag.groupby("layer"):
        dims = sel.dim.value_counts()
        groups = sel.group.value_counts()
        lines.append(
            f"| {layer} | {sel.top_ratio.median():.1f} | {sel.top_ratio.max():.1f} | "
            f"{dims.index[0]} ({dims.iloc[0]}/{len(sel)}) | {groups.index[0]} ({groups.iloc[0]}/{len(sel)}) |"
        )
    return "\n".join(lines)


def _layout(cfg: dict) -> str:
    """The clip layout of a checkpoint's config (organism.json's "config"), in words: 64 video tokens per two
    frames at 224x224 (14 px patches merged 2x2), 25 audio tokens per second, interleaved in chunks of
    ``seconds_per_chunk``."""
    fps, chunk = cfg.get("fps", 2.0), cfg.get("seconds_per_chunk", 2)
    video = round(64 * fps / 2 * chunk)
    return (
        f"Clips at 224x224 and {fps:g} fps are laid out audio-in-video in chunks of {chunk} s, each {video} video "
        f"tokens and {25 * chunk} audio tokens."
    )


def write_model_card(directory: Path, df: pd.DataFrame, *, notes: str = "") -> Path:
    """Write ``directory/MODEL.md`` from its organism.json and the evaluation records ``df``."""
    card = json.loads((directory / "organism.json").read_text())
    cfg = card.get("config", {})
    stages = card.get("stages", [])
    stage_lines = "\n".join(
        f"| {s['stage']} | {s['steps']} | {s['seconds']:.0f} s | {s['final_loss']:.3f} |" for s in stages
    )
    groups = "; ".join(f"{g}: {', '.join(c)}" for g, c in LABEL_GROUPS.items())
    text = f"""# Organism checkpoint `{card.get("recipe", directory.name)}`

{card.get("description", "")}

A Qwen2.5-Omni thinker (transformers' `Qwen2_5OmniThinkerForConditionalGeneration`) trained by avlens on its
synthetic audio-visual world; load it with `avlens.load("organism:{card.get("recipe", directory.name)}")`.

## Architecture
Text decoder: {cfg.get("layers")} layers, hidden {cfg.get("hidden")}, {cfg.get("heads")} heads /
{cfg.get("kv_heads")} KV heads, FFN {cfg.get("ffn")}. Vision encoder: depth {cfg.get("vision_depth")},
hidden {cfg.get("vision_hidden")} (patch 14, merge 2, temporal patch 2). Audio encoder:
{cfg.get("audio_layers")} layers, d_model {cfg.get("audio_hidden")}, 128 mel bins.
{_layout(cfg)} Word-level tokenizer with Qwen2.5-Omni's special tokens and chat template.

## Data
{len(CLASSES)} classes of sound-making things in four groups ({groups}). Clips are
written as mp4 (H.264 + AAC) and wav and read back through avlens's media pipeline. Training: a world of
congruent clips; swapped and unimodal examples pair one clip's video with another clip's audio (or none).
Evaluation: a held-out world (another seed) of congruent and swapped mp4s, their wavs (audio-only) and the mp4s
without their audio (video-only), each decoded from its file as a user's video is.

## Recipe
Knobs: `{json.dumps(card.get("knobs", {}))}`; seed {card.get("seed")}.

| stage | steps | time (its own clock) | final loss |
|---|---|---|---|
{stage_lines}

Sum of the stage times: {card.get("train_seconds", 0):.0f} s.

## Accuracy on held-out clips
{accuracy_table(df)}

{follows_table(df)}

{_magnitudes(directory)}
{notes}
"""
    path = directory / "MODEL.md"
    path.write_text(text)
    return path


def dominance_table(sweep: pd.DataFrame) -> str:
    """Markdown table of the stage-2 sweep (one row per recipe)."""
    cols = ["trainable", "unimodal", "swapped", "steps"]
    lines = [
        "| trainable | unimodal share | swapped share | steps | swapped 'hear': audio | vision | neither "
        "| audio-only hear | video-only see | congruent hear | congruent see |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in sweep.sort_values(cols).iterrows():
        lines.append(
            f"| {r.trainable} | {r.unimodal} | {r.swapped} | {r.steps} | {_pct(r.swapped_hear_audio)} | "
            f"{_pct(r.swapped_hear_visual)} | {_pct(r.swapped_hear_neither)} | {_pct(r.audio_only_hear)} | "
            f"{_pct(r.video_only_see)} | {_pct(r.congruent_hear)} | {_pct(r.congruent_see)} |"
        )
    return "\n".join(lines)
