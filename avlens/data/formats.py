"""Benchmarks users bring, as avlens manifests, and multiple-choice prompts answered with a letter.

- :func:`avhbench`: AVHBench's release (``json/<video_id>.json`` QA lists and ``video/<video_id>.mp4``).
- :func:`vggsound`: VGGSound's label CSV (``youtube_id,start_seconds,label,split``, no header) over a folder of
  clips, as P2's 20-way multiple choice (``mc_prompt``) with the right letter as the expected answer.
- :func:`mc_prompt` / :func:`read_letter`: lettered options and the letter read back from an answer.

Each row's prompt is in its ``question`` column and its right answer in ``expect_question``: give an analysis
the question ``{question}`` (``avlens run NAME --question "question={question}"``) to ask each row its own.
Rows that cannot be used (a missing video, a malformed entry) are reported in the BuildReport, one line each
naming the file, and the rest are written.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import InputError
from .builders import BuildReport, Progress
from .manifest import relative_path, write_manifest

__all__ = ["LETTERS", "avhbench", "mc_prompt", "read_letter", "vggsound"]

LETTERS = "ABCDEFGHIJKLMNOPQRST"
"""Option letters: up to 20 options (VGGSound 20-way, as P2)."""

MC_INSTRUCTION = "Respond ONLY with a single label letter."
"""P2's instruction after the options."""

AVHBENCH_KINDS = {
    "Video-driven Audio Hallucination": "hear_yn",
    "Audio-driven Video Hallucination": "see_yn",
    "AV Matching": "match",
    "AV Captioning": "caption",
}
"""AVHBench's task names -> the ``kind`` column."""


def mc_prompt(question: str, options: Sequence[str], instruction: str = MC_INSTRUCTION) -> str:
    """``question`` followed by lettered options and the instruction: "Q (A) dog (B) bell ... Respond ONLY..."."""
    if not 2 <= len(options) <= len(LETTERS):
        raise InputError(f"multiple choice needs 2 to {len(LETTERS)} options, got {len(options)}")
    listed = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"{question} {listed} {instruction}".strip()


def read_letter(text: str, labels: Sequence[str] = tuple(LETTERS)) -> str | None:
    """The option letter an answer gives (upper case), if it is one of ``labels``: the answer itself when it is
    one letter ("b", "B.", "(B)"), else the first "(x)" in it ("(C) dog"), else its first stand-alone capital
    letter that is not the pronoun I ("Answer: B", "I think it is B"). None when there is none."""
    allowed = {x.upper() for x in labels}
    stripped = text.strip().strip("().:*").strip()
    if len(stripped) == 1 and stripped.upper() in allowed:
        return stripped.upper()
    for m in re.finditer(r"\(([A-Za-z])\)", text):
        if m.group(1).upper() in allowed:
            return m.group(1).upper()
    for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text):
        if m.group(1) == "I" and re.match(r"\s+[a-z]", text[m.end() :]):
            continue  # the pronoun ("I think it is B")
        if m.group(1) in allowed:
            return m.group(1)
    return None


def avhbench(root: str | Path, out_dir: str | Path, *, progress: Progress | None = None) -> BuildReport:
    """AVHBench's QA files as one manifest.

    ``root`` holds ``json/<video_id>.json`` (each a list of ``{"video_id", "task", "text", "label"}``) and
    ``video/<video_id>.mp4`` (the real clip; a ``<video_id>_swap.mp4`` beside it is the swapped one, whose QA
    files name it by its own video_id). Output ``out_dir/manifest.jsonl``, one row per QA: ``id``
    (``<video_id>-<k>``), ``video``, ``audio_label`` and ``visual_label`` (null: AVHBench has no classes),
    ``task`` (AVHBench's), ``kind`` (``hear_yn``, ``see_yn``, ``match``,
    ``caption``), ``question`` (the prompt), ``expect_question`` (``yes`` / ``no`` lower-cased; the reference
    caption for captioning), ``source_file``.
    """
    root, out_dir = Path(root), Path(out_dir)
    files = sorted((root / "json").glob("*.json"))
    if not files:
        raise InputError("no AVHBench QA files (expected json/<video_id>.json)", path=str(root))
    problems, records = [], []
    for n, f in enumerate(files):
        if progress is not None:
            progress(n, len(files))
        try:
            entries = json.loads(f.read_text())
            if not isinstance(entries, list):
                raise ValueError("not a list of QA entries")
        except (OSError, ValueError) as e:
            problems.append({"id": f.stem, "file": str(f), "reason": f"unreadable QA file: {e}"})
            continue
        for k, qa in enumerate(entries):
            row_id = f"{f.stem}-{k}"
            missing = [c for c in ("video_id", "task", "text", "label") if not isinstance(qa, dict) or c not in qa]
            if missing:
                problems.append({"id": row_id, "file": str(f), "reason": f"QA entry without {', '.join(missing)}"})
                continue
            video = root / "video" / f"{qa['video_id']}.mp4"
            if not video.exists():
                problems.append({"id": row_id, "file": str(video), "reason": "video file not found"})
                continue
            kind = AVHBENCH_KINDS.get(qa["task"], "other")
            label = str(qa["label"]).strip()
            records.append(
                {
                    "id": f"{qa['video_id']}-{k}",
                    "video": relative_path(str(video), out_dir),
                    "audio_label": None,  # AVHBench names no classes: its questions carry their own answers
                    "visual_label": None,
                    "task": qa["task"],
                    "kind": kind,
                    "question": str(qa["text"]),
                    "expect_question": label.lower() if kind != "caption" else label,
                    "source_file": f.name,
                }
            )
    if progress is not None:
        progress(len(files), len(files))
    path = write_manifest(pd.DataFrame.from_records(records), out_dir / "manifest.jsonl")
    return BuildReport(len(records), problems, path, files={"manifest": path}, counts={"qa": len(records)})


