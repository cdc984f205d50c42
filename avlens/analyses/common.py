"""What every analysis shares: items (a question about a clip) from a manifest, batches, answer scoring.

What an analysis is (its spec, Config, typed Summary, collect / finalize / summarize / findings / plot) is stated
in :mod:`avlens.analyses.base`; how to add one in :mod:`avlens.analyses`.

Items come from a manifest: the output of ``avlens data counterfactual`` (one row per clip and condition, with
the expected answers), or any manifest with ``video`` / ``audio`` / ``image`` (or multi-clip ``clips``) and
labels (all rows "factual"). The manifest is read and checked by :func:`avlens.data.read_manifest`, the one
reader of every command: one without a media column is refused there.

What a question's right answer is (``Item.expected``): the row's ``expect_<kind>`` value if it has one; else,
for "hear" / "see", the row's ``audio_label`` / ``visual_label``; else "nothing" only where the condition says
nothing is heard (muted, video_only) / seen (blank_video, audio_only); else unknown: ``None``, which every
analysis scores as not applicable (``correct`` None, ``p_expected`` NaN), never as a wrong "nothing". A row
without any media fails (it would otherwise be asked text-only): its items carry the reason in
``Item.problem`` and :func:`batches` reports them with the failed inputs, as (id, condition, file, reason)
rows of the analysis's ``errors`` table, which a run lists at its end.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from ..errors import InputError
from ..models.base import Adapter, Clip, Inputs, Sample

NOTHING = "nothing"
AV_CONDITIONS = ("factual", "swapped", "muted", "blank_video")


@dataclass
class Item:
    """One question about one clip.

    Attributes:
        id: unique id (``<row id>/<question kind>``).
        sample: the media and the prompt.
        condition: factual, swapped, muted, blank_video, audio_only or video_only.
        kind: the question's key in the config's questions ("hear", "see", "describe"...).
        audio_label / visual_label: what is heard / seen (None when nothing is).
        expected: the right answer to this question (a label or "nothing"; None when unknown: a free-form
            question or an unlabelled row; see the module docstring).
        problem: why the item cannot be asked (None when it can): :func:`batches` reports it as failed.
    """

    id: str
    sample: Sample
    condition: str
    kind: str
    audio_label: str | None
    visual_label: str | None
    expected: str | None
    problem: str | None = None

    @property
    def clip(self) -> str:
        """The id of the manifest row the item asks about."""
        return row_id(self.id)

    def record(self, **fields: Any) -> dict[str, Any]:
        """A record about this item: its id, the manifest row (``clip``), condition, question and labels, then
        ``fields``."""
        return {
            "id": self.id,
            "clip": self.clip,
            "condition": self.condition,
            "question": self.kind,
            "audio_label": self.audio_label,
            "visual_label": self.visual_label,
            "expected": self.expected,
            **fields,
        }

    @property
    def layout(self) -> str:
        """Items of one layout can share a batch (an audio-visual clip, audio alone, video alone, an image, several
        clips)."""
        s = self.sample
        if s.clips is not None:
            return f"clips{len(s.clips)}"
        if s.image is not None:
            return "i"
        if s.video is not None and s.video_audio:
            return "av"
        return "v" if s.video is not None else "a"


def row_id(item_id: str) -> str:
    """The manifest row of an item id, which is ``<row id>/<question kind>``."""
    return item_id.rpartition("/")[0] or item_id


def _value(row: Mapping[str, Any], key: str) -> Any:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and v != v) else v


# Conditions whose clip has no sound / no picture: there, "nothing" is the right answer to hear / see.
_SILENT = ("muted", "video_only")
_UNSEEN = ("blank_video", "audio_only")


def _condition(row: Mapping[str, Any]) -> str:
    """A row's condition: "factual" without one; a world manifest's "congruent" clip is the factual condition."""
    cond = _value(row, "condition") or "factual"
    return "factual" if cond == "congruent" else cond


LABELLED = ("hear", "see")
"""Question kinds scored against a row's labels (``audio_label``, ``visual_label``) when it has no
``expect_<kind>`` column."""


def question_kinds(questions: Iterable[str], columns: Iterable[str]) -> list[str]:
    """The question kinds that can be scored on a manifest with ``columns``: the config's ``questions``, the
    labelled kinds, and every KIND the manifest has an ``expect_KIND`` column for."""
    kinds = dict.fromkeys([*questions, *LABELLED])
    kinds.update(dict.fromkeys(c[len("expect_") :] for c in columns if c.startswith("expect_")))
    return list(kinds)


def expected_answer(row: Mapping[str, Any], kind: str, condition: str) -> str | None:
    """The right answer to question ``kind`` about a manifest row (None: unknown; see the module docstring)."""
    expected = _value(row, f"expect_{kind}")
    if expected is not None or kind not in LABELLED:
        return expected
    label = _value(row, "audio_label" if kind == "hear" else "visual_label")
    if label is not None:
        return label
    return NOTHING if condition in (_SILENT if kind == "hear" else _UNSEEN) else None


def row_prompt(row: Mapping[str, Any], prompt: str) -> tuple[str, str | None]:
    """``prompt`` with ``{question}`` replaced by the row's ``question`` column, and a problem when it has none."""
    if "{question}" not in prompt:
        return prompt, None
    question = _value(row, "question")
    if question is None:
        return prompt, "the prompt asks for {question} but the row has no question"
    return prompt.replace("{question}", str(question)), None


