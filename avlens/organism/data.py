"""Training and evaluation data of the organism: clips read back from files, questions, batches.

Clips are written by :mod:`avlens.organism.world` as real mp4/wav files and decoded through avlens's media
pipeline, the path a user's video takes. Decoded clips are kept in a :class:`Bank` (frames and audio features
per clip), and a training example pairs the video of one clip with the audio of another (or none): that is how
congruent, swapped, audio-only and video-only examples are made without writing every combination to disk.

Batches are assembled from cached pieces for speed, but they are exactly what ``adapter.prepare`` would build
for the same media and question (tested): the prompt ids come from ``prepare`` itself, cached per prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..media import VideoClip, load_audio, load_video
from ..models.base import Clip, Sample
from ..models.qwen2_5_omni import Qwen2_5OmniAdapter
from .world import CLASSES, WorldConfig, unrelated, write_world

LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrst")
"""Option letters of lettered multiple choice (up to 20 options, as in P2/P3-style benchmarks). The default, kept
so that existing draws do not change; but "a" is also the article and "i" the pronoun of describe answers, so an
option letter can appear as an ordinary word (see :data:`LETTERS_V2`)."""

LETTERS_V2: tuple[str, ...] = tuple("bcdefghjklmnopqrstuv")
"""Option letters that are tokens used nowhere else in the data: the letters b-v without "i" (``"a"`` is the
article, ``"i"`` starts describe answers). Pass them as :attr:`SkillMixture.letters`; the vocabulary that holds
them is :data:`avlens.organism.model.VOCABULARY_V2_LETTERS`."""

DISTRACTORS: tuple[str, ...] = (
    "dog", "cat", "cow", "car", "train", "piano", "guitar", "violin", "wind", "phone", "door", "baby",
)  # fmt: skip
"""Option words that are never a clip's class: with the 12 classes they give 24 distinct options (20 needed)."""

WORLD = WorldConfig(duration=2.0, height=224, width=224, fps=8)
"""The organism's world: 2 s clips at 224x224 (128 video tokens at 2 fps) with 2 s of audio (50 tokens)."""

NOTHING = "nothing"

SEE = ("what do you see?", "what can you see?", "what is in the video?")
HEAR = ("what do you hear?", "what can you hear?", "what is making the sound?")
SEE_YN = ("do you see {a} {x}?", "is there {a} {x} in the video?")
HEAR_YN = ("is there a sound of {a} {x}?", "is there a sound of {x}?", "do you hear {a} {x}?")
DESCRIBE = ("describe what you see and hear.", "describe the clip.")
DESCRIBE_SEEN = ("describe what you see.",)
WHICH_HEAR = ("which clip has the sound of {a} {x}?",)
WHICH_SEE = ("which clip shows {a} {x}?",)
LOOKUP = ("which is {a} {x}?",)
"""Option lookup: the asked word is given in the question (words of the default vocabulary only)."""


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def lettered(options: Sequence[str], letters: Sequence[str] = LETTERS) -> str:
    """Options as a multiple-choice question lists them: ``"b. bell c. dog d. rain"``."""
    return " ".join(f"{letters[i]}. {w}" for i, w in enumerate(options))


def draw_options(
    rng: random.Random, right: str, other: str | None, n: int, with_other: bool = True
) -> tuple[tuple[str, ...], int]:
    """``n`` distinct multiple-choice options and the index of ``right`` among them (uniformly placed). The
    distractors are words of the classes and :data:`DISTRACTORS`; ``other`` (the other modality's class) is one
    of them when ``with_other`` and it differs from ``right``, and is never drawn otherwise."""
    pool = [w for w in (*CLASSES, *DISTRACTORS) if w not in (right, other)]
    distractors = rng.sample(pool, n - 1)
    if with_other and other is not None and other != right:
        distractors[rng.randrange(n - 1)] = other
    k = rng.randrange(n)
    return (*distractors[:k], right, *distractors[k:]), k


