"""Measuring the organism: accuracy by condition and question, and which modality its answers follow.

Two paths give the same kind of tidy records:
- :func:`evaluate_world` reads a held-out world's files (congruent and swapped mp4s, their wavs) through
  ``adapter.prepare``, the path a user's video takes: the numbers in each checkpoint's MODEL.md;
- :func:`evaluate_bank` uses decoded clips and the training batcher (equal to ``prepare``, tested), fast
  enough to run after every recipe of a sweep.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..media import load_audio, load_video
from ..models.base import Clip, Sample
from ..trace import Capture, generate, run
from .data import (
    DESCRIBE,
    DESCRIBE_SEEN,
    HEAR,
    HEAR_YN,
    LETTERS_V2,
    NOTHING,
    SEE,
    SEE_YN,
    WHICH_HEAR,
    WHICH_SEE,
    Bank,
    Batcher,
    Example,
    article,
    draw_options,
    lettered,
)
from .world import CLASSES, unrelated


@dataclass
class Item:
    """One evaluation question. ``expected`` is the right answer; for swapped clips the answer is also
    classified by the modality it follows."""

    sample: Sample
    condition: str  # congruent, swapped, audio-only, video-only, multi-clip
    kind: str  # see, hear, see-yn, hear-yn, which, describe
    expected: str
    audio_label: str | None
    visual_label: str | None
    interleave: bool = False
    options: tuple[str, ...] = ()  # lettered multiple choice: the option words, in letter order
    letters: tuple[str, ...] = ()


def follows(answer: str, audio_label: str | None, visual_label: str | None) -> str:
    """Which modality a class answer follows: "audio", "visual" or "neither"."""
    words = answer.lower().split()
    if audio_label and audio_label in words and not (visual_label and visual_label in words):
        return "audio"
    if visual_label and visual_label in words and not (audio_label and audio_label in words):
        return "visual"
    return "neither"


def _describe_ok(answer: str, seen: str | None, heard: str | None) -> bool:
    text = answer.lower()
    see, _, hear = text.partition(" and ")
    return (seen or NOTHING) in see.split() and (heard or NOTHING) in hear.split()


def records(items: list[Item], answers: list[str]) -> pd.DataFrame:
    """Tidy records: one row per item with its answer, correctness and the modality it follows."""
    rows = []
    for it, ans in zip(items, answers, strict=True):
        if it.kind == "describe":
            correct = _describe_ok(ans, it.visual_label, it.audio_label)
        elif it.kind == "describe-seen":
            correct = f"see {article(it.visual_label)} {it.visual_label}" in ans.lower()
        else:
            correct = ans.strip().lower() == it.expected
        chosen = ans.strip().lower()
        if it.options:  # the option word a letter answer picks (for `follows`)
            chosen = it.options[it.letters.index(chosen)] if chosen in it.letters[: len(it.options)] else ""
        rows.append(
            {
                "id": it.sample.id,
                "condition": it.condition,
                "kind": it.kind,
                "audio_label": it.audio_label,
                "visual_label": it.visual_label,
                "expected": it.expected,
                "answer": ans,
                "correct": bool(correct),
                "follows": follows(chosen, it.audio_label, it.visual_label)
                if it.kind in ("see", "hear", "choice-see", "choice-hear")
                else None,
            }
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def answer(adapter, items: list[Item], batch_size: int = 32, progress=None) -> list[str]:
    """The model's answers: the first token for one-word questions, greedy text for descriptions."""
    out: dict[int, str] = {}
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        layout = (it.kind.startswith("describe"), it.interleave, it.condition, len(it.sample.all_clips()))
        groups.setdefault(layout, []).append(i)
    done = 0
    for (describe, interleave, _, _), idx in groups.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            inputs = adapter.prepare([items[i].sample for i in chunk], interleave=interleave)
            if describe:
                texts = generate(adapter, inputs, max_new_tokens=10).text
            else:
                ids = run(adapter, inputs).logits.argmax(-1)
                texts = [adapter.decode([int(t)]) for t in ids]
            for i, t in zip(chunk, texts, strict=True):
                out[i] = t
            done += len(chunk)
            if progress is not None:
                progress(done, len(items))
    return [out[i] for i in range(len(items))]


CONDITIONS = ("congruent", "swapped", "audio-only", "video-only", "multi-clip")
"""The conditions of evaluation items (see :class:`Item`)."""