def _sample(row: Mapping[str, Any], prompt: str, condition: str) -> tuple[Sample, str | None]:
    """The sample of a row for one prompt, and why it cannot be asked (None when it can). ``{question}`` in the
    prompt is the row's own ``question`` column (benchmarks with a prompt per row: :mod:`avlens.data.formats`)."""
    prompt, problem = row_prompt(row, prompt)
    if problem is not None:
        return Sample(prompt), problem
    video, audio, image = _value(row, "video"), _value(row, "audio"), _value(row, "image")
    clips = _value(row, "clips")
    if clips is not None and len(clips):
        return Sample(prompt, clips=[Clip(c.get("video"), c.get("audio"), c.get("image")) for c in clips]), None
    if video is None and audio is None and image is None:
        return Sample(prompt), "the row has no media (its video, audio and image are empty)"
    if image is not None:
        return Sample(prompt, image=image, audio=audio), None
    if condition == "audio_only" or video is None:
        return Sample(prompt, audio=audio), None if audio is not None else "an audio_only row without audio"
    if condition == "video_only":
        return Sample(prompt, video=video, video_audio=False), None
    return Sample(prompt, video=video), None  # the video plays its own track, as a user's mp4 does


def items_from_manifest(
    manifest: str | Path | pd.DataFrame,
    questions: Mapping[str, str],
    *,
    conditions: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Item]:
    """Items for every row (of the given conditions) and question.

    Args:
        manifest: a manifest path (CSV/JSONL/Parquet) or table, paths resolved against its directory.
        questions: question kind -> prompt, e.g. {"hear": "What do you hear?", "see": "What do you see?"}.
        conditions: keep these conditions only (rows without a condition column are "factual").
        limit: at most this many rows per condition (the first ones, in manifest order).

    Returns:
        the items, rows without media included (with their ``problem``: :func:`batches` reports them).

    Raises:
        InputError: an unreadable manifest, one without a media column (:func:`avlens.data.check_columns`), or
            no row of the conditions asked (the message names the file and the conditions it has).
    """
    from ..data.manifest import check_columns, read_manifest

    if isinstance(manifest, pd.DataFrame):
        df = manifest
        check_columns(df, (), path=df.attrs.get("path"))
    else:
        df = read_manifest(manifest, required=())
    out: list[Item] = []
    taken: dict[str, int] = {}
    for row in df.to_dict("records"):
        cond = _condition(row)
        if conditions is not None and cond not in conditions:
            continue
        if limit is not None and taken.get(cond, 0) >= limit:
            continue
        taken[cond] = taken.get(cond, 0) + 1
        heard, seen = _value(row, "audio_label"), _value(row, "visual_label")
        for kind, prompt in questions.items():
            sample, problem = _sample(row, prompt, cond)
            sample.id = f"{row['id']}/{kind}"
            expected = expected_answer(row, kind, cond)
            out.append(Item(sample.id, sample, cond, kind, heard, seen, expected, problem))
    if not out:
        where = df.attrs.get("path")
        has = sorted({_condition(r) for r in df.to_dict("records")})
        asked = ", ".join(conditions) if conditions is not None else "any"
        if not questions:
            raise InputError("no questions to ask", path=where)
        raise InputError(
            f"no row of the conditions asked ({asked}); the manifest has: {', '.join(has)} "
            "(build the others with `avlens data counterfactual`)",
            path=where,
        )
    return out


