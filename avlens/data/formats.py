"""Benchmarks users bring, as avlens manifests, and multiple-choice prompts answered with a letter.

- :func:`avhbench`: AVHBench's release (``json/<video_id>.json`` QA lists and ``video/<video_id>.mp4``).
- :func:`vggsound`: VGGSound's label CSV (``youtube_id,start_seconds,label,split``, no header) over a folder of
  clips, as P2's 20-way multiple choice (``mc_prompt``) with the right letter as the expected answer.
- :func:`av_odyssey`: AV-Odyssey Bench's items (a question over images or a video and sounds, four options
  "[A] ...", the right letter), each item's media as the row's ``clips``.
- :func:`av_speakerbench`: AV-SpeakerBench's items (a question about who speaks in a clip, options "A. ...", the
  right letter), each over its clip with sound.
- :func:`mc_prompt` / :func:`read_letter`: lettered options and the letter read back from an answer.

Each row's prompt is in its ``question`` column and its right answer in ``expect_question``: give an analysis
the question ``{question}`` (``avlens run NAME --question "question={question}"``) to ask each row its own.
Rows that cannot be used (a missing video, a malformed entry) are reported in the BuildReport, one line each
naming the file, and the rest are written.
"""

from __future__ import annotations

import ast
import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from .builders import BuildReport, Progress, _safe
from .manifest import relative_path, write_manifest

__all__ = ["LETTERS", "av_odyssey", "av_speakerbench", "avhbench", "mc_prompt", "read_letter", "vggsound"]

LETTERS = "ABCDEFGHIJKLMNOPQRST"
"""Option letters: up to 20 options (VGGSound 20-way, as P2)."""

MC_INSTRUCTION = "Respond ONLY with a single label letter."
"""P2's instruction after the options."""