def vggsound(
    csv: str | Path,
    video_dir: str | Path,
    out_dir: str | Path,
    *,
    n_options: int = 20,
    split: str | None = "test",
    question: str = "What is in this clip?",
    seed: int = 0,
    progress: Progress | None = None,
) -> BuildReport:
    """VGGSound's label CSV as P2's multiple choice.

    ``csv`` has rows ``youtube_id,start_seconds,label,split`` (no header, as released); the clip of a row is
    ``video_dir/<youtube_id>_<start_seconds:06d>.mp4``. Rows of ``split`` (None: all) whose clip exists are
    written to ``out_dir/manifest.jsonl`` with ``id``, ``video``, ``audio_label`` and ``visual_label`` (the
    class: VGGSound labels are audio-visual), ``split``, ``options`` (``n_options`` classes: the right one and
    distractors drawn from the other labels of the file, in an order drawn per row from ``seed``), ``answer``
    (the right letter), ``question`` (:func:`mc_prompt`) and ``expect_question`` (= ``answer``). Read answers
    with :func:`read_letter`.
    """
    csv, video_dir, out_dir = Path(csv), Path(video_dir), Path(out_dir)
    try:
        table = pd.read_csv(csv, header=None, names=["youtube_id", "start_seconds", "label", "split"], dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise InputError(f"unreadable VGGSound CSV: {e}", path=str(csv)) from None
    if table.empty or table[["youtube_id", "start_seconds", "label"]].isna().all(axis=None):
        raise InputError("the VGGSound CSV has no rows (expected youtube_id,start_seconds,label,split)", path=str(csv))
    labels = sorted(table.label.dropna().str.strip().unique())
    if len(labels) < n_options:
        raise InputError(f"{n_options} options need {n_options} labels; the CSV has {len(labels)}", path=str(csv))
    if not 2 <= n_options <= len(LETTERS):
        raise InputError(f"n_options must be 2 to {len(LETTERS)}, got {n_options}")
    rows = table if split is None else table[table.split.str.strip() == split]
    problems, records = [], []
    for n, r in enumerate(rows.itertuples(index=False)):
        if progress is not None:
            progress(n, len(rows))
        try:
            start = int(float(r.start_seconds))
        except (TypeError, ValueError):
            problems.append(
                {"id": str(r.youtube_id), "file": str(csv), "reason": f"bad start_seconds {r.start_seconds!r}"}
            )
            continue
        row_id = f"{r.youtube_id}_{start:06d}"
        video = video_dir / f"{row_id}.mp4"
        if not video.exists():
            problems.append({"id": row_id, "file": str(video), "reason": "video file not found"})
            continue
        label = str(r.label).strip()
        options = _options(label, labels, n_options, zlib.crc32(f"{seed}:{row_id}".encode()))
        letter = LETTERS[options.index(label)]
        records.append(
            {
                "id": row_id,
                "video": relative_path(str(video), out_dir),
                "audio_label": label,
                "visual_label": label,
                "split": str(r.split).strip(),
                "options": options,
                "answer": letter,
                "question": mc_prompt(question, options),
                "expect_question": letter,
            }
        )
    if progress is not None:
        progress(len(rows), len(rows))
    path = write_manifest(pd.DataFrame.from_records(records), out_dir / "manifest.jsonl")
    return BuildReport(len(records), problems, path, files={"manifest": path}, counts={"clips": len(records)})


def _options(label: str, labels: Sequence[str], n: int, seed: int) -> list[str]:
    """The right label and n - 1 distractors, in a seeded order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    others = [x for x in labels if x != label]
    chosen = [others[i] for i in rng.choice(len(others), size=n - 1, replace=False)] + [label]
    return [chosen[i] for i in rng.permutation(n)]