def batches(
    adapter: Adapter, items: Sequence[Item], batch_size: int, errors: list[dict] | None = None, **options: Any
) -> Iterator[tuple[list[Item], Inputs]]:
    """Batches of items of one layout with their inputs; items that cannot be built (or have a ``problem``) go
    to ``errors`` (one dict each: id, condition, file (the media file at fault, or None), reason) and the rest of
    their batch goes on."""
    by_layout: dict[tuple[str, str], list[Item]] = {}
    for it in items:
        if it.problem is not None:
            if errors is not None:
                errors.append({"id": it.id, "condition": it.condition, "file": None, "reason": it.problem})
            continue
        by_layout.setdefault((it.layout, it.kind), []).append(it)
    for group in by_layout.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s : s + batch_size]
            try:
                inputs = adapter.prepare([it.sample for it in chunk], **options)
            except InputError as e:
                inputs = None
                failed = {e.sample: e} if len(chunk) == 1 else {it.id: e for it in chunk}
            else:
                failed = {e.sample: e for e in inputs.errors}
            for it in chunk:
                if it.id in failed and errors is not None:
                    e = failed[it.id]
                    errors.append({"id": it.id, "condition": it.condition, "file": e.path, "reason": str(e)})
            if inputs is not None:
                kept = {s.id for s in inputs.samples}
                yield [it for it in chunk if it.id in kept], inputs


def first_token(adapter: Adapter, word: str) -> int:
    """The id of a label word's first token as it would start an answer."""
    ids = adapter.tokenizer.encode(word, add_special_tokens=False)
    if not ids or ids[0] == adapter.tokenizer.unk_token_id:
        ids = adapter.word_ids(word)
    return ids[0]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class Scorer(Protocol):
    """Scores an answer: returns (audio fidelity, video fidelity) in [0, 1] for free-form descriptions."""

    def __call__(self, text: str, item: Item) -> tuple[float, float]: ...


def label_match(text: str, item: Item) -> tuple[float, float]:
    """Default scorer: per modality, 1 if the answer names what is really heard / seen (or says "nothing" when
    nothing is), else 0."""
    w = set(words(text))
    audio = 1.0 if (item.audio_label or NOTHING) in w else 0.0
    video = 1.0 if (item.visual_label or NOTHING) in w else 0.0
    return audio, video


JUDGE_RUBRIC = """You grade a model's description of a video clip against what is really in it.
Ground truth: the clip shows {visual}; its sound is {audio}.
Description: "{text}"
Give two scores in [0, 1]. Audio fidelity: 1 if the description names the real sound, 0 if it names a wrong or
hallucinated sound or ignores the sound; partial credit for a vague but compatible sound. Video fidelity: the
same for what is seen. Penalise hallucinated events. Answer exactly: "audio: <score>, video: <score>"."""


@dataclass
class LLMJudge:
    """Scores descriptions with a language model judge, P1's metric: ``judge(prompt) -> reply`` is any callable
    (a local model, an API client); the rubric is part of the config so that runs record it."""

    judge: Callable[[str], str]
    rubric: str = JUDGE_RUBRIC

    def __call__(self, text: str, item: Item) -> tuple[float, float]:
        reply = self.judge(
            self.rubric.format(visual=item.visual_label or "nothing", audio=item.audio_label or "silence", text=text)
        )
        m = re.search(r"audio:\s*([01](?:\.\d+)?).*?video:\s*([01](?:\.\d+)?)", reply, re.I | re.S)
        if m is None:
            raise InputError(f"the judge's reply has no scores: {reply[:80]!r}", sample=item.id)
        return float(m.group(1)), float(m.group(2))


