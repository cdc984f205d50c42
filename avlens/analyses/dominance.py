"""Unimodal-dominance splits (P2): which clips a model answers by their sound, which by their picture.

Not a registry analysis (it writes manifests for later analyses rather than records and findings), but an
analysis all the same: it runs the model, so it lives here and not in :mod:`avlens.data`.

    report = dominance(avlens.load("organism"), "clips.jsonl", "dom", question="What do you hear?", labels=[...])
    report.files["audio_dominant"]  # a manifest of the audio-dominant clips
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.builders import (
    BuildReport,
    Progress,
    audio_of,
    first_label,
    manifest_table,
    problem_row,
    with_columns,
)
from ..data.manifest import relative_path, write_manifest
from ..errors import InputError
from ..media import VideoClip, load_video
from ..models.base import Adapter, Sample
from ..trace import generate
from .common import row_prompt

__all__ = ["VARIANTS", "dominance", "dominant_of", "zeroed"]

VARIANTS = ("joint", "audio_only", "video_only")


def dominance(
    adapter: Adapter,
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    question: str,
    labels: Sequence[str],
    answer_of: Callable[[str, Sequence[str]], str | None] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
) -> BuildReport:
    """Split a manifest into audio-dominant and video-dominant clips by the model's own answers (P2).

    Each clip is asked ``question`` three times (greedy generation): ``joint`` (frames and waveform),
    ``audio_only`` (frames zeroed, waveform kept) and ``video_only`` (waveform zeroed, frames kept). The media
    are decoded once and zeroed in memory, so the three prompts have the same tokens; the video and its audio
    are laid out as the model lays out a video with its own track (interleaved, for Omni models). Each answer
    is mapped to a label with ``answer_of(text, labels)``.

    A clip is audio-dominant when joint == audio_only != video_only, video-dominant when
    joint == video_only != audio_only, with the joint answer a label (not None) in both cases.

    Output, under ``out_dir``: ``answers.parquet`` (every clip answered: its manifest columns, ``text_<variant>``,
    ``answer_<variant>`` for the three variants, and ``dominant``: "audio", "video" or null), and
    ``audio_dominant.jsonl`` / ``video_dominant.jsonl`` (the rows of each set, same columns; manifests for
    later analyses).

    Args:
        adapter: the model (``adapter.prepare`` builds the inputs, :func:`avlens.trace.generate` answers).
        manifest: a manifest file or table; needs ``video`` (and ``audio`` where the sound is a separate file).
        question: the prompt, e.g. "Which of bell, drum, bird is in the clip? Answer with one word."; ``{question}``
            in it is each row's own ``question`` column (e.g. :func:`avlens.data.formats.vggsound`'s lettered
            options, with ``labels=LETTERS`` and ``answer_of=read_letter``).
        labels: the answers to look for.
        answer_of: text, labels -> label or None (default :func:`first_label`).
        batch_size: clips per generation batch (each gives 3 prompts).
        max_new_tokens: longest answer.
        progress: called with (clips done, clips).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not labels:
        raise InputError("no labels given to map answers to")
    answer_of = answer_of or first_label
    df = manifest_table(manifest, ("video",))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = getattr(adapter, "options", None)
    fps, max_frames = getattr(options, "fps", 2.0), getattr(options, "max_frames", None)

    problems: list[dict] = []
    answered: list[dict] = []
    rows = df.to_dict("records")
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        samples: list[Sample] = []
        for row in chunk:
            try:
                video = load_video(row["video"], fps=fps, max_frames=max_frames)
                audio = audio_of(row)
            except InputError as e:
                problems.append(problem_row(row["id"], e))
                continue
            prompt, problem = row_prompt(row, question)
            if problem is not None:
                problems.append({"id": row["id"], "file": None, "reason": problem})
                continue
            samples += _dominance_samples(row["id"], prompt, video, audio)
        texts = _generate_texts(adapter, samples, max_new_tokens, problems)
        for row in chunk:
            got = {v: texts.get(f"{row['id']}:{v}") for v in VARIANTS}
            if any(t is None for t in got.values()):
                continue  # failed to load or to build (reported)
            answers = {v: answer_of(t, labels) for v, t in got.items()}
            record = dict(row)
            record["video"] = relative_path(row["video"], out_dir)
            if "audio" in record:
                record["audio"] = relative_path(row["audio"], out_dir)
            record |= {f"text_{v}": got[v] for v in VARIANTS} | {f"answer_{v}": answers[v] for v in VARIANTS}
            record["dominant"] = dominant_of(answers)
            answered.append(record)
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))

    columns = [*df.columns, *(f"text_{v}" for v in VARIANTS), *(f"answer_{v}" for v in VARIANTS), "dominant"]
    table = with_columns(pd.DataFrame.from_records(answered), columns)
    files = {"answers": write_manifest(table, out_dir / "answers.parquet")}
    counts = {}
    for kind in ("audio", "video"):
        subset = table[table["dominant"] == kind]
        files[f"{kind}_dominant"] = write_manifest(subset, out_dir / f"{kind}_dominant.jsonl")
        counts[f"{kind}_dominant"] = len(subset)
    return BuildReport(len(table), problems, files["answers"], files=files, counts=counts)


def zeroed(video: VideoClip, audio: np.ndarray) -> dict[str, tuple[VideoClip, np.ndarray]]:
    """The media of each variant: ``joint`` as given, ``audio_only`` with every frame zeroed, ``video_only`` with
    the waveform zeroed (P2's unimodal inputs). Shapes are kept, so the three prompts have the same tokens."""
    blank = replace(video, frames=np.zeros_like(video.frames))
    return {"joint": (video, audio), "audio_only": (blank, audio), "video_only": (video, np.zeros_like(audio))}


def _dominance_samples(row_id: str, question: str, video: VideoClip, audio: np.ndarray) -> list[Sample]:
    return [
        Sample(question, video=v, audio=a, id=f"{row_id}:{variant}", meta={"source_id": row_id, "variant": variant})
        for variant, (v, a) in zeroed(video, audio).items()
    ]


def _generate_texts(adapter: Adapter, samples: list[Sample], max_new_tokens: int, problems: list[dict]) -> dict:
    """Sample id -> generated text; samples that cannot be built are reported once per source row."""
    if not samples:
        return {}
    failed: dict[str, InputError] = {}
    try:
        inputs = adapter.prepare(samples, interleave=True)
    except InputError as e:  # none of the samples could be built
        for s in samples:
            failed.setdefault(s.meta["source_id"], e)
        inputs = None
    else:
        for e in inputs.errors:
            sample = next((s for s in samples if s.id == e.sample), None)
            failed.setdefault(sample.meta["source_id"] if sample else str(e.sample), e)
    for row_id, e in failed.items():
        problems.append({"id": row_id, "file": e.path, "reason": e.problem})
    if inputs is None:
        return {}
    trace = generate(adapter, inputs, max_new_tokens=max_new_tokens)
    return {s.id: text for s, text in zip(inputs.samples, trace.text, strict=True)}


def dominant_of(answers: Mapping[str, object]) -> str | None:
    """ "audio" when the joint answer equals the audio-only one and differs from the video-only one, "video" the
    other way round, None otherwise or when the joint answer is None (the keys are :data:`VARIANTS`)."""
    joint, heard, seen = answers["joint"], answers["audio_only"], answers["video_only"]
    if joint is None:
        return None
    if joint == heard != seen:
        return "audio"
    if joint == seen != heard:
        return "video"
    return None