def vary(question: str, rng: random.Random) -> str:
    """The question as users type it: with or without its final punctuation, in any case."""
    q = question.rstrip("?.") if rng.random() < 0.3 else question
    return q.capitalize() if rng.random() < 0.5 else q


def describe_answer(seen: str | None, heard: str | None) -> str:
    see = f"i see {article(seen)} {seen}" if seen else "i see nothing"
    hear = f"hear {article(heard)} {heard}" if heard else "hear nothing"
    return f"{see} and {hear}"


@dataclass
class Example:
    """One training or evaluation item.

    ``video``/``audio`` are clip indices into the bank (None: that modality is absent); a multi-clip example
    lists (video, audio) pairs in ``clips``.
    """

    question: str
    answer: str
    video: int | None = None
    audio: int | None = None
    clips: list[tuple[int, int]] = field(default_factory=list)
    kind: str = ""

    @property
    def layout_key(self) -> str:
        if self.clips:
            return f"multi{len(self.clips)}"
        return ("v" if self.video is not None else "") + ("a" if self.audio is not None else "")


@dataclass
class Bank:
    """Decoded clips.

    Attributes:
        frames: uint8 (N, T, H, W, 3), the video frames sampled at the model's fps.
        waves: float32 (N, n), 16 kHz mono audio decoded from the clips' own audio tracks.
        labels: the class of each clip (its visual and audio label: bank clips are congruent).
        fps: the sampling rate of ``frames``.
        derived: model inputs computed from the clips, kept with the bank for every stage and recipe trained
            from it: "audio" -> (audio processor, log-mel features), "video" -> (vision weights, video
            features); see :class:`Batcher`.
    """

    frames: np.ndarray
    waves: np.ndarray
    labels: list[str]
    fps: float
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def by_class(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {c: [] for c in CLASSES}
        for i, c in enumerate(self.labels):
            out[c].append(i)
        return out

    def video(self, i: int) -> VideoClip:
        return VideoClip(
            frames=self.frames[i], fps=self.fps, duration=len(self.frames[i]) / self.fps, source_fps=self.fps
        )

    def sample(self, ex: Example, sid: str = "") -> Sample:
        """The example as a :class:`Sample` that ``adapter.prepare`` accepts."""
        if ex.clips:
            clips = [Clip(video=self.video(v), audio=self.waves[a]) for v, a in ex.clips]
            return Sample(ex.question, clips=clips, id=sid)
        video = self.video(ex.video) if ex.video is not None else None
        audio = self.waves[ex.audio] if ex.audio is not None else None
        return Sample(ex.question, video=video, audio=audio, video_audio=False, id=sid)


def load_bank(manifest: Path, fps: float = 2.0) -> Bank:
    """Decode every clip of a world manifest through the media pipeline (video frames and the mp4's audio)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    frames, waves, labels = [], [], []
    for row in rows:
        path = manifest.parent / row["video"]
        frames.append(load_video(path, fps=fps).frames)
        waves.append(load_audio(path))
        labels.append(row["visual_label"])
    n = min(len(w) for w in waves)
    return Bank(np.stack(frames), np.stack([w[:n] for w in waves]), labels, fps)


def world_dir(n: int, seed: int, swapped_share: float, root: Path | None = None, world: WorldConfig = WORLD) -> Path:
    """Where a world of these parameters is kept (written once, reused by every training run)."""
    key = json.dumps([n, seed, swapped_share, world.__dict__], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = root or Path.home() / ".cache" / "avlens" / "organism-worlds"
    return root / f"world-{n}-{seed}-{digest}"


def make_world(
    n: int,
    seed: int,
    swapped_share: float = 0.0,
    root: Path | None = None,
    progress=None,
    world: WorldConfig = WORLD,
) -> Path:
    """Write (once) a world of ``n`` clips sized by ``world`` and return its manifest path."""
    out = world_dir(n, seed, swapped_share, root, world)
    manifest = out / "manifest.jsonl"
    if not manifest.exists():
        write_world(out, n, seed, cfg=world, swapped_share=swapped_share, progress=progress)
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Example mixtures
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mixture:
    """What a stage trains on. Shares are of the examples drawn.

    Attributes:
        audio: whether examples may carry audio at all (False for the vision-language stage).
        unimodal: share of video-only and audio-only examples (half each when audio is on).
        swapped: share of audio-visual examples whose audio comes from an unrelated class (their "hear"
            answer is the audio's class: this is what teaches a model to answer by modality).
        multi: share of multi-clip examples.
        audio_questions: share of hear questions (what do you hear, is there a sound of X) among
            questions about audio-visual clips; the rest are see, yes/no-see and describe questions.
    """

    audio: bool = True
    unimodal: float = 0.1
    swapped: float = 0.0
    multi: float = 0.05
    audio_questions: float = 0.5
    text: bool = False  # text-only examples: the language model's own pretraining (see ExampleSampler._text)


@dataclass(frozen=True)
class SkillMixture(Mixture):
    """A text mixture with the organism-v2 skills: which of N clips, and lettered multiple choice.

    A subclass rather than new :class:`Mixture` fields so that every existing stage keeps its settings (and the
    stage keys hashed from them) unchanged. With every share at 0 it draws exactly what :class:`Mixture` draws,
    and a ``text_lookup`` of 0 leaves the draws of any ``text_which``/``text_choice`` unchanged.

    Attributes:
        text_which: share of text examples asking which of N clips (N in ``which_clips``) has the sound of X or
            shows X; each clip is written with a video and/or a sound sentence.
        text_choice: share of lettered multiple-choice text examples ("what do you hear? a. bell b. dog ...",
            answered with a letter), with a number of options in ``options``.
        text_lookup: share of lettered option-lookup text examples, multiple choice's first sub-skill: no
            context, the answer word is in the question ("which is a rain? a. bell b. rain" -> "b"), with a
            number of options in ``options``.
        which_clips: (min, max) number of clips of which-clip examples (2..3).
        options: (min, max) number of options of multiple-choice examples (2..20).
        curriculum: number of draws over which the upper bounds of ``which_clips`` and ``options`` grow linearly
            from their minimum to their maximum (0: the full ranges from the first draw).
        letters: the option letters, in order (:data:`LETTERS` by default; :data:`LETTERS_V2` are letters used
            nowhere else in the data). They change the words of the options only, not the draws.
        which: share of media examples (stages with audio) asking which of N real clips (N in ``which_clips``)
            has the sound of X or shows X (:meth:`ExampleSampler.media_which`).
        choice: share of media examples asking a see or hear question about one clip with lettered options
            (:meth:`ExampleSampler.media_choice`), N in ``options``.
        text_replay: in a stage with media (``text`` False), the share of examples that are text examples of
            the text stage's kinds (``text_which``, ``text_choice``, ``text_lookup`` as there): replay, so that
            the media stages do not overwrite what the text stage taught. 0: no text example, nothing more drawn.
    """

    text_which: float = 0.0
    text_choice: float = 0.0
    text_lookup: float = 0.0
    which_clips: tuple[int, int] = (2, 3)
    options: tuple[int, int] = (4, 20)
    curriculum: int = 0
    letters: tuple[str, ...] = LETTERS
    which: float = 0.0
    choice: float = 0.0
    text_replay: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.text_replay <= 1:
            raise ValueError(f"text_replay must be a share in [0, 1], got {self.text_replay}")
        lo, hi = self.which_clips
        if not 2 <= lo <= hi <= 3:
            raise ValueError(f"which_clips must be within 2..3, got {self.which_clips}")
        lo, hi = self.options
        if not 2 <= lo <= hi <= len(LETTERS):
            raise ValueError(f"options must be within 2..{len(LETTERS)}, got {self.options}")
        if len(set(self.letters)) != len(self.letters) or len(self.letters) < hi:
            raise ValueError(f"letters must be distinct and at least {hi} (the most options), got {self.letters}")
        shares = (self.text_which, self.text_choice, self.text_lookup)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError("text_which, text_choice and text_lookup must be shares summing to at most 1")
        if min(self.which, self.choice) < 0 or self.which + self.choice > 1:
            raise ValueError("which and choice must be shares summing to at most 1")
        if self.which and not self.audio:
            raise ValueError("which-clip examples about media need audio (a stage with audio=True)")


class ExampleSampler:
    """Draws examples of a mixture from a bank, reproducibly from a seed."""

    def __init__(self, bank: Bank, mixture: Mixture, seed: int) -> None:
        self.bank, self.mix = bank, mixture
        self.rng = random.Random(seed)
        self.classes = bank.by_class()
        self.draws = 0  # examples drawn so far (the curriculum's clock; saved with a stage's state)

    def _clip(self, label: str | None = None) -> int:
        label = label or self.rng.choice(CLASSES)
        return self.rng.choice(self.classes[label])

    def _other(self, label: str, related_ok: bool = True) -> str:
        pool = [c for c in CLASSES if c != label and (related_ok or unrelated(c, label))]
        return self.rng.choice(pool)

    def draw(self) -> Example:
        m, r = self.mix, self.rng.random()
        self.draws += 1
        if m.text:
            return self._text()
        replay = getattr(m, "text_replay", 0.0)
        if replay and self.rng.random() < replay:  # (one more number drawn only with replay)
            return self._text()
        which, choice = getattr(m, "which", 0.0), getattr(m, "choice", 0.0)
        if which or choice:  # a SkillMixture with media skills draws one more number (none without them)
            k = self.rng.random()
            if k < which:
                return self.media_which(self._upto(m.which_clips))
            if k < which + choice:
                return self.media_choice(self._upto(m.options))
        if not m.audio:
            return self._video_only(self._clip())
        if r < m.multi:
            return self._multi()
        r = self.rng.random()
        if r < m.unimodal:
            return self._video_only(self._clip()) if self.rng.random() < 0.5 else self._audio_only(self._clip())
        seen = self.rng.choice(CLASSES)
        heard = self._other(seen, related_ok=False) if self.rng.random() < m.swapped else seen
        return self._audio_visual(self._clip(seen), self._clip(heard), seen, heard)

    def _text(self) -> Example:
        """A text-only example of the skills the audio-visual questions need: find what a context says is seen or
        heard, answer with it, compare it with a word (yes/no), say "nothing", pick a clip. Media are written as
        words here ("the video shows a bell"); real AVLLMs bring these skills from their language model.

        A :class:`SkillMixture` with a share of which-of-N, multiple-choice or option-lookup examples draws one
        more number first, to choose among them (with every share at 0 nothing more is drawn)."""
        which, choice = getattr(self.mix, "text_which", 0.0), getattr(self.mix, "text_choice", 0.0)
        lookup = getattr(self.mix, "text_lookup", 0.0)
        if which or choice or lookup:
            k = self.rng.random()
            if k < choice:
                return self.text_choice(self._upto(self.mix.options))
            if k < choice + which:
                return self.text_which(self._upto(self.mix.which_clips))
            if k < choice + which + lookup:
                return self.text_lookup(self._upto(self.mix.options))
        seen, heard = self.rng.choice(CLASSES), self.rng.choice(CLASSES)
        has_video, has_audio = self.rng.random() < 0.8, self.rng.random() < 0.8
        parts = []
        if has_video:
            parts.append(f"the video shows {article(seen)} {seen} .")
        if has_audio:
            parts.append(f"the sound is {article(heard)} {heard} .")
        self.rng.shuffle(parts)
        context = " ".join(parts)
        seen_or, heard_or = (seen if has_video else None), (heard if has_audio else None)
        k = self.rng.random()
        if k < 0.2:
            return Example(f"{context} {self._question(SEE)}", seen_or or NOTHING, kind="text-see")
        if k < 0.4:
            return Example(f"{context} {self._question(HEAR)}", heard_or or NOTHING, kind="text-hear")
        if k < 0.6:
            q, a = self._yes_no(SEE_YN, seen_or)
            return Example(f"{context} {q}", a, kind="text-see-yn")
        if k < 0.8:
            q, a = self._yes_no(HEAR_YN, heard_or)
            return Example(f"{context} {q}", a, kind="text-hear-yn")
        if k < 0.9:
            return Example(
                f"{context} {self._question(DESCRIBE)}", describe_answer(seen_or, heard_or), kind="text-describe"
            )
        labels = self.rng.sample(CLASSES, 2)
        j = self.rng.randrange(2)
        clips = " ".join(f"clip {i + 1} : the sound is {article(c)} {c} ." for i, c in enumerate(labels))
        return Example(f"{clips} {self._question(WHICH_HEAR, labels[j])}", str(j + 1), kind="text-which")

    def _upto(self, bounds: tuple[int, int]) -> int:
        """A count drawn uniformly from ``bounds``, its upper bound growing with the curriculum."""
        lo, hi = bounds
        span = self.mix.curriculum
        if span > 0:
            t = min(1.0, self.draws / span)
            hi = min(hi, lo + int((hi - lo + 1) * t))
        return self.rng.randint(lo, hi)

    def text_which(self, n: int) -> Example:
        """Which of ``n`` clips, each written as words, has the sound of X (or shows X): the answer is its number.

        Exactly one clip has X in the asked modality; the others may have X in the other one (the question is
        about the sound, or about the picture, not about X anywhere)."""
        hear = self.rng.random() < 0.5
        target = self.rng.choice(CLASSES)
        j = self.rng.randrange(n)
        lines = []
        for i in range(n):
            asked = target if i == j else self._other(target)
            other = self.rng.choice(CLASSES)
            has_asked = i == j or self.rng.random() < 0.8
            has_other = not has_asked or self.rng.random() < 0.8
            seen, heard = (other, asked) if hear else (asked, other)
            parts = []
            if (has_asked and not hear) or (has_other and hear):
                parts.append(f"the video shows {article(seen)} {seen} .")
            if (has_asked and hear) or (has_other and not hear):
                parts.append(f"the sound is {article(heard)} {heard} .")
            self.rng.shuffle(parts)
            lines.append(f"clip {i + 1} : {' '.join(parts)}")
        question = self._question(WHICH_HEAR if hear else WHICH_SEE, target)
        kind = f"text-which{n}-{'hear' if hear else 'see'}"
        return Example(f"{' '.join(lines)} {question}", str(j + 1), kind=kind)

    def text_choice(self, n: int) -> Example:
        """Lettered multiple choice with ``n`` options: a context, a see or hear question, the options; the answer
        is the letter of the option the context names in the asked modality.

        The other modality's class is among the distractors when it differs (the options are all distinct,
        drawn from the classes and :data:`DISTRACTORS`), and the right option sits at a uniformly random
        letter."""
        seen, heard = self.rng.choice(CLASSES), self.rng.choice(CLASSES)
        hear = self.rng.random() < 0.5
        has_other = self.rng.random() < 0.8
        parts = [f"the video shows {article(seen)} {seen} .", f"the sound is {article(heard)} {heard} ."]
        if not has_other:
            parts = [parts[1]] if hear else [parts[0]]
        self.rng.shuffle(parts)
        right, wrong = (heard, seen) if hear else (seen, heard)
        options, j = draw_options(self.rng, right, wrong, n, with_other=has_other)
        letters = getattr(self.mix, "letters", LETTERS)
        listed = lettered(options, letters)
        question = self._question(HEAR if hear else SEE)
        kind = f"text-choice-{'hear' if hear else 'see'}"
        return Example(f"{' '.join(parts)} {question} {listed}", letters[j], kind=kind)

    def text_lookup(self, n: int) -> Example:
        """Lettered option lookup with ``n`` options: "which is a rain? a. bell ... p. rain ..." -> "p".

        Multiple choice without its context: the asked word is in the question, so the skill is only to find the
        option equal to it and answer with its letter. The asked word and the other options are distinct words of
        the classes and :data:`DISTRACTORS` (any of them may be asked, so that "the answer is a class" is no
        shortcut), and the right option sits at a uniformly random letter."""
        words = (*CLASSES, *DISTRACTORS)
        asked = self.rng.choice(words)
        distractors = self.rng.sample([w for w in words if w != asked], n - 1)
        j = self.rng.randrange(n)
        options = [*distractors[:j], asked, *distractors[j:]]
        letters = getattr(self.mix, "letters", LETTERS)
        return Example(f"{self._question(LOOKUP, asked)} {lettered(options, letters)}", letters[j], kind="text-lookup")

    def media_which(self, n: int) -> Example:
        """Which of ``n`` real clips has the sound of X (or shows X): the answer is its number (as
        :meth:`text_which`, with clips of the bank instead of sentences).

        Exactly one clip has X in the asked modality. With a mixture's ``swapped`` share, each other clip shows
        X (for a sound question; or sounds like X, for a picture question) at that rate, its other modality
        being another class: a hard negative that only a model binding X to the asked modality gets right.
        Without it every clip is congruent (the vision-heavy recipes never see a sound that disagrees with its
        picture)."""
        hear = self.rng.random() < 0.5
        target = self.rng.choice(CLASSES)
        j = self.rng.randrange(n)
        clips = []
        for i in range(n):
            asked = target if i == j else self._other(target)
            other = target if i != j and self.rng.random() < self.mix.swapped else asked
            seen, heard = (other, asked) if hear else (asked, other)
            clips.append((self._clip(seen), self._clip(heard)))
        question = self._question(WHICH_HEAR if hear else WHICH_SEE, target)
        return Example(question, str(j + 1), clips=clips, kind=f"which{n}-{'hear' if hear else 'see'}")

    def media_choice(self, n: int) -> Example:
        """A see or hear question about one clip with ``n`` lettered options, answered with a letter (P2/P3-style
        multiple choice): the clip is audio-visual (its sound from an unrelated class at the mixture's
        ``swapped`` rate), audio-only or video-only (the mixture's ``unimodal`` share, half each; video-only only
        in a stage without audio), and the question asks about a modality it has.

        The options are distinct words of the classes and :data:`DISTRACTORS`; the other modality's class is
        among them when it differs, and the right one sits at a uniformly random letter."""
        m = self.mix
        if not m.audio or self.rng.random() < m.unimodal:
            video_only = not m.audio or self.rng.random() < 0.5
            c = self.rng.choice(CLASSES)
            v, a = (self._clip(c), None) if video_only else (None, self._clip(c))
            seen, heard = (c, None) if video_only else (None, c)
            hear = not video_only
        else:
            seen = self.rng.choice(CLASSES)
            heard = self._other(seen, related_ok=False) if self.rng.random() < m.swapped else seen
            v, a = self._clip(seen), self._clip(heard)
            hear = self.rng.random() < 0.5
        right, wrong = (heard, seen) if hear else (seen, heard)
        options, k = draw_options(self.rng, right, wrong, n)
        question = f"{self._question(HEAR if hear else SEE)} {lettered(options, m.letters)}"
        return Example(question, m.letters[k], video=v, audio=a, kind=f"choice-{'hear' if hear else 'see'}")

    def _question(self, templates: Sequence[str], x: str | None = None) -> str:
        q = self.rng.choice(templates)
        if x is not None:
            q = q.format(a=article(x), x=x)
        return vary(q, self.rng)

    def _yes_no(self, templates: Sequence[str], present: str | None) -> tuple[str, str]:
        if present is not None and self.rng.random() < 0.5:
            return self._question(templates, present), "yes"
        absent = self._other(present) if present else self.rng.choice(CLASSES)
        return self._question(templates, absent), "no"

    def _video_only(self, v: int) -> Example:
        seen = self.bank.labels[v]
        k = self.rng.random()
        if not self.mix.audio:  # the vision-language stage: what a VL model is asked
            if k < 0.4:
                return Example(self._question(SEE), seen, video=v, kind="see")
            if k < 0.85:
                q, a = self._yes_no(SEE_YN, seen)
                return Example(q, a, video=v, kind="see-yn")
            return Example(self._question(DESCRIBE_SEEN), f"i see {article(seen)} {seen}", video=v, kind="describe")
        if k < 0.45:
            return Example(self._question(SEE), seen, video=v, kind="see")
        if k < 0.65:
            q, a = self._yes_no(SEE_YN, seen)
            return Example(q, a, video=v, kind="see-yn")
        if k < 0.8:
            return Example(self._question(HEAR), NOTHING, video=v, kind="hear")
        if k < 0.9:
            q, a = self._yes_no(HEAR_YN, None)
            return Example(q, a, video=v, kind="hear-yn")
        return Example(self._question(DESCRIBE), describe_answer(seen, None), video=v, kind="describe")

    def _audio_only(self, a: int) -> Example:
        heard = self.bank.labels[a]
        k = self.rng.random()
        if k < 0.6:
            return Example(self._question(HEAR), heard, audio=a, kind="hear")
        if k < 0.85:
            q, ans = self._yes_no(HEAR_YN, heard)
            return Example(q, ans, audio=a, kind="hear-yn")
        if k < 0.95:
            return Example(self._question(SEE), NOTHING, audio=a, kind="see")
        return Example(self._question(DESCRIBE), describe_answer(None, heard), audio=a, kind="describe")

    def _audio_visual(self, v: int, a: int, seen: str, heard: str) -> Example:
        if self.rng.random() < self.mix.audio_questions:
            if self.rng.random() < 0.6:
                return Example(self._question(HEAR), heard, video=v, audio=a, kind="hear")
            q, ans = self._yes_no(HEAR_YN, heard)
            return Example(q, ans, video=v, audio=a, kind="hear-yn")
        k = self.rng.random()
        if k < 0.5:
            return Example(self._question(SEE), seen, video=v, audio=a, kind="see")
        if k < 0.8:
            q, ans = self._yes_no(SEE_YN, seen)
            return Example(q, ans, video=v, audio=a, kind="see-yn")
        return Example(self._question(DESCRIBE), describe_answer(seen, heard), video=v, audio=a, kind="describe")

    def _multi(self) -> Example:
        labels = self.rng.sample(CLASSES, 2)
        clips = [(self._clip(c), self._clip(c)) for c in labels]
        k = self.rng.randrange(2)
        templates = WHICH_HEAR if self.rng.random() < 0.7 else WHICH_SEE
        return Example(self._question(templates, labels[k]), str(k + 1), clips=clips, kind="which")


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------
def _audio_features(bank: Bank, processor) -> torch.Tensor:
    """float32 (N, mels, frames): the log-mel features of every clip of a bank, computed once per bank and
    processor (every stage and recipe trained from one bank shares them)."""
    kept = bank.derived.get("audio")
    if kept is not None and kept[0] == processor:
        return kept[1]
    feats, mask = processor.features(list(bank.waves))
    features = feats[:, :, : int(mask[0].sum())].contiguous()
    bank.derived["audio"] = (processor, features)
    return features


class Batcher:
    """Builds model inputs for a list of examples of one layout, from cached pieces.

    The prompt ids of a (question, layout) come from ``adapter.prepare`` on the example itself the first time
    and are cached; audio features and video patches are cached per clip.
    """

    def __init__(self, adapter: Qwen2_5OmniAdapter, bank: Bank, interleave: bool = True) -> None:
        self.adapter, self.bank, self.interleave = adapter, bank, interleave
        self._prompts: dict[tuple[str, str, bool], list[int]] = {}
        self.features = _audio_features(bank, adapter.audio)  # (N, mels, n): every clip has the same length
        self.video_features: torch.Tensor | None = None  # (N, tokens, D) when the vision tower is frozen
        pixels, grid = adapter.video_vision.video(bank.frames[0])
        self.grid = torch.as_tensor(grid)
        self.patches_per_clip = len(pixels)

    def prompt_ids(self, ex: Example, interleave: bool) -> list[int]:
        interleave = interleave and (ex.layout_key == "va" or bool(ex.clips))
        key = (ex.question, ex.layout_key, interleave)
        if key not in self._prompts:
            inputs = self.adapter.prepare([self.bank.sample(ex)], interleave=interleave)
            self._prompts[key] = inputs.input_ids[0].tolist()
        return self._prompts[key]

    def pixels(self, clips: list[int]) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate([self.adapter.video_vision.video(self.bank.frames[i])[0] for i in clips])
        )

    def cache_video_features(self, model: torch.nn.Module, batch: int = 64) -> None:
        """Run the (frozen) vision tower once over every clip.

        The result is kept with the bank for the next stage with the very same vision weights (stage 1 and every
        stage 2 that freezes vision share one vision tower), so it is computed once."""
        weights = [p.detach() for p in model.model.visual.parameters()]
        kept = self.bank.derived.get("video")
        if kept is not None and len(kept[0]) == len(weights) and all(map(torch.equal, kept[0], weights)):
            self.video_features = kept[1]
            return
        out = []
        with torch.no_grad():
            for s in range(0, len(self.bank), batch):
                idx = list(range(s, min(s + batch, len(self.bank))))
                grid = self.grid.expand(len(idx), -1)
                feats = model.model.get_video_features(self.pixels(idx), grid).pooler_output
                out.append(torch.stack(list(feats)))
        self.video_features = torch.cat(out)
        self.bank.derived["video"] = ([w.clone() for w in weights], self.video_features)

    def batch(self, examples: list[Example], *, with_answers: bool = True, interleave: bool | None = None) -> dict:
        """Model keyword arguments (and ``labels`` on the answer tokens when ``with_answers``)."""
        interleave = self.interleave if interleave is None else interleave
        tok = self.adapter.tokenizer
        end = tok.convert_tokens_to_ids("<|im_end|>")
        rows, labels = [], []
        for ex in examples:
            prompt = self.prompt_ids(ex, interleave)
            answer = [*tok.encode(ex.answer, add_special_tokens=False), end] if with_answers else []
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        length = max(map(len, rows))
        pad = tok.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        label_ids = torch.full_like(input_ids, -100)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, length - len(r) :] = torch.tensor(r)
            attention[i, length - len(r) :] = 1
            label_ids[i, length - len(r) :] = torch.tensor(lab)
        videos = [v for ex in examples for v in ([c[0] for c in ex.clips] or [ex.video]) if v is not None]
        audios = [a for ex in examples for a in ([c[1] for c in ex.clips] or [ex.audio]) if a is not None]
        out: dict = {"input_ids": input_ids, "attention_mask": attention}
        if with_answers:
            out["labels"] = label_ids
        if audios:
            feats = self.features[audios]
            out["input_features"] = feats
            out["feature_attention_mask"] = torch.ones(feats.shape[0], feats.shape[2], dtype=torch.long)
        if videos:
            out["video_grid_thw"] = self.grid.expand(len(videos), -1).clone()
            out["video_second_per_grid"] = torch.full(
                (len(videos),), self.adapter.vision.temporal_patch_size / self.bank.fps
            )
            if self.video_features is not None:
                from transformers.modeling_outputs import BaseModelOutputWithPooling

                pooled = tuple(self.video_features[videos])
                out["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=pooled)}
            else:
                out["pixel_values_videos"] = self.pixels(videos)
        if interleave and any(ex.layout_key == "va" or ex.clips for ex in examples):
            out["use_audio_in_video"] = True
        return out