def summary(df: pd.DataFrame) -> dict:
    """The headline figures of a record table."""

    def acc(cond: str, kind: str) -> float | None:
        sel = df[(df.condition == cond) & (df.kind == kind)]
        return round(float(sel.correct.mean()), 3) if len(sel) else None

    def share(cond: str, kind: str, who: str) -> float | None:
        sel = df[(df.condition == cond) & (df.kind == kind)]
        return round(float((sel.follows == who).mean()), 3) if len(sel) else None

    out = {
        "congruent_see": acc("congruent", "see"),
        "congruent_hear": acc("congruent", "hear"),
        "audio_only_hear": acc("audio-only", "hear"),
        "video_only_see": acc("video-only", "see"),
        "swapped_hear_audio": share("swapped", "hear", "audio"),
        "swapped_hear_visual": share("swapped", "hear", "visual"),
        "swapped_hear_neither": share("swapped", "hear", "neither"),
        "swapped_see_visual": share("swapped", "see", "visual"),
        "swapped_see_audio": share("swapped", "see", "audio"),
    }
    out["video_only_describe"] = acc("video-only", "describe-seen")
    for cond, kind in (
        ("congruent", "see-yn"),
        ("congruent", "hear-yn"),
        ("video-only", "see-yn"),
        ("multi-clip", "which"),
    ):
        out[f"{cond}_{kind}".replace("-", "_")] = acc(cond, kind)
    for cond in ("congruent", "swapped"):
        out[f"{cond}_describe"] = acc(cond, "describe")
    for kind in sorted(k for k in set(df.kind) if k.startswith(("which2", "which3", "choice-"))):
        for cond in CONDITIONS:
            out[f"{cond}_{kind}".replace("-", "_")] = acc(cond, kind)
    out["audio_only_hear_yn"] = acc("audio-only", "hear-yn")
    sw = df[(df.condition == "swapped") & df.kind.isin(["see", "hear"])]
    if len(sw):
        by_modality = (sw.kind == "hear") & (sw.follows == "audio") | (sw.kind == "see") & (sw.follows == "visual")
        out["swapped_by_modality"] = round(float(by_modality.mean()), 3)
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# Item sets
# ---------------------------------------------------------------------------------------------------------
def world_items(
    manifest: Path,
    *,
    seed: int = 0,
    yes_no: bool = True,
    describe: bool = True,
    multi: int = 60,
    skills: SkillItems | None = None,
) -> list[Item]:
    """Questions about a held-out world, its media decoded from its files through the media pipeline.

    ``skills``: also the organism-v2 skill questions (:func:`skill_items`), drawn from their own random stream
    (the other items are the same with or without them)."""
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    items: list[Item] = []
    decoded = {}
    for row in rows:
        path = manifest.parent / row["video"]
        decoded[row["id"]] = (load_video(path), load_audio(path), load_audio(manifest.parent / row["audio"]))
    for row in rows:
        video, track, wav = decoded[row["id"]]
        v, a, rid = row["visual_label"], row["audio_label"], row["id"]
        cond = "congruent" if row["condition"] == "congruent" else "swapped"

        def av(q: str, kind: str, expected: str, cond: str = cond, rid: str = rid, video=video, track=track, a=a, v=v):
            return Item(Sample(q, video=video, audio=track, id=rid), cond, kind, expected, a, v, interleave=True)

        items.append(av(rng.choice(SEE), "see", v))
        items.append(av(rng.choice(HEAR), "hear", a))
        if describe:
            items.append(av(DESCRIBE[0], "describe", ""))
        if cond == "congruent":
            items.append(Item(Sample(rng.choice(HEAR), audio=wav, id=rid), "audio-only", "hear", a, a, None))
            items.append(
                Item(Sample(rng.choice(SEE), video=video, video_audio=False, id=rid), "video-only", "see", v, None, v)
            )
            if describe:  # the vision-language base's own description question
                q = Sample(DESCRIBE_SEEN[0], video=video, video_audio=False, id=rid)
                items.append(Item(q, "video-only", "describe-seen", "", None, v))
            if yes_no:
                present = rng.random() < 0.5
                x = v if present else rng.choice([c for c in CLASSES if c != v])
                q = Sample(SEE_YN[0].format(a=article(x), x=x), video=video, video_audio=False, id=rid)
                items.append(Item(q, "video-only", "see-yn", "yes" if present else "no", None, v))
                for kind, templates in (("see-yn", SEE_YN), ("hear-yn", HEAR_YN)):
                    present = rng.random() < 0.5
                    x = v if present else rng.choice([c for c in CLASSES if c != v])
                    q = rng.choice(templates).format(a=article(x), x=x)
                    items.append(av(q, kind, "yes" if present else "no"))
    congruent = [r for r in rows if r["condition"] == "congruent"]
    for _ in range(multi):
        r1, r2 = rng.sample(congruent, 2)
        if r1["audio_label"] == r2["audio_label"]:
            continue
        k = rng.randrange(2)
        target = (r1, r2)[k]["audio_label"]
        clips = [Clip(video=decoded[r["id"]][0], audio=decoded[r["id"]][1]) for r in (r1, r2)]
        q = WHICH_HEAR[0].format(a=article(target), x=target)
        items.append(
            Item(
                Sample(q, clips=clips, id=f"{r1['id']}+{r2['id']}"),
                "multi-clip",
                "which",
                str(k + 1),
                target,
                None,
                True,
            )
        )
    if skills is not None:
        items += skill_items(rows, decoded, skills, seed=seed)
    return items


