"""The knockout sweep and the token-distribution shift, proved on tiny random models where the answer is known:
knockouts that cannot act change nothing, every condition equals a separate engine run, blocking every path
from audio removes the audio's influence; a model against itself is unshifted with zero KL, and teacher forcing
equals the model's own forward on the prompt plus the generated prefix."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from avlens.analyses import Finding, knockout, token_shift
from avlens.analyses.common import Item, first_token
from avlens.models.base import Sample
from avlens.models.tiny import tiny_model
from avlens.trace import Knockout, run

LAYERS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads contend (100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    # a short audio padding length keeps the feature extraction fast
    return tiny_model("qwen2.5-omni", layers=LAYERS, seed=1, audio_chunk_seconds=2)


@pytest.fixture(scope="module")
def other():
    return tiny_model("qwen2.5-omni", layers=LAYERS, seed=2, audio_chunk_seconds=2)


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)


def wave(seed: int, seconds: float = 1.0) -> np.ndarray:
    return (0.1 * np.random.default_rng(100 + seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def make_items(prompt: str, kind: str, expected: bool = True) -> list[Item]:
    """Four clips, two factual and two swapped, with different audio lengths (so the batch is padded)."""
    labels = [
        ("bell", "bell", "factual"),
        ("drum", "dog", "swapped"),
        ("siren", "siren", "factual"),
        ("frog", "cat", "swapped"),
    ]
    out = []
    for i, (heard, seen, cond) in enumerate(labels):
        s = Sample(prompt, video=frames(i), audio=wave(i, 1.0 + 0.5 * (i % 2)), id=f"{i}/{kind}")
        out.append(Item(s.id, s, cond, kind, heard, seen, heard if expected else None))
    return out


# ---------------------------------------------------------------------------------------------------------
# knockout
# ---------------------------------------------------------------------------------------------------------
def test_windows():
    assert knockout.windows(6, 2) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
    assert knockout.windows(3, 7) == [(0, 3)]  # k capped at the depth
    with pytest.raises(ValueError):
        knockout.windows(3, 0)


@pytest.fixture(scope="module")
def sweep(model):
    items = make_items("What do you hear?", "hear")
    edges = (*knockout.DEFAULT_EDGES, ("generated", "audio"))  # nothing is generated: an empty query group
    config = knockout.Config(window=2, edges=edges)
    tables = knockout.collect(model, items, config)
    return items, config, pd.DataFrame(tables["knockout"]), tables["errors"]


def test_knockout_records_cover_every_edge_and_window(sweep):
    items, config, ko, errors = sweep
    assert errors == []
    starts = [s for s, _ in knockout.windows(LAYERS, config.window)]
    expected = {(knockout.edge_name(q, k), s) for (q, k), s in itertools.product(config.edges, starts)}
    assert set(zip(ko.edge, ko.window_start, strict=True)) == expected
    assert len(ko) == len(items) * len(expected)
    assert (ko.window_end - ko.window_start == config.window).all()
    assert "answer" in set(ko.query_group) and "last+generated" not in set(ko.query_group)


def test_knockout_that_cannot_act_changes_nothing_exactly(sweep):
    _, _, ko, _ = sweep
    # video comes before audio in this prompt, so no video query can see an audio key; nothing is generated
    for edge in ("video->audio", "generated->audio"):
        rows = ko[ko.edge == edge]
        assert (rows.delta_audio == 0).all() and (rows.delta_visual == 0).all()
        assert (rows.dp_audio == 0).all() and (rows.answer == rows.answer_base).all()
    # ...while the answer's own edges do act (so the zeros above are not a sweep that does nothing)
    assert ko[ko.edge == "answer->audio"].delta_audio.abs().max() > 1e-7
    assert ko[ko.edge == "question->audio"].delta_audio.abs().max() > 1e-7


def test_knockout_conditions_equal_separate_engine_runs(model, sweep):
    items, config, ko, _ = sweep
    inputs = model.prepare([it.sample for it in items])
    audio_ids = [first_token(model, it.audio_label) for it in items]
    visual_ids = [first_token(model, it.visual_label) for it in items]
    rows = torch.arange(len(items))
    base = torch.softmax(run(model, inputs).logits, -1)
    got = ko.set_index(["id", "edge", "window_start"])
    for (query, key), (s, e) in itertools.product(config.edges, knockout.windows(LAYERS, config.window)):
        group = "last+generated" if query == "answer" else query
        probs = torch.softmax(run(model, inputs, [Knockout(group, key, range(s, e))]).logits, -1)
        edge = knockout.edge_name(query, key)
        mine = got.loc[[(it.id, edge, s) for it in items]]
        assert np.allclose(mine.p_audio, probs[rows, audio_ids].numpy(), atol=1e-5, rtol=0)
        assert np.allclose(mine.p_visual, probs[rows, visual_ids].numpy(), atol=1e-5, rtol=0)
        assert np.allclose(mine.p_audio_base, base[rows, audio_ids].numpy(), atol=1e-5, rtol=0)
        delta = (probs[rows, audio_ids] - base[rows, audio_ids]).numpy()
        assert np.allclose(mine.delta_audio, delta, atol=1e-5, rtol=0)


def test_blocking_every_path_from_audio_removes_its_influence(model):
    """Planted: two clips that differ only in their sound. With every position blocked from the audio in every
    layer the answer cannot depend on the sound; blocking only the answer's own edge leaves the path through
    the question tokens (modalities -> question -> last), so the sound still matters."""
    tone = (0.8 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    items = []
    for i, sound in enumerate((wave(0), tone)):  # the same length: the same positions
        s = Sample("What do you hear?", video=frames(0), audio=sound, id=f"{i}/hear")
        items.append(Item(s.id, s, "swapped", "hear", "bell", "drum", "bell"))
    config = knockout.Config(window=LAYERS, edges=(("all", "audio"), ("answer", "audio")))
    ko = pd.DataFrame(knockout.collect(model, items, config)["knockout"])
    assert set(ko.window_start) == {0}
    base = ko.drop_duplicates("id").p_audio_base.to_numpy()
    assert abs(base[0] - base[1]) > 1e-6  # the sound does change the answer
    all_blocked = ko[ko.edge == "all->audio"].p_audio.to_numpy()
    assert abs(all_blocked[0] - all_blocked[1]) < 1e-9
    direct_only = ko[ko.edge == "answer->audio"].p_audio.to_numpy()
    assert abs(direct_only[0] - direct_only[1]) > 1e-6


def test_knockout_summary_and_findings_on_known_records():
    """Records where vision wins on swapped clips until answer -> video is blocked from layer 3 on."""
    rows = []
    for i, cond in enumerate(["factual"] * 4 + ["swapped"] * 4):
        for edge, s in itertools.product(("answer->video", "answer->audio"), range(5)):
            restored = cond == "swapped" and edge == "answer->video" and s >= 3
            follows_base = "audio" if cond == "factual" else "visual"
            follows = "audio" if restored else follows_base
            lowered = edge == "answer->audio" and s < 2
            rows.append(
                {
                    "id": str(i),
                    "condition": cond,
                    "edge": edge,
                    "window_start": s,
                    "window_end": s + 2,
                    "delta_audio": 0.4 if restored else -0.3 if lowered else 0.0,
                    "delta_visual": -0.4 if restored else 0.0,
                    "dp_expected": -0.5 if edge == "answer->video" and s == 1 else 0.0,
                    "follows": follows,
                    "follows_base": follows_base,
                    "correct": follows == "audio",
                    "correct_base": follows_base == "audio",
                }
            )
    summary = knockout.summarize({"knockout": pd.DataFrame(rows)})
    assert summary.swapped_follows_audio_base == 0.0
    assert summary.swapped_follows_audio_after_video_knockout == 1.0
    assert summary.swapped_best_video_window_start == 3.0
    assert summary.factual_accuracy_base == summary.factual_accuracy_after_video_knockout == 1.0
    assert summary.factual_delta_audio_audio_knockout_min == pytest.approx(-0.3)
    assert summary.late_video_dp_correct == 0.0 and summary.max_abs_video_dp_correct == 0.5
    verdicts = [f.verdict for f in knockout.findings({"m": summary})]
    assert verdicts == ["agrees", "agrees", "agrees", "agrees"]
    fig = knockout.plot({"m": {"knockout": pd.DataFrame(rows)}})
    assert len(fig.axes) == 4 and len(fig.axes[2].lines) == 3  # zero line + one line per edge


# ---------------------------------------------------------------------------------------------------------
# token shift
# ---------------------------------------------------------------------------------------------------------
DESCRIBE = "Describe what you see and hear."


def shift(adapter, base, sees_audio: bool) -> tuple[pd.DataFrame, list[dict]]:
    config = token_shift.Config(max_new_tokens=6, base_sees_audio=sees_audio, audio_words=("in",))
    tables = token_shift.collect(adapter, make_items(DESCRIBE, "describe", expected=False), config, base=base)
    return pd.DataFrame(tables["tokens"]), tables["errors"]


def test_a_model_against_itself_is_unshifted(model):
    tokens, errors = shift(model, model, sees_audio=True)
    assert len(tokens) >= 8
    assert all("media token" in e["reason"] for e in errors)  # random models may generate placeholders
    assert (tokens["rank"] == 1).all() and (tokens["shift"] == "unshifted").all()
    assert tokens.kl.abs().max() <= 1e-5
    assert np.allclose(tokens.p_av, tokens.p_base, atol=1e-6)
    summary = token_shift.summarize({"tokens": tokens})
    assert summary.unshifted_share == 1.0 and summary.top3_share == 1.0
    assert tokens.audio_word.any() and summary.audio_unshifted_share == 1.0


def test_a_different_model_or_a_deaf_base_shifts(model, other):
    tokens, _ = shift(model, other, sees_audio=True)
    assert (tokens["rank"] > 1).mean() > 0.5
    assert tokens.kl.mean() > 1e-3
    # the same weights without the audio: the sound is gone, so the distributions move
    deaf, _ = shift(model, model, sees_audio=False)
    assert deaf.kl.mean() > 1e-4
    summary = token_shift.summarize({"tokens": tokens})
    assert summary.shifted_share + summary.marginal_share + summary.unshifted_share == pytest.approx(1, abs=2e-3)
    findings = token_shift.findings({"a": summary, "b": token_shift.summarize({"tokens": deaf})})
    assert all(isinstance(f, Finding) for f in findings)
    fig = token_shift.plot({"a": {"tokens": tokens}, "b": {"tokens": deaf}})
    assert len(fig.axes) == 3  # shift shares, KL by position, mean KL over content tokens


def test_base_sample_drops_every_audio(model):
    s = Sample(DESCRIBE, video=frames(0), audio=wave(0), id="x")
    deaf = token_shift.base_sample(s, sees_audio=False)
    assert s.audio is not None  # the item's own sample is left alone
    layout = model.prepare([deaf]).layout
    assert layout.counts(0)["audio"] == 0 and layout.counts(0)["video"] > 0


@pytest.mark.parametrize("interleave", [False, True])
def test_teacher_forcing_equals_the_models_own_forward(other, interleave):
    """Rows of different prompt and answer lengths (re-padded); each position against an unpadded forward of the
    transformers model itself on the prompt plus the generated prefix. Interleaved: audio-in-video chunks and
    TMRoPE positions, as for a video with its own track."""
    samples = [Sample(DESCRIBE, video=frames(i), audio=wave(i, 1.0 + i), id=str(i)) for i in range(2)]
    inputs = other.prepare(samples, interleave=interleave)
    assert ("chunk0" in inputs.layout.groups) == interleave
    ids = [other.tokenizer.convert_tokens_to_ids(w) for w in ("the", "bell", "and", "drum")]
    tokens = torch.tensor([ids, [ids[1], ids[3], -1, -1]])
    forced = token_shift.teacher_forced(other, inputs, tokens)
    assert forced.shape == (2, 4, other.vocab_size)
    assert torch.isnan(forced[1, 2:]).all()
    ext = token_shift.extend(other, inputs, tokens)
    assert [int(ext.layout.groups["generated"][r].sum()) for r in range(2)] == [4, 2]
    for r, n in ((0, 4), (1, 2)):
        single = other.prepare([samples[r]], interleave=interleave).tensors
        for t in range(n):
            prefix = tokens[r, :t][None]
            kwargs = dict(single)
            kwargs["input_ids"] = torch.cat([single["input_ids"], prefix], 1)
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
            with torch.no_grad():
                ref = other.model(**kwargs, use_cache=False).logits[0, -1].float()
            assert torch.allclose(forced[r, t], ref, atol=1e-4), (r, t)


def test_token_words_and_media_cut(model):
    tok = model.tokenizer
    ids = tok.encode("the bell ? drum", add_special_tokens=False)
    assert token_shift.token_words(tok, ids) == ["the", "bell", "", "drum"]
    media = model.special_ids.media_ids()
    audio = model.special_ids.audio
    a, b = ids[0], ids[1]
    cut, why = token_shift.cut_at_media(torch.tensor([[a, audio, b], [a, b, -1]]), media)
    assert cut.tolist() == [[a, -1, -1], [a, b, -1]] and list(why) == [0] and why[0][0] == 1
    assert [token_shift.shift_class(r) for r in (1, 2, 3, 4)] == ["unshifted", "marginal", "marginal", "shifted"]