FOLLOWS = ("audio", "visual", "both", "neither")
"""What a class answer names: the audio label only, the visual label only, both (also: the one label of a clip
whose sound and picture are the same class), or neither."""


def follows(text: str, item: Item) -> str:
    """Which of :data:`FOLLOWS` a class answer is: "audio" / "visual" when it names only the audio / only the
    visual label, "both" when it names both (on a congruent clip, where the two labels are one word, naming it
    is "both"), "neither" otherwise."""
    w = set(words(text))
    a = item.audio_label is not None and item.audio_label in w
    v = item.visual_label is not None and item.visual_label in w
    return "both" if a and v else "audio" if a else "visual" if v else "neither"


class LabelTokens:
    """First-token ids of label words (None for no label), looked up once per word."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.ids: dict[str, int] = {}

    def __call__(self, word: str | None) -> int | None:
        if word is None:
            return None
        if word not in self.ids:
            self.ids[word] = first_token(self.adapter, word)
        return self.ids[word]


class Readout:
    """What one condition says about each row of a batch: label probabilities and the argmax answer (one-token
    answers read at the last prompt position; the columns of knockout-style tables, see :meth:`row`).

    Args:
        logits: (B, V) at the last prompt position.
    """

    def __init__(self, logits: torch.Tensor, chunk: list[Item], token: LabelTokens) -> None:
        probs = torch.softmax(logits.float(), -1)
        top = logits.argmax(-1)
        self.values = []
        for b, it in enumerate(chunk):
            a, v, x = token(it.audio_label), token(it.visual_label), token(it.expected)
            answer = int(top[b])
            self.values.append(
                {
                    "p_audio": float(probs[b, a]) if a is not None else float("nan"),
                    "p_visual": float(probs[b, v]) if v is not None else float("nan"),
                    "p_expected": float(probs[b, x]) if x is not None else float("nan"),
                    "answer": token.adapter.decode([answer]),
                    "correct": None if x is None else answer == x,
                    "follows": token_follows(answer, a, v),
                }
            )

    def row(self, b: int, base: Readout) -> dict:
        now, ref = self.values[b], base.values[b]
        return {
            "p_audio": now["p_audio"],
            "p_visual": now["p_visual"],
            "p_audio_base": ref["p_audio"],
            "p_visual_base": ref["p_visual"],
            "delta_audio": now["p_audio"] - ref["p_audio"],
            "delta_visual": now["p_visual"] - ref["p_visual"],
            "dp_audio": relative(now["p_audio"], ref["p_audio"]),
            "dp_visual": relative(now["p_visual"], ref["p_visual"]),
            "dp_expected": relative(now["p_expected"], ref["p_expected"]),
            "answer": now["answer"],
            "answer_base": ref["answer"],
            "correct": now["correct"],
            "correct_base": ref["correct"],
            "follows": now["follows"],
            "follows_base": ref["follows"],
        }


def token_follows(answer: int, audio: int | None, visual: int | None) -> str:
    """:data:`~avlens.analyses.common.FOLLOWS` for a one-token answer: "both" when it is the first token of both
    labels (a congruent clip, whose two labels are one word, or labels sharing their first token)."""
    a, v = answer == audio, answer == visual
    return "both" if a and v else "audio" if a else "visual" if v else "neither"


def split_of(clip: str) -> str:
    """ "dev" or "test": half of the clips each, by a hash of the clip id (stable across runs and units). Settings
    are chosen on "dev" and reported on "test"."""
    return "dev" if zlib.crc32(clip.encode()) % 2 == 0 else "test"


def relative(p: float, p_base: float) -> float:
    """P3's dp = (p - p_base) / p_base (NaN when the baseline probability is 0 or undefined)."""
    return (p - p_base) / p_base if p_base > 0 else float("nan")