@dataclass(frozen=True)
class SkillItems:
    """Which organism-v2 skill questions :func:`skill_items` asks about a world.

    Attributes:
        which: clip counts of the which-clip questions ("which clip has the sound of X?" / "which clip shows
            X?"), ``per_row`` of each count and modality.
        options: (min, max) option count of the lettered multiple-choice questions, drawn uniformly.
        letters: the option letters.
        per_row: questions per (kind, condition) row of the which-clip questions.
    """

    which: tuple[int, ...] = (2, 3)
    options: tuple[int, int] = (4, 20)
    letters: tuple[str, ...] = LETTERS_V2
    per_row: int = 120


def skill_items(rows: list[dict], decoded: dict, skills: SkillItems, seed: int = 0) -> list[Item]:
    """The organism-v2 skill questions about a world's clips (``rows``: its manifest rows; ``decoded``: id ->
    (video, the mp4's audio track, the wav)):

    - which of N congruent clips (N in ``skills.which``) has the sound of X / shows X, answered with the clip's
      number (kinds ``which{N}-hear``, ``which{N}-see``; condition multi-clip); exactly one clip has X;
    - lettered multiple choice (kinds ``choice-hear``, ``choice-see``): "what do you hear? b. bell c. dog ...",
      with ``skills.options`` options, the other modality's class among them when it differs, the right one at
      a uniformly random letter; on every clip (congruent and swapped, the clip's own audio track), the
      congruent clips' wavs (audio-only) and their videos without audio (video-only);
    - "is there a sound of X?" on the congruent clips' wavs (audio-only hear-yn), X present or absent.
    """
    rng = random.Random(seed + 7919)
    items: list[Item] = []
    letters = skills.letters

    def choice(sample: Sample, cond: str, hear: bool, a: str | None, v: str | None, interleave: bool) -> Item:
        right, wrong = (a, v) if hear else (v, a)
        options, k = draw_options(rng, right, wrong, rng.randint(*skills.options))
        sample.prompt = f"{rng.choice(HEAR if hear else SEE)} {lettered(options, letters)}"
        kind = "choice-hear" if hear else "choice-see"
        return Item(sample, cond, kind, letters[k], a, v, interleave, options=options, letters=letters)

    for row in rows:
        video, track, wav = decoded[row["id"]]
        v, a, rid = row["visual_label"], row["audio_label"], row["id"]
        cond = "congruent" if row["condition"] == "congruent" else "swapped"
        for hear in (True, False):
            items.append(choice(Sample("", video=video, audio=track, id=rid), cond, hear, a, v, True))
        if cond == "congruent":
            items.append(choice(Sample("", audio=wav, id=rid), "audio-only", True, a, None, False))
            items.append(
                choice(Sample("", video=video, video_audio=False, id=rid), "video-only", False, None, v, False)
            )
            present = rng.random() < 0.5
            x = a if present else rng.choice([c for c in CLASSES if c != a])
            q = rng.choice(HEAR_YN).format(a=article(x), x=x)
            items.append(
                Item(Sample(q, audio=wav, id=rid), "audio-only", "hear-yn", "yes" if present else "no", a, None)
            )
    congruent = [r for r in rows if r["condition"] == "congruent"]
    for n in skills.which:
        for hear in (True, False):
            key = "audio_label" if hear else "visual_label"
            made = 0
            while made < skills.per_row:
                chosen = rng.sample(congruent, n)
                if len({r[key] for r in chosen}) < n:  # exactly one clip has X
                    continue
                k = rng.randrange(n)
                target = chosen[k][key]
                clips = [Clip(video=decoded[r["id"]][0], audio=decoded[r["id"]][1]) for r in chosen]
                q = rng.choice(WHICH_HEAR if hear else WHICH_SEE).format(a=article(target), x=target)
                sid = "+".join(r["id"] for r in chosen)
                kind = f"which{n}-{'hear' if hear else 'see'}"
                a_label, v_label = (target, None) if hear else (None, target)
                items.append(
                    Item(Sample(q, clips=clips, id=sid), "multi-clip", kind, str(k + 1), a_label, v_label, True)
                )
                made += 1
    return items


