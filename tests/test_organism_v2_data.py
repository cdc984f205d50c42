"""The organism-v2 text skills (which of N clips, lettered multiple choice, option lookup): well-formed, in their
shares, and off by default (the examples every existing mixture draws are unchanged)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from avlens.models.qwen2_5_omni import Qwen2_5OmniAdapter
from avlens.models.tokenizer import build_tokenizer
from avlens.organism.checkpoints import __file__ as checkpoints_init
from avlens.organism.data import (
    DISTRACTORS,
    LETTERS,
    LETTERS_V2,
    Bank,
    Example,
    ExampleSampler,
    Mixture,
    SkillMixture,
)
from avlens.organism.model import QUESTION_WORDS, V2_WORDS, VOCABULARY, VOCABULARY_V2, VOCABULARY_V2_LETTERS
from avlens.organism.world import CLASSES

# Drawn with the code before the v2 skills existed (scripts of that commit, the bank below): 40 examples each of
# Mixture(text=True) from seed 7 and Mixture(swapped=0.3, multi=0.2) from seed 3, as
# json.dumps({"text": [...], "av": [...]}) + "\n" of [question, answer, video, audio, clips, kind] rows.
BEFORE_SHA256 = "e010667bfa97b2ad673bc684c23713a8f7ee10ed941b8e0c73b4f4e9135028ed"
# Drawn with the code before option lookup existed: 60 examples of
# SkillMixture(text=True, text_which=0.3, text_choice=0.2, curriculum=100) from seed 8, as
# json.dumps([[question, answer, kind], ...]) + "\n".
BEFORE_LOOKUP_SHA256 = "9715727485e2bf17dcb2cf9e6b8703ec7363b2344ea1b9cb1a8dda7cf4f9853d"
BEFORE_TEXT_HEAD = [
    ["the sound is a bell . the video shows a bee . What do you hear?", "bell", "text-hear"],
    ["the sound is a frog . the video shows a bell . describe what you see and hear.", "i see a bell and hear a frog",
     "text-describe"],
    ["the sound is a rain . the video shows a bird . What do you see", "bird", "text-see"],
]  # fmt: skip


@pytest.fixture(scope="module")
def bank() -> Bank:
    """Two blank clips per class (the text examples read only the classes; the others only clip indices)."""
    labels = [c for c in CLASSES for _ in range(2)]
    return Bank(np.zeros((len(labels), 1, 2, 2, 3), np.uint8), np.zeros((len(labels), 16), np.float32), labels, 2.0)


def _rows(sampler: ExampleSampler, n: int) -> list[list]:
    drawn = [sampler.draw() for _ in range(n)]
    return [[e.question, e.answer, e.video, e.audio, [list(c) for c in e.clips], e.kind] for e in drawn]


@pytest.mark.parametrize("cls", [Mixture, SkillMixture])
def test_default_draws_are_unchanged(bank, cls):
    out = {
        "text": _rows(ExampleSampler(bank, cls(text=True), 7), 40),
        "av": _rows(ExampleSampler(bank, cls(swapped=0.3, multi=0.2), 3), 40),
    }
    assert [[q, a, k] for q, a, _, _, _, k in out["text"][:3]] == BEFORE_TEXT_HEAD
    assert hashlib.sha256((json.dumps(out) + "\n").encode()).hexdigest() == BEFORE_SHA256


def test_default_vocabulary_is_the_shipped_checkpoints():
    """VOCABULARY is unchanged (the v2 words live apart): its tokenizer is the shipped checkpoints' tokenizer."""
    shipped = json.loads((Path(checkpoints_init).parent / "vl-base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert build_tokenizer(VOCABULARY, Qwen2_5OmniAdapter.tokens).get_vocab() == shipped
    assert not set(V2_WORDS) & set(VOCABULARY) and VOCABULARY_V2[: len(VOCABULARY)] == VOCABULARY


def test_v2_vocabulary_covers_the_new_examples(bank):
    tok = build_tokenizer(VOCABULARY_V2, Qwen2_5OmniAdapter.tokens)
    sampler = ExampleSampler(bank, SkillMixture(text=True, text_which=0.3, text_choice=0.3, text_lookup=0.3), 0)
    for _ in range(300):
        ex = sampler.draw()
        assert tok.unk_token_id not in tok.encode(f"{ex.question} {ex.answer}", add_special_tokens=False), ex


def _parse_choice(ex: Example) -> tuple[dict[str, str], list[tuple[str, str]], str]:
    """(context: modality -> label, [(letter, option)], question)."""
    said = re.findall(r"the (video shows|sound is) an? (\w+) \.", ex.question)
    context = {("see" if m == "video shows" else "hear"): w for m, w in said}
    options = re.findall(r"\b([a-t])\. (\w+)", ex.question)
    question = ex.question.split(" . ")[-1].lower()
    return context, options, question


def test_multiple_choice_is_well_formed(bank):
    sampler = ExampleSampler(bank, SkillMixture(text=True), 1)
    letters = Counter()
    for n in range(2, 21):
        for _ in range(60):
            ex = sampler.text_choice(n)
            context, options, question = _parse_choice(ex)
            asked = "hear" if ex.kind.endswith("hear") else "see"
            assert ("hear" in question or "sound" in question) == (asked == "hear"), ex.question
            assert [letter for letter, _ in options] == list(LETTERS[:n])
            words = [w for _, w in options]
            assert len(set(words)) == n and set(words) <= set(CLASSES) | set(DISTRACTORS)
            assert ex.answer in LETTERS[:n]
            assert dict(options)[ex.answer] == context[asked]
            letters[LETTERS.index(ex.answer) / (n - 1)] += 1
    # the right option sits anywhere: first and last letters both common
    assert letters[0.0] > 50 and letters[1.0] > 50


def test_multiple_choice_puts_the_other_modality_among_distractors(bank):
    sampler = ExampleSampler(bank, SkillMixture(text=True), 2)
    hits = total = 0
    for _ in range(500):
        ex = sampler.text_choice(6)
        context, options, _ = _parse_choice(ex)
        asked = "hear" if ex.kind.endswith("hear") else "see"
        other = context.get("see" if asked == "hear" else "hear")
        if other is not None and other != context[asked]:
            total += 1
            hits += other in {w for _, w in options}
    assert total > 300 and hits == total


@pytest.mark.parametrize("n", [2, 3])
def test_which_clip_is_well_formed(bank, n):
    sampler = ExampleSampler(bank, SkillMixture(text=True), 3)
    kinds = Counter()
    for _ in range(400):
        ex = sampler.text_which(n)
        body, question = ex.question.rsplit(" . ", 1)
        clips = re.split(r"clip \d : ", body + " .")[1:]
        assert len(clips) == n and re.findall(r"clip (\d) :", ex.question) == [str(i + 1) for i in range(n)]
        hear = ex.kind.endswith("hear")
        kinds[ex.kind] += 1
        target = re.search(r"(?:sound of|shows) an? (\w+)\??$", question.lower()).group(1)
        pattern = r"the sound is an? (\w+) \." if hear else r"the video shows an? (\w+) \."
        has = [target in re.findall(pattern, c) for c in clips]
        assert ex.answer in [str(i + 1) for i in range(n)]
        assert has == [str(i + 1) == ex.answer for i in range(n)], ex.question
        assert all(c.strip() for c in clips)  # every clip has at least one sentence
    assert kinds[f"text-which{n}-hear"] > 150 and kinds[f"text-which{n}-see"] > 150


def test_shares_follow_the_mixture(bank):
    sampler = ExampleSampler(bank, SkillMixture(text=True, text_which=0.3, text_choice=0.2), 4)
    kinds = Counter(sampler.draw().kind.split("-")[1] for _ in range(4000))
    share = {k: v / 4000 for k, v in kinds.items()}
    assert abs(share.get("choice", 0) - 0.2) < 0.03
    assert abs(sum(v for k, v in share.items() if k.startswith("which") and k != "which") - 0.3) < 0.03
    counts = Counter()
    sampler = ExampleSampler(bank, SkillMixture(text=True, text_which=0.5, text_choice=0.5, options=(5, 9)), 5)
    for _ in range(2000):
        ex = sampler.draw()
        counts[ex.kind.split("-")[1]] += 1
        if ex.kind.startswith("text-choice"):
            assert 5 <= len(_parse_choice(ex)[1]) <= 9
    assert set(counts) == {"choice", "which2", "which3"}


def test_curriculum_grows_the_counts(bank):
    mix = SkillMixture(text=True, text_which=0.5, text_choice=0.5, curriculum=1000)
    sampler = ExampleSampler(bank, mix, 6)
    early, late = [], []
    for i in range(2000):
        ex = sampler.draw()
        size = len(_parse_choice(ex)[1]) if ex.kind.startswith("text-choice") else int(ex.kind[10])
        (early if i < 100 else late if i >= 1000 else []).append((ex.kind.startswith("text-choice"), size))
    assert max(s for c, s in early if c) <= 5 and all(s == 2 for c, s in early if not c)
    assert max(s for c, s in late if c) == 20 and {s for c, s in late if not c} == {2, 3}


def test_skill_draws_without_lookup_are_unchanged(bank):
    """A lookup share of 0 (the default) leaves the draws of a which-clip and multiple-choice mixture as they were."""
    mix = SkillMixture(text=True, text_which=0.3, text_choice=0.2, curriculum=100)
    sampler = ExampleSampler(bank, mix, 8)
    rows = [[e.question, e.answer, e.kind] for e in (sampler.draw() for _ in range(60))]
    assert hashlib.sha256((json.dumps(rows) + "\n").encode()).hexdigest() == BEFORE_LOOKUP_SHA256


def test_lookup_is_well_formed(bank):
    """The answer letter points at the option equal to the word asked about; there is no context."""
    sampler = ExampleSampler(bank, SkillMixture(text=True), 9)
    letters, asked_words = Counter(), Counter()
    for n in range(2, 21):
        for _ in range(60):
            ex = sampler.text_lookup(n)
            assert ex.kind == "text-lookup" and not re.search("video shows|sound is", ex.question)
            asked = re.match(r"which is an? (\w+)\??$", ex.question.split(" a. ")[0].lower()).group(1)
            options = re.findall(r"\b([a-t])\. (\w+)", ex.question)
            assert [letter for letter, _ in options] == list(LETTERS[:n])
            words = [w for _, w in options]
            assert len(set(words)) == n and set(words) <= set(CLASSES) | set(DISTRACTORS)
            assert ex.answer in LETTERS[:n] and dict(options)[ex.answer] == asked
            letters[LETTERS.index(ex.answer) / (n - 1)] += 1
            asked_words[asked] += 1
    assert letters[0.0] > 50 and letters[1.0] > 50
    assert set(asked_words) == set(CLASSES) | set(DISTRACTORS)  # distractor words are asked too: no shortcut


def test_lookup_share_and_options_from_two(bank):
    mix = SkillMixture(text=True, text_which=0.2, text_choice=0.2, text_lookup=0.25, options=(2, 20), curriculum=2000)
    sampler = ExampleSampler(bank, mix, 10)
    kinds, early, late = Counter(), [], []
    for i in range(4000):
        ex = sampler.draw()
        kinds[ex.kind.split("-")[1]] += 1
        if ex.kind in ("text-lookup", "text-choice-see", "text-choice-hear"):
            n = len(re.findall(r"\b[a-t]\. \w+", ex.question))
            (early if i < 200 else late if i >= 2000 else []).append(n)
    assert abs(kinds["lookup"] / 4000 - 0.25) < 0.03 and abs(kinds["choice"] / 4000 - 0.2) < 0.03
    assert min(early) == 2 and max(early) <= 4  # the curriculum starts at 2 options
    assert min(late) == 2 and max(late) == 20


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError):
        SkillMixture(options=(4, 21))
    with pytest.raises(ValueError):
        SkillMixture(which_clips=(2, 4))
    with pytest.raises(ValueError):
        SkillMixture(text_which=0.6, text_choice=0.6)
    with pytest.raises(ValueError):
        SkillMixture(text_which=0.4, text_choice=0.4, text_lookup=0.3)
    with pytest.raises(ValueError):
        SkillMixture(text_lookup=-0.1)


V2_LETTERS_MIX = dict(text=True, text_which=0.2, text_choice=0.3, text_lookup=0.3, options=(2, 20), letters=LETTERS_V2)


def _ordinary_tokens(tok, ex: Example, letters: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the question's tokens outside option markers, the option markers' letters): a marker is a letter token
    followed by "." and then an option word."""
    tokens = tok.convert_ids_to_tokens(tok.encode(ex.question, add_special_tokens=False))
    markers = {i for i, t in enumerate(tokens[:-2]) if t in letters and tokens[i + 1] == "." and tokens[i + 2] != "."}
    return [t for i, t in enumerate(tokens) if i not in markers], [tokens[i] for i in sorted(markers)]


def test_v2_letters_are_used_nowhere_else():
    """No v2 option letter is a word of the default vocabulary, a class, a distractor or a question word."""
    assert len(LETTERS_V2) == len(set(LETTERS_V2)) == 20
    words = set(VOCABULARY) | set(QUESTION_WORDS) | set(CLASSES) | set(DISTRACTORS) | {"nothing", "yes", "no"}
    assert not set(LETTERS_V2) & words
    assert {"a", "i"} & set(LETTERS) <= words  # the defect the v2 letters remove: "a" and "i" are words too
    assert VOCABULARY_V2_LETTERS[: len(VOCABULARY_V2)] == VOCABULARY_V2 and set(LETTERS_V2) <= set(
        VOCABULARY_V2_LETTERS
    )


def test_v2_letters_appear_only_as_option_markers(bank):
    """In every drawn example (every kind, 2-20 options), a v2 letter token occurs only as an option marker, the
    markers run in order, the answer of a lettered kind is one of them, and no other answer is a letter."""
    tok = build_tokenizer(VOCABULARY_V2_LETTERS, Qwen2_5OmniAdapter.tokens)
    sampler = ExampleSampler(bank, SkillMixture(**V2_LETTERS_MIX), 11)
    lettered = 0
    for _ in range(1500):
        ex = sampler.draw()
        ordinary, markers = _ordinary_tokens(tok, ex, LETTERS_V2)
        assert not set(ordinary) & set(LETTERS_V2), ex.question
        assert tok.unk_token_id not in tok.encode(f"{ex.question} {ex.answer}", add_special_tokens=False), ex
        answer_words = tok.convert_ids_to_tokens(tok.encode(ex.answer, add_special_tokens=False))
        if ex.kind.startswith(("text-choice", "text-lookup")):
            lettered += 1
            assert markers == list(LETTERS_V2[: len(markers)]) and len(markers) >= 2
            assert answer_words == [ex.answer] and ex.answer in markers
        else:
            assert not markers and not set(answer_words) & set(LETTERS_V2), ex
    assert lettered > 700


def test_default_letters_do_collide(bank):
    """The check above has teeth: with the default letters, "a" shows up as an ordinary word of the options'
    examples (the article of "the sound is a bell", "which is a rain?")."""
    tok = build_tokenizer(VOCABULARY_V2, Qwen2_5OmniAdapter.tokens)
    sampler = ExampleSampler(bank, SkillMixture(**{**V2_LETTERS_MIX, "letters": LETTERS}), 11)
    drawn = [sampler.draw() for _ in range(300)]
    lettered = [ex for ex in drawn if ex.kind.startswith(("text-choice", "text-lookup"))]
    assert any("a" in _ordinary_tokens(tok, ex, LETTERS)[0] for ex in lettered)


def test_letters_change_only_the_option_words(bank):
    """The same seed draws the same examples with either letter set, letter for letter mapped."""
    plain = ExampleSampler(bank, SkillMixture(**{**V2_LETTERS_MIX, "letters": LETTERS}), 12)
    v2 = ExampleSampler(bank, SkillMixture(**V2_LETTERS_MIX), 12)
    for _ in range(300):
        a, b = plain.draw(), v2.draw()
        assert a.kind == b.kind
        if a.kind.startswith(("text-choice", "text-lookup")):
            n = len(re.findall(r"\b[a-t]\. ", a.question.split("?")[-1]))
            mapped = a.question.split("?")[-1]
            for i in reversed(range(n)):
                mapped = mapped.replace(f" {LETTERS[i]}. ", f" {LETTERS_V2[i]}. ")
            assert b.question.split("?")[-1] == mapped
            assert LETTERS_V2[LETTERS.index(a.answer)] == b.answer
        else:
            assert (a.question, a.answer) == (b.question, b.answer)


def test_bad_letters_are_refused():
    with pytest.raises(ValueError):
        SkillMixture(options=(2, 20), letters=LETTERS_V2[:10])
    with pytest.raises(ValueError):
        SkillMixture(letters=("b", "b", *LETTERS_V2[2:]))


# ---------------------------------------------------------------------------------------------------------
# The skills about real clips (media stages) and their evaluation items
# ---------------------------------------------------------------------------------------------------------
def _asked(ex: Example) -> tuple[bool, str]:
    """(hear?, X) of a which-clip question."""
    hear = ex.kind.endswith("hear")
    return hear, re.search(r"(?:sound of|shows) an? (\w+)\??$", ex.question.lower()).group(1)


@pytest.mark.parametrize("swapped", [0.0, 0.5])
def test_media_which_clip_is_well_formed(bank, swapped):
    """Exactly one clip has X in the asked modality; hard negatives (X in the other modality) come only with a
    swapped share, at about that rate, and never without one."""
    sampler = ExampleSampler(bank, SkillMixture(swapped=swapped, which=1.0, which_clips=(2, 3)), 5)
    hard = others = 0
    counts = Counter()
    for _ in range(600):
        ex = sampler.draw()
        hear, x = _asked(ex)
        n = len(ex.clips)
        counts[(n, hear)] += 1
        assert ex.kind == f"which{n}-{'hear' if hear else 'see'}" and ex.answer in [str(i + 1) for i in range(n)]
        labels = [(bank.labels[v], bank.labels[a]) for v, a in ex.clips]  # (seen, heard)
        has = [(heard if hear else seen) == x for seen, heard in labels]
        assert has == [str(i + 1) == ex.answer for i in range(n)], (ex.question, labels)
        for i, (seen, heard) in enumerate(labels):
            if str(i + 1) != ex.answer:
                others += 1
                hard += (seen if hear else heard) == x
            else:
                assert seen == heard  # the right clip is congruent
    assert set(counts) == {(2, True), (2, False), (3, True), (3, False)} and min(counts.values()) > 100
    if swapped:
        assert abs(hard / others - swapped) < 0.06
    else:
        assert hard == 0


@pytest.mark.parametrize("audio", [True, False])
def test_media_choice_is_well_formed(bank, audio):
    """The answer letter points at the asked modality's class, options are distinct, the other modality's class is
    among them, and the question asks about a modality the example has."""
    m = SkillMixture(audio=audio, swapped=0.3, unimodal=0.2, choice=1.0, options=(2, 20), letters=LETTERS_V2)
    sampler = ExampleSampler(bank, m, 6)
    conditions = Counter()
    for _ in range(800):
        ex = sampler.draw()
        hear = ex.kind == "choice-hear"
        assert ex.kind in ("choice-hear", "choice-see")
        options = re.findall(r"\b([b-v])\. (\w+)", ex.question)
        n = len(options)
        assert 2 <= n <= 20 and [letter for letter, _ in options] == list(LETTERS_V2[:n])
        words = dict(options)
        assert len(set(words.values())) == n and ex.answer in words
        seen = bank.labels[ex.video] if ex.video is not None else None
        heard = bank.labels[ex.audio] if ex.audio is not None else None
        assert (heard if hear else seen) == words[ex.answer]
        other = seen if hear else heard
        if other is not None and other != words[ex.answer]:
            assert other in words.values()
        conditions[("v" if seen else "") + ("a" if heard else "")] += 1
    if audio:
        assert conditions["va"] > 500 and conditions["v"] > 40 and conditions["a"] > 40
    else:
        assert set(conditions) == {"v"}


def test_media_skill_draws_leave_other_draws_alone(bank):
    """Without media skill shares a SkillMixture draws what Mixture draws (the digest test covers the text side)."""
    plain = _rows(ExampleSampler(bank, Mixture(swapped=0.3, multi=0.2), 3), 60)
    skill = _rows(ExampleSampler(bank, SkillMixture(swapped=0.3, multi=0.2), 3), 60)
    assert plain == skill
    sampler = ExampleSampler(bank, SkillMixture(which=0.2, choice=0.3), 9)
    kinds = Counter(sampler.draw().kind for _ in range(4000))
    which = sum(v for k, v in kinds.items() if k.startswith(("which2", "which3"))) / 4000
    choice = sum(v for k, v in kinds.items() if k.startswith("choice")) / 4000
    assert abs(which - 0.2) < 0.03 and abs(choice - 0.3) < 0.03
    assert kinds["which"] > 0  # the mixture's own two-clip examples are still drawn from the rest


def test_media_which_needs_audio():
    with pytest.raises(ValueError, match="need audio"):
        SkillMixture(audio=False, which=0.1)
    with pytest.raises(ValueError, match="summing"):
        SkillMixture(which=0.6, choice=0.6)


def test_text_replay_draws_text_examples_of_the_text_stage_kinds_in_a_media_stage(bank):
    """A media stage with text_replay draws that share of text examples, of the text skills' shares (which-clip,
    lettered choice, the plain text kinds), the rest media examples of the stage. (At its default of 0 nothing more
    is drawn: test_default_draws_are_unchanged pins SkillMixture's default draws to the code before the field.)"""
    mix = SkillMixture(audio=False, unimodal=0.0, multi=0.0, choice=0.2, text_replay=0.3, text_which=0.5)
    sampler = ExampleSampler(bank, mix, 5)
    drawn = [sampler.draw() for _ in range(4000)]
    text = [e for e in drawn if e.kind.startswith("text-")]
    assert all(e.video is None and e.audio is None and not e.clips for e in text)
    assert abs(len(text) / len(drawn) - 0.3) < 0.03
    which = sum(e.kind.startswith("text-which") for e in text) / len(text)
    assert abs(which - 0.5) < 0.05
    media = [e for e in drawn if not e.kind.startswith("text-")]
    assert all(e.video is not None and e.audio is None for e in media)  # the vision-language stage: video only
    with pytest.raises(ValueError, match="text_replay"):
        SkillMixture(text_replay=1.5)
