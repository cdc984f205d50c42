"""Information flow with several clips (P3's parallel paths): the multi-clip groups on a real prompt against
groups found by hand from the token ids, multi-clip edges against hand-written eager masks, planted path
summaries, and the run end to end on the organism with a manifest from the multiclip builder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from test_flow import _eager_logits
from test_report import documented_columns

import avlens
from avlens.analyses import flow
from avlens.analyses.common import Item, LabelTokens
from avlens.data.builders import multiclip
from avlens.models.base import Clip, Sample
from avlens.models.tiny import WORDS, tiny_model
from avlens.organism.data import WHICH_HEAR
from avlens.organism.data import article as organism_article
from avlens.trace import run_conditions

QUESTIONS = {
    # (question, target label, target clip): a label of two words, the target first / last, lettered options
    "plain": ("Which clip has the sound of dog?", "dog", 1),
    "two words": ("Which clip has the sound of church bell?", "church bell", 0),
    "lettered": ("Which clip has the sound of cat? (A) clip 1 (B) clip 2", "cat", 0),
}


@pytest.fixture(scope="module")
def tiny():
    """A random 3-layer model whose vocabulary also has "church" and the marks of lettered options."""
    return tiny_model("qwen2.5-omni", layers=3, hidden=64, seed=1, words=(*WORDS, "church", "(", ")", "b"))


def _items(kind: str, n_clips: int = 2) -> list[Item]:
    question, label, target = QUESTIONS[kind]
    rng = np.random.default_rng(len(kind))
    out = []
    for r in range(2):  # two rows of different lengths, so that the batch is padded
        clips = [
            Clip(
                video=rng.integers(0, 255, (4 - 2 * ((r + k) % 2), 56, 84, 3), dtype=np.uint8),
                audio=(0.1 * rng.standard_normal(16000 * (2 - (r + k) % 2))).astype(np.float32),
            )
            for k in range(n_clips)
        ]
        t = (target + r) % n_clips
        meta = {"target_label": label, "target_clip": t}
        sid = f"{kind}{r}/which"
        out.append(
            Item(sid, Sample(question, clips=clips, id=sid, meta=meta), "multiclip", "which", None, None, str(t + 1))
        )
    return out


def _find(row: list[int], sub: list[int], lo: int = 0) -> list[int]:
    """Start positions of ``sub`` in ``row[lo:]`` (absolute)."""
    return [i for i in range(lo, len(row) - len(sub) + 1) if row[i : i + len(sub)] == sub]


def _by_hand(adapter, inputs, items: list[Item]) -> dict[str, torch.Tensor]:
    """The multi-clip groups found from the token ids alone: the clip label's ids right before each clip, the
    label's ids and the lettered options' ids in the text after the last clip, the media placeholders."""
    ids = inputs.tensors["input_ids"]
    sid = adapter.special_ids
    enc = lambda text: adapter.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    media = (ids == sid.audio) | (ids == sid.video)
    out = {k: torch.zeros_like(media) for k in ("reference", "option", "target")}
    out["candidate"] = media & inputs.layout.valid
    for b, it in enumerate(items):
        row = ids[b].tolist()
        opens = [i for i, t in enumerate(row) if t == sid.vision_start]
        closes = [i for i, t in enumerate(row) if t == sid.vision_end]
        assert len(opens) == len(it.sample.clips)
        for k, start in enumerate(opens):
            label = enc(it.sample.clip_label.format(k=k + 1))
            assert row[start - len(label) : start] == label
            out["option"][b, start - len(label) : start] = True
        t = it.sample.meta["target_clip"]
        out["target"][b, opens[t] : closes[t] + 1] = media[b, opens[t] : closes[t] + 1]
        after = closes[-1] + 1
        (ref,) = _find(row, enc(it.sample.meta["target_label"]), after)
        out["reference"][b, ref : ref + len(enc(it.sample.meta["target_label"]))] = True
        for letter in "ab":
            for s in _find(row, enc(f"({letter})"), after):
                out["option"][b, s : s + len(enc(f"({letter})"))] = True
    out["distractor"] = out["candidate"] & ~out["target"]
    return out


@pytest.mark.parametrize("kind", sorted(QUESTIONS))
def test_multiclip_groups_are_the_label_the_choice_markers_and_a_partition_of_the_clips(tiny, kind):
    items = _items(kind)
    inputs = tiny.prepare([it.sample for it in items], interleave=True)
    layout = flow.multiclip_layout(tiny, flow.with_other(inputs.layout), inputs.tensors["input_ids"], items)
    hand = _by_hand(tiny, inputs, items)
    for name, mask in hand.items():
        assert torch.equal(layout.groups[name], mask), name
    c, t, d = (layout.groups[g] for g in ("candidate", "target", "distractor"))
    assert not (t & d).any() and torch.equal(t | d, c) and t.any(1).all() and d.any(1).all()
    assert layout.groups["reference"].sum(1).tolist() == [len(QUESTIONS[kind][1].split())] * 2
    lettered = 6 if kind == "lettered" else 0  # "(", letter, ")" twice
    assert layout.groups["option"].sum(1).tolist() == [2 * 3 + lettered] * 2  # "clip", k, ":" before each clip
    # the reference and the markers are question text; the other groups are not touched
    assert not (layout.groups["reference"] & ~layout.groups["question"]).any()
    assert not (layout.groups["option"] & ~layout.groups["question"]).any()
    assert torch.equal(layout.groups["other"], flow.with_other(inputs.layout).groups["other"])


def test_three_clips_give_every_clip_its_map_and_their_markers(tiny):
    items = _items("plain", n_clips=3)
    inputs = tiny.prepare([it.sample for it in items], interleave=True)
    layout = flow.multiclip_layout(tiny, flow.with_other(inputs.layout), inputs.tensors["input_ids"], items)
    assert flow.expand_edges(("clip*->last", "option->last"), layout) == [
        "clip0->last",
        "clip1->last",
        "clip2->last",
        "option->last",
    ]
    hand = _by_hand(tiny, inputs, items)
    assert torch.equal(layout.groups["option"], hand["option"]) and torch.equal(layout.groups["target"], hand["target"])


def test_multiclip_edge_knockouts_equal_the_same_masks_written_by_hand_on_the_eager_path(tiny):
    items = _items("plain")
    inputs = tiny.prepare([it.sample for it in items], interleave=True)
    layout = flow.multiclip_layout(tiny, flow.with_other(inputs.layout), inputs.tensors["input_ids"], items)
    inputs = replace(inputs, layout=layout)
    h = _by_hand(tiny, inputs, items)
    last = layout.groups["last"]
    n = tiny.n_layers

    def edge(key: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return query[:, :, None] & key[:, None, :]

    conditions = {
        "target->reference": flow.edge_knockouts("target->reference", layout, range(n)),
        "both paths": [
            ko
            for e in ("candidate->reference", "reference->last", "candidate->option", "option->last")
            for ko in flow.edge_knockouts(e, layout, range(1, n))
        ],
        "distractor->last": flow.edge_knockouts("distractor->last", layout, [0]),
    }
    both = (
        edge(h["candidate"], h["reference"])
        | edge(h["reference"], last)
        | edge(h["candidate"], h["option"])
        | edge(h["option"], last)
    )
    refs = {
        "target->reference": _eager_logits(tiny, inputs, dict.fromkeys(range(n), edge(h["target"], h["reference"]))),
        "both paths": _eager_logits(tiny, inputs, dict.fromkeys(range(1, n), both)),
        "distractor->last": _eager_logits(tiny, inputs, {0: edge(h["distractor"], last)}),
    }
    out = run_conditions(tiny, inputs, conditions)
    plain = _eager_logits(tiny, inputs, {})
    for name, ref in refs.items():
        err = float((out[name].logits - ref).abs().max())
        assert err <= 1e-5, name
        assert (ref - plain).abs().max() > 20 * max(err, 1e-6), name  # the cut does something, beyond rounding
    # the pairs a record reports are the hand mask's causal pairs (a position's edge to itself not counted)
    causal = torch.tril(torch.ones(layout.length, layout.length, dtype=torch.bool), -1)
    for e, mask in (
        ("candidate->option", edge(h["candidate"], h["option"])),
        ("option->last", edge(h["option"], last)),
    ):
        got = flow.blocked_pairs(flow.edge_knockouts(e, layout, [0]), layout)
        assert got.tolist() == (mask & causal).sum((1, 2)).tolist(), e


def test_a_benchmark_item_with_lettered_options_has_its_markers_and_no_target(tiny, media):
    """An AV-Odyssey-style row (:mod:`avlens.data.formats`): its clips, a question listing lettered options, the
    right letter in ``expect_question``; which clip is "the target" is unknown, so no clip is one."""
    row = {
        "id": "odyssey-1",
        "clips": [{"video": str(media["short"])}, {"video": str(media["clip"])}],
        "question": "Which clip has the sound of dog? (A) clip 1 (B) clip 2",
        "expect_question": "B",
    }
    (item,) = flow.items_from_multiclip(pd.DataFrame([row]))
    assert (item.expected, item.problem, item.sample.meta["target_clip"]) == ("B", None, None)
    inputs = tiny.prepare([item.sample], interleave=True)
    layout = flow.multiclip_layout(tiny, flow.with_other(inputs.layout), inputs.tensors["input_ids"], [item])
    assert not any(layout.groups[g].any() for g in ("target", "distractor", "reference"))
    ids = inputs.tensors["input_ids"][0].tolist()
    marks = layout.positions("option", 0).tolist()
    enc = lambda text: tiny.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert [ids[i] for i in marks] == enc("clip 1 :") + enc("clip 2 :") + enc("(a)") + enc("(b)")
    (bad,) = flow.items_from_multiclip(pd.DataFrame([{**row, "expect_question": None}]))
    assert "neither an answer" in bad.problem


def test_target_index_reads_numbers_and_letters():
    assert [flow.target_index(a, 3) for a in ("1", " 3", "B", "(c)", "4", "0", "x", "")] == [
        0,
        2,
        1,
        2,
        None,
        None,
        None,
        None,
    ]


def _planted(dp: dict[str, float]) -> pd.DataFrame:
    rows = []
    for i in range(8):
        for edge in (*flow.PATHS["reference"], *flow.PATHS["option"]):
            for s in range(3):
                rows.append(
                    {
                        "id": f"p{i}/which",
                        "question": "which",
                        "condition": "multiclip",
                        "edge": edge,
                        "window_start": s,
                        "window_end": s + 1,
                        "pairs": 3,
                        "n_clips": 2,
                        "target_clip": i % 2,
                        "correct_base": i < 6,  # two items answered wrongly: counted, left out of dp
                        "dp_expected": (dp[edge] if s == 1 else 0.0) + 0.01 * (i % 3 - 1) + (5.0 if i >= 6 else 0),
                        "dp_answer": 0.0,
                    }
                )
    return pd.DataFrame(rows)


def test_a_path_shows_only_when_both_its_hops_lower_the_answer():
    """Planted: the reference path's hops lower the answer by 40% and 60% in window 1; the option path's first
    hop by 40%, its second by 1% (no effect by the fixed 5% rule)."""
    dp = {"candidate->reference": -0.4, "reference->last": -0.6, "candidate->option": -0.4, "option->last": -0.01}
    s = flow.summarize({"flow": _planted(dp)})
    assert (s.n_multiclip, s.n_multiclip_correct, s.multiclip_accuracy, s.multiclip_chance) == (8, 6, 0.75, 0.5)
    ref = s.paths["reference"]["hops"]["reference->last"]
    assert ref["start"] == 1 and ref["n"] == 6 and ref["low"] <= ref["dp"] == -0.6 <= ref["high"] < 0
    assert s.paths["reference"]["shows"] is True and s.paths["option"]["shows"] is False
    (finding,) = [f for f in flow.findings({"m": s}) if "parallel paths" in f.claim]
    assert finding.verdict == "partly" and "right clip 6 of 8" in finding.measured
    dp["option->last"] = -0.2
    s = flow.summarize({"flow": _planted(dp)})
    assert [f.verdict for f in flow.findings({"m": s}) if "parallel paths" in f.claim] == ["agrees"]
    _, paths = flow.tables({"m": s})
    assert paths["path shows"].tolist() == [True] * 4


@pytest.fixture(scope="module")
def organism_multiclip(tmp_path_factory):
    """Six prompts of two clips each from the multiclip builder, over a small organism world's factual clips
    (each clip playing its video's own track)."""
    from avlens.reproduce import _organism_data

    root = tmp_path_factory.mktemp("flow_multiclip")
    cf = pd.read_json(_organism_data(root, 6, 0, None), lines=True)
    factual = cf[cf.condition == "factual"].drop(columns=["audio"])
    factual["video"] = [str(root / "counterfactual" / v) for v in factual.video]
    return multiclip(factual, root / "multiclip", n_prompts=6, seed=1).manifest


def test_flow_on_several_clips_end_to_end_on_the_organism(organism_multiclip):
    adapter = avlens.load("organism:av-vision-heavy")
    config = flow.Config()
    items = config.items(organism_multiclip)  # a manifest with a clips column: its rows, the questions unused
    assert len(items) == 6 and {(it.condition, it.kind) for it in items} == {("multiclip", "which")}
    tabs = {k: pd.DataFrame(v) for k, v in flow.collect(adapter, items, config).items()}
    df = tabs["flow"]
    clips = [f"clip{k}->{t}" for t in ("question", "last") for k in range(2)]
    expected_edges = [e for e in config.multiclip_edges if "*" not in e] + clips
    assert sorted(df.edge.unique()) == sorted(expected_edges)
    assert len(df) == len(items) * len(expected_edges) * (
        adapter.n_layers - flow.window_of(config, adapter.n_layers) + 1
    )
    # the baseline's answers, from one plain forward: correct = the first token of the target clip's number
    inputs = adapter.prepare([it.sample for it in items])
    logits = run_conditions(adapter, inputs, {"base": []})["base"].logits
    token = LabelTokens(adapter)
    right = {it.id: int(logits[b].argmax()) == token(it.expected) for b, it in enumerate(items)}
    per_item = df.drop_duplicates("id").set_index("id")
    assert per_item.correct_base.to_dict() == right
    s = flow.summarize(tabs)
    assert s.n_multiclip == 6 and s.n_multiclip_correct == sum(right.values()) and s.multiclip_chance == 0.5
    assert set(s.paths) == {"reference", "option"}
    for path in s.paths.values():
        assert path["shows"] in (True, False, None)
        for r in path["hops"].values():
            assert r.get("dp") is None or r["low"] <= r["dp"] <= r["high"]
    assert (
        df[df.edge == "reference->last"].pairs == 1
    ).all()  # one word names the target ("which clip has the sound of X?")
    assert ((df.target_clip == df.expected.astype(int) - 1) & (df.n_clips == 2)).all()
    assert flow.plot({"vision-heavy": tabs}).axes
    (finding,) = [f for f in flow.findings({"m": s}) if "parallel paths" in f.claim]
    assert f"right clip {s.n_multiclip_correct} of 6" in finding.measured
    docs = documented_columns()
    missing = set(df.columns) - docs["flow.flow"] - docs["common"] - {"model"}
    assert not missing, f"flow.flow: columns {sorted(missing)} are not documented"


def test_multiclip_prompts_built_from_a_counterfactual_manifest_join_its_items(tmp_path_factory):
    from avlens.reproduce import _organism_data

    manifest = _organism_data(tmp_path_factory.mktemp("flow_built"), 6, 0, None)
    config = flow.Config(multiclip_prompts=5)
    items = config.items(manifest)
    multi = [it for it in items if it.condition == "multiclip"]
    assert len(multi) == 5 and len(items) - 5 == len(flow.Config().items(manifest))
    again = [it.sample for it in flow.Config(multiclip_prompts=5).items(manifest) if it.condition == "multiclip"]
    assert [s.clips for s in again] == [it.sample.clips for it in multi]  # deterministic for a seed
    for it in multi:  # every clip a factual one playing its video's own track
        assert all(c.audio is None and "__factual" in str(c.video) for c in it.sample.clips)
        # the organism's own training question (one template, lower-cased by its tokenizer), article included
        label = it.sample.meta["target_label"]
        assert it.sample.prompt.lower() == WHICH_HEAR[0].format(a=organism_article(label), x=label)
    # a run (reproduce, avlens run) plans the config's own items: the multi-clip prompts join the units
    from avlens.reproduce import plan_units

    planned = [it for unit in plan_units("flow", config, manifest, ["m"])["m"].values() for it in unit]
    assert sorted(it.id for it in planned) == sorted(it.id for it in items)