def evaluate_world(adapter, manifest: Path, progress=None, **kw) -> pd.DataFrame:
    """Records of every question about a held-out world (see :func:`world_items`)."""
    items = world_items(manifest, **kw)
    return records(items, answer(adapter, items, progress=progress))


def bank_examples(
    bank: Bank, *, seed: int = 0, per_class: int = 10
) -> list[tuple[Example, str, str | None, str | None]]:
    """(example, condition, audio label, visual label) for the sweep's measurements: congruent see/hear,
    swapped hear/see (sounds from an unrelated class), audio-only hear, video-only see."""
    rng = random.Random(seed)
    by_class = bank.by_class()
    out = []
    for c in CLASSES:
        for v in rng.sample(by_class[c], min(per_class, len(by_class[c]))):
            other = rng.choice([x for x in CLASSES if unrelated(x, c)])
            a = rng.choice(by_class[other])
            out += [
                (Example(rng.choice(SEE), c, video=v, audio=v, kind="see"), "congruent", c, c),
                (Example(rng.choice(HEAR), c, video=v, audio=v, kind="hear"), "congruent", c, c),
                (Example(rng.choice(HEAR), other, video=v, audio=a, kind="hear"), "swapped", other, c),
                (Example(rng.choice(SEE), c, video=v, audio=a, kind="see"), "swapped", other, c),
                (Example(rng.choice(HEAR), c, audio=v, kind="hear"), "audio-only", c, None),
                (Example(rng.choice(SEE), c, video=v, kind="see"), "video-only", None, c),
            ]
    return out


@torch.no_grad()
def evaluate_bank(adapter, batcher: Batcher, examples: Iterable[tuple], batch_size: int = 64) -> pd.DataFrame:
    """Records for bank examples via the batcher (first-token answers; audio-visual clips interleaved)."""
    examples = list(examples)
    answers: list[str] = [""] * len(examples)
    by_layout: dict[str, list[int]] = {}
    for i, (ex, *_rest) in enumerate(examples):
        by_layout.setdefault(ex.layout_key, []).append(i)
    adapter.model.eval()
    for idx in by_layout.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            batch = batcher.batch([examples[i][0] for i in chunk], with_answers=False, interleave=True)
            logits = adapter.model(**batch, use_cache=False).logits[:, -1]
            for i, t in zip(chunk, logits.argmax(-1).tolist(), strict=True):
                answers[i] = adapter.decode([t])
    rows = []
    for (ex, cond, a, v), ans in zip(examples, answers, strict=True):
        rows.append(
            {
                "condition": cond,
                "kind": ex.kind,
                "audio_label": a,
                "visual_label": v,
                "expected": ex.answer,
                "answer": ans,
                "correct": ans == ex.answer,
                "follows": follows(ans, a, v),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Massive activations
# ---------------------------------------------------------------------------------------------------------
MAGNITUDE_GROUPS = ("video", "audio", "question", "last")


@torch.no_grad()
def activation_magnitudes(adapter, samples: list[Sample], interleave: bool = True) -> pd.DataFrame:
    """The largest normalised activation magnitudes of the residual stream, per layer (as Sun et al. 2024 measure
    massive activations): for each sample and layer output l (1..n_layers), the largest |h| over positions and
    dimensions divided by the median |h|, and where it sits (the position's token group, or "start" for the
    prompt's first tokens before the media). One sample per forward (no padding).

    Returns: one row per (sample, layer): sample, layer, top_ratio, top_value, median, dim, position, group.
    """
    rows = []
    for sample in samples:
        inputs = adapter.prepare([sample], interleave=interleave)
        trace = run(adapter, inputs, capture=[Capture.residual()])
        layout = trace.layout
        first_media = min(
            (
                int(layout.groups[g][0].nonzero()[0])
                for g in ("video", "audio")
                if g in layout.groups and bool(layout.groups[g][0].any())
            ),
            default=0,
        )
        for layer, h in trace.captures["residual"].items():
            if layer == 0:
                continue
            a = h[0].abs()  # (L, D)
            median = float(a.median())
            flat = int(a.argmax())
            pos, dim = divmod(flat, a.shape[1])
            group = next((g for g in MAGNITUDE_GROUPS if g in layout.groups and bool(layout.groups[g][0, pos])), None)
            rows.append(
                {
                    "sample": sample.id,
                    "layer": layer,
                    "top_ratio": float(a.max()) / max(median, 1e-12),
                    "top_value": float(a.max()),
                    "median": median,
                    "dim": dim,
                    "position": pos,
                    "group": group or ("start" if pos < first_media else "text"),
                }
            )
    return pd.DataFrame(rows)