AV_ODYSSEY_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""AV-Odyssey's own instruction after the options (its evaluation code's)."""

AV_SPEAKERBENCH_INSTRUCTION = "Respond with only the letter of the correct option."
"""AV-SpeakerBench's instruction after the options (its own, without the list of letters, which is the options')."""

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


# ---------------------------------------------------------------------------------------------------------
# AV-Odyssey and AV-SpeakerBench: lettered multiple choice over one clip or several
# ---------------------------------------------------------------------------------------------------------
_MEDIA_TAG = re.compile(r"\[(img|image|video|audio)\s*(\d+)\]", re.IGNORECASE)
_TAG_KIND = {"img": "image", "image": "image", "video": "video", "audio": "audio"}
_OPTION = re.compile(r"^\s*(?:\[([A-Za-z])\]|\(([A-Za-z])\)|([A-Za-z])[.):])\s*(.*)$", re.DOTALL)


class _Unusable(Exception):
    """An item that cannot be written: ``file`` (the file at fault) and ``reason``."""

    def __init__(self, reason: str, file: Path | str) -> None:
        super().__init__(reason)
        self.reason, self.file = reason, str(file)


def av_odyssey(
    root: str | Path,
    out_dir: str | Path,
    *,
    instruction: str = AV_ODYSSEY_INSTRUCTION,
    progress: Progress | None = None,
) -> BuildReport:
    """AV-Odyssey Bench's items as one manifest, each item's media as its row's ``clips``.

    Accepted layout: ``root`` is an item file, or a folder whose ``*.parquet``, ``*.jsonl`` and ``*.json`` files
    (not its subfolders) are item files; media paths are relative to ``root`` (to the file's folder when ``root``
    is a file). An item (a Parquet row, a JSON line, an element of a JSON list) has

    - ``question``: the question, naming its media by tags ``[img1]``, ``[video1]``, ``[audio2]``...
    - ``options``: the options as released, ``["[A] ...", "[B] ...", ...]`` (also "A. ...", "(A) ..."; a list or
      its JSON/Python text), and ``answer``: the right letter;
    - media in either of the released forms: lists ``image_path``, ``video_path``, ``audio_path`` (the
      lmms-eval copy, AV_Odyssey_Bench_LMMs_Eval), or columns ``image_1`` .. ``image_4``, ``video_1`` ..,
      ``audio_1`` .. ``audio_4`` (the Parquet parts of AV_Odyssey_Bench) holding paths or the files' bytes
      (written to ``out_dir/media/``; empty cells are no media);
    - optionally ``question_id`` (the row's ``id``; else ``<file stem>-<k>``), ``question_type_id`` (or
      ``task_id``: the task number, 1-26), ``task_name``, ``subfield`` (Timbre, Tone, Melody, Space, Time,
      Hallucination, Intricacy) and ``data_type``.

    Output ``out_dir/manifest.jsonl``, one row per item: ``id``; ``clips``: one clip per medium, each
    ``{"video", "audio", "image"}`` with one of them set, in the order the question (then the options) first
    names them, media it never names after them (images, videos, then sounds); ``question``: the prompt,
    :func:`mc_prompt` of the question and the options, the benchmark's letters in its order, with each tag
    replaced by the clip it names ("Clip 2", as the model sees the clips introduced: ``Clip {k}: ``);
    ``expect_question``: the right letter; ``options`` (their texts, letters and tags replaced), ``task_id``,
    ``task_name``, ``subfield``, ``data_type``, ``source_question`` (as released) and ``source_file``.
    Still images are clips like the others (the manifest's clips and the models take images).

    Assumed where the public description is silent: tags are numbered from 1 within each kind (``[img2]`` is the
    item's second image), as the lmms-eval task reads them; a tag naming a medium the item lacks, options not
    lettered A, B, C... in order, an answer that is none of the letters, a repeated ``question_id`` or a medium
    whose file is missing make the item a problem line (naming the file) and the others are written.
    """
    suffixes = (".parquet", ".jsonl", ".json")
    return _convert(
        root, out_dir, suffixes, "AV-Odyssey", ("question_id",), "question_id", _odyssey_row, instruction, progress
    )


def av_speakerbench(
    root: str | Path,
    out_dir: str | Path,
    *,
    instruction: str = AV_SPEAKERBENCH_INSTRUCTION,
    progress: Progress | None = None,
) -> BuildReport:
    """AV-SpeakerBench's items as one manifest, each over its clip with sound.

    Accepted layout: ``root`` is an item file, or a folder whose ``*.parquet``, ``*.csv``, ``*.jsonl`` and
    ``*.json`` files (not its subfolders) are item files, as the dataset's table is released; media paths are
    relative to ``root`` (to the file's folder when ``root`` is a file). An item has ``question``, ``choices``
    (the options as released, ``["A. ...", "B. ...", ...]``, a list or its Python/JSON text; ``options`` is
    read when there is no ``choices``) and ``answer`` (the right letter); its clip is ``audio_visual_path``
    (the video with its sound; also ``audiovisual_path`` or ``video_path``), or, without one, ``visual_path``
    with ``audio_path`` beside it (played together as one clip); optionally ``question_id`` (the row's ``id``;
    else ``id``, else ``<file stem>-<k>``), ``task_id``, ``category`` and ``sub_category``.

    Output ``out_dir/manifest.jsonl``, one row per item: ``id``, ``video`` (the clip with its sound; for a
    video and a separate sound, ``clips`` holds the one clip ``{"video", "audio"}`` instead), ``audio_label``
    and ``visual_label`` (null: the benchmark names no classes), ``question`` (:func:`mc_prompt` of the question
    and the options, the benchmark's letters in its order), ``expect_question`` (the right letter), ``options``
    (their texts), ``task_id``, ``category``, ``sub_category``, ``source_question`` and ``source_file``.

    Assumed where the public description is silent: the table's columns are those its loaders read (the
    project's README and the lmms-eval task); options not lettered A, B, C... in order, an answer that is none
    of the letters, a repeated question id or a missing clip make the item a problem line (naming the file) and
    the others are written.
    """
    return _convert(
        root,
        out_dir,
        (".parquet", ".csv", ".jsonl", ".json"),
        "AV-SpeakerBench",
        ("question_id", "id"),
        "question id",
        _speakerbench_row,
        instruction,
        progress,
    )


def _convert(
    root: str | Path,
    out_dir: str | Path,
    suffixes: tuple[str, ...],
    benchmark: str,
    id_keys: tuple[str, ...],
    id_name: str,
    make_row: Callable[[dict, str, Path, Path, Path, str], dict],
    instruction: str,
    progress: Progress | None,
) -> BuildReport:
    """The item files under ``root`` as ``out_dir/manifest.jsonl``: one row per item by ``make_row(item, id, file,
    media base, out_dir, instruction)`` (which raises _Unusable), ids from the first of ``id_keys`` an item has
    (else ``<file stem>-<k>``; ``id_name`` in the message of a repeated one), unusable and repeated items one problem
    line each."""
    root, out_dir = Path(root), Path(out_dir)
    files = _item_files(root, suffixes, benchmark)
    base = root if root.is_dir() else root.parent
    problems: list[dict] = []
    records: list[dict] = []
    seen: set[str] = set()
    items = list(_read_items(files, problems))
    for n, (f, k, item) in enumerate(items):
        if progress is not None:
            progress(n, len(items))
        row_id = f"{f.stem}-{k}"
        try:
            if not isinstance(item, dict):
                raise _Unusable("not an item (a JSON object)", f)
            row_id = next((t for key in id_keys if (t := _text(item.get(key)))), row_id)
            if row_id in seen:
                raise _Unusable(f"{id_name} {row_id!r} repeats an earlier item's", f)
            records.append(make_row(item, row_id, f, base, out_dir, instruction))
            seen.add(row_id)
        except _Unusable as e:
            problems.append({"id": row_id, "file": e.file, "reason": e.reason})
    if progress is not None:
        progress(len(items), len(items))
    path = write_manifest(pd.DataFrame.from_records(records), out_dir / "manifest.jsonl")
    return BuildReport(len(records), problems, path, files={"manifest": path}, counts={"items": len(records)})


def _odyssey_row(item: dict, row_id: str, f: Path, base: Path, out_dir: Path, instruction: str) -> dict:
    """One manifest row of an AV-Odyssey item (raises _Unusable)."""
    question, raw_options, letter = _mc_fields(item, ("options",), f)
    letters, texts = _lettered(raw_options, f)
    answer = _answer(letter, letters, f)  # checked before any media bytes are written out
    media: dict[str, list[Path]] = {}
    for kind in ("image", "video", "audio"):
        listed = _listish(item.get(f"{kind}_path"))
        values = listed or [item.get(f"{kind}_{i}") for i in range(1, 9) if f"{kind}_{i}" in item]
        media[kind] = [
            _media_file(v, base, out_dir, f"{row_id}_{kind}{i + 1}")
            for i, v in enumerate(v for v in values if not _empty(v))
        ]
    # clips in the order the question, then the options, first name them; media never named after them
    order: list[tuple[str, int]] = []
    for m in _MEDIA_TAG.finditer(" ".join([question, *texts])):
        key = (_TAG_KIND[m.group(1).lower()], int(m.group(2)))
        if not 1 <= key[1] <= len(media[key[0]]):
            raise _Unusable(f"the question names {m.group(0)} but the item has {len(media[key[0]])} {key[0]}(s)", f)
        if key not in order:
            order.append(key)
    order += [(kind, i + 1) for kind in media for i in range(len(media[kind])) if (kind, i + 1) not in order]
    if not order:
        raise _Unusable("the item has no media (no image, video or audio)", f)
    clips = []
    for kind, i in order:
        path = media[kind][i - 1]
        if not path.exists():
            raise _Unusable("media file not found", path)
        clips.append({"video": None, "audio": None, "image": None, kind: relative_path(str(path), out_dir)})
    number = {key: k + 1 for k, key in enumerate(order)}

    def clip_names(text: str) -> str:
        named = _MEDIA_TAG.sub(lambda m: f"Clip {number[(_TAG_KIND[m.group(1).lower()], int(m.group(2)))]}", text)
        return " ".join(named.split())

    options = [clip_names(t) for t in texts]
    return {
        "id": row_id,
        "clips": clips,
        "audio_label": None,  # AV-Odyssey names no classes: its options carry the answers
        "visual_label": None,
        "question": _prompt(clip_names(question), options, instruction, f),
        "expect_question": answer,
        "options": options,
        "task_id": _text(item.get("question_type_id", item.get("task_id"))),
        "task_name": _text(item.get("task_name")),
        "subfield": _text(item.get("subfield")),
        "data_type": _text(item.get("data_type")),
        "source_question": question,
        "source_file": f.name,
    }


def _speakerbench_row(item: dict, row_id: str, f: Path, base: Path, out_dir: Path, instruction: str) -> dict:
    """One manifest row of an AV-SpeakerBench item (raises _Unusable)."""
    question, raw_options, letter = _mc_fields(item, ("choices", "options"), f)
    letters, options = _lettered(raw_options, f)
    answer = _answer(letter, letters, f)  # checked before any media bytes are written out
    av = next(
        (item[c] for c in ("audio_visual_path", "audiovisual_path", "video_path") if not _empty(item.get(c))), None
    )
    visual, audio = item.get("visual_path"), item.get("audio_path")
    if av is not None:
        paths = {"video": _media_file(av, base, out_dir, f"{row_id}_video")}
    elif not _empty(visual) and not _empty(audio):
        paths = {
            "video": _media_file(visual, base, out_dir, f"{row_id}_video"),
            "audio": _media_file(audio, base, out_dir, f"{row_id}_audio"),
        }
    else:
        raise _Unusable("no clip (audio_visual_path, or visual_path with audio_path)", f)
    for path in paths.values():
        if not path.exists():
            raise _Unusable("media file not found", path)
    rel = {k: relative_path(str(v), out_dir) for k, v in paths.items()}
    media: dict[str, Any] = {"video": rel["video"]} if len(rel) == 1 else {"clips": [{**rel, "image": None}]}
    return {
        "id": row_id,
        **media,
        "audio_label": None,  # AV-SpeakerBench names no classes: its options carry the answers
        "visual_label": None,
        "question": _prompt(question, options, instruction, f),
        "expect_question": answer,
        "options": options,
        "task_id": _text(item.get("task_id")),
        "category": _text(item.get("category")),
        "sub_category": _text(item.get("sub_category")),
        "source_question": question,
        "source_file": f.name,
    }


def _item_files(root: Path, exts: tuple[str, ...], name: str) -> list[Path]:
    """The item files of a benchmark's ``root`` (a file, or the files with ``exts`` directly in a folder)."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.glob("*") if p.is_file() and p.suffix.lower() in exts) if root.is_dir() else []
    if not files:
        found = "no such file or folder" if not root.exists() else f"expected {', '.join('*' + e for e in exts)}"
        raise InputError(f"no {name} item files ({found})", path=str(root))
    return files


def _read_items(files: list[Path], problems: list[dict]) -> Iterator[tuple[Path, int, Any]]:
    """(file, index in it, item) of every item; an unreadable file or JSON line is a problem line."""
    for f in files:
        ext = f.suffix.lower()
        try:
            if ext == ".parquet":
                items: list[Any] = pd.read_parquet(f).to_dict("records")
            elif ext == ".csv":
                items = pd.read_csv(f, dtype=str, keep_default_na=False).to_dict("records")
            elif ext == ".jsonl":
                items = []
                for k, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                    if not line.strip():
                        items.append(None)  # items are numbered by their line
                        continue
                    try:
                        items.append(json.loads(line))
                    except ValueError as e:
                        problems.append(
                            {"id": f"{f.stem}-{k}", "file": str(f), "reason": f"unreadable line {k + 1}: {e}"}
                        )
                        items.append(None)
            else:
                items = json.loads(f.read_text(encoding="utf-8"))
                if not isinstance(items, list):
                    raise ValueError("not a list of items")
        except (OSError, ValueError, pd.errors.ParserError) as e:
            problems.append({"id": f.stem, "file": str(f), "reason": f"unreadable item file: {_one_line(e)}"})
            continue
        for k, item in enumerate(items):
            if item is not None:
                yield f, k, item


def _mc_fields(item: dict, option_keys: tuple[str, ...], f: Path) -> tuple[str, Any, Any]:
    """An item's question, raw options and raw answer; _Unusable when one is missing."""
    options = next((item[c] for c in option_keys if not _empty(item.get(c))), None)
    missing = [
        c
        for c, v in (("question", item.get("question")), (option_keys[0], options), ("answer", item.get("answer")))
        if _empty(v)
    ]
    if missing:
        raise _Unusable(f"item without {', '.join(missing)}", f)
    return str(item["question"]).strip(), options, item["answer"]


def _lettered(raw: Any, f: Path) -> tuple[list[str], list[str]]:
    """The letters and texts of options given as "[A] text" / "A. text" / "(A) text" (or bare texts, lettered by
    position); _Unusable unless they are lettered A, B, C... in order, 2 to 20 of them."""
    options = [str(o).strip() for o in _listish(raw)]
    if not 2 <= len(options) <= len(LETTERS):
        raise _Unusable(f"multiple choice needs 2 to {len(LETTERS)} options, got {len(options)}", f)
    letters, texts = [], []
    for i, option in enumerate(options):
        m = _OPTION.match(option)
        letter, text = (next(g for g in m.groups()[:3] if g).upper(), m.group(4).strip()) if m else (LETTERS[i], option)
        letters.append(letter)
        texts.append(text)
    if letters != list(LETTERS[: len(options)]):
        raise _Unusable(f"options lettered {', '.join(letters)}, not {', '.join(LETTERS[: len(options)])}", f)
    return letters, texts


def _answer(raw: Any, letters: list[str], f: Path) -> str:
    letter = str(raw).strip().strip("[]().:").strip().upper()
    if letter not in letters:
        raise _Unusable(f"answer {raw!r} is none of the option letters {', '.join(letters)}", f)
    return letter


def _prompt(question: str, options: list[str], instruction: str, f: Path) -> str:
    try:
        return mc_prompt(question, options, instruction)
    except InputError as e:
        raise _Unusable(e.problem, f) from None


def _listish(value: Any) -> list[Any]:
    """A list from a list, an array, the JSON or Python text of a list, or one value ([] for none)."""
    if _empty(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]") and not _OPTION.match(text):
            for parse in (json.loads, ast.literal_eval):
                try:
                    parsed = parse(text)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(parsed, list | tuple):
                    return list(parsed)
        return [value]
    if hasattr(value, "tolist") and not isinstance(value, bytes | bytearray):
        value = value.tolist()
    return list(value) if isinstance(value, list | tuple) else [value]


def _media_file(value: Any, base: Path, out_dir: Path, stem: str) -> Path:
    """The file of a medium given as a path (relative to ``base``), the file's bytes (written to
    ``out_dir/media/``) or a ``{"bytes", "path"}`` record (as ``datasets`` stores images and audio)."""
    if isinstance(value, dict):
        value = value.get("bytes") if not _empty(value.get("bytes")) else value.get("path")
    if isinstance(value, bytes | bytearray):
        path = out_dir / "media" / f"{_safe(stem)}{_extension(bytes(value))}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size != len(value):
            path.write_bytes(value)
        return path
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else base / p


def _extension(data: bytes) -> str:
    """A file name extension for media bytes (they are read by content anyway; this is for people)."""
    if data[:4] == b"RIFF":
        return {b"WAVE": ".wav", b"WEBP": ".webp", b"AVI ": ".avi"}.get(data[8:12], ".bin")
    if data[4:8] == b"ftyp":
        return ".mp4"
    magic = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"ID3": ".mp3", b"fLaC": ".flac"}
    magic |= {b"OggS": ".ogg", b"\x1a\x45\xdf\xa3": ".mkv"}
    return next((ext for head, ext in magic.items() if data.startswith(head)), ".bin")


def _empty(value: Any) -> bool:
    """None, NaN, an empty string or an empty list/array/bytes: no value."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return len(value) == 0
    except TypeError:
        return False


def _text(value: Any) -> str | None:
    """A value as text (None when empty; 3.0 -> "3")."""
    if _empty(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
