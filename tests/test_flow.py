"""Information flow and routes (P3): edges against hand-written eager masks, empty edges are no-ops bit for bit,
a cut of every path from the picture makes the answer blind to it, determinism, and both analyses end to end on
the organism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import av_samples
from test_report import documented_columns

import avlens
from avlens.analyses import flow, route
from avlens.analyses.common import Item, items_from_manifest
from avlens.models.base import Sample
from avlens.trace import run_conditions


@pytest.fixture(scope="module")
def interleaved(omni):
    """Two interleaved clips of two chunks each, the flow's ``other`` group added."""
    inputs = omni.prepare(av_samples(5, 2, frames=8, seconds=4.0), interleave=True)
    return replace(inputs, layout=flow.with_other(inputs.layout))


def test_edges_are_parsed_and_bad_ones_refused_in_one_line():
    assert flow.parse_edge("video->last") == ("video", "last", None)
    assert flow.parse_edge("audio->video@earlier") == ("audio", "video", "earlier")
    for bad in ("video", "video->", "->last", "video->audio@later"):
        with pytest.raises(avlens.InputError, match="source->target"):
            flow.Config(edges=(bad,))
    with pytest.raises(avlens.InputError, match="no edges"):
        route.Config(routes={"empty": ()})


def _pairs_by_hand(q: torch.Tensor, k: torch.Tensor) -> int:
    """Causal (query, key) pairs of two (L,) masks, a position's pair with itself excluded."""
    return sum(int(k[:i].sum()) for i in q.nonzero().flatten().tolist())


def test_blocked_pairs_count_every_causal_token_pair(interleaved):
    layout = interleaved.layout
    chunks = flow.chunks_of(layout)
    assert len(chunks) >= 2
    for b in range(layout.valid.shape[0]):
        v, a = layout.groups["video"][b] & layout.valid[b], layout.groups["audio"][b] & layout.valid[b]
        c = [layout.groups[name][b] for name in chunks]
        expected = {
            "video->audio": _pairs_by_hand(a, v),
            "video->audio@same": sum(_pairs_by_hand(a & cj, v & cj) for cj in c),
            "video->audio@earlier": sum(
                _pairs_by_hand(a & c[j], v & torch.stack(c[:j]).any(0)) for j in range(1, len(c))
            ),
            "audio->video@same": 0,  # a chunk's video comes before its audio
        }
        for edge, n in expected.items():
            got = flow.blocked_pairs(flow.edge_knockouts(edge, layout, [0]), layout)[b]
            assert int(got) == n, edge
        assert expected["video->audio@same"] + expected["video->audio@earlier"] == expected["video->audio"]
        assert expected["video->audio@earlier"] > 0


def test_an_edge_with_no_token_pair_is_a_no_op_bit_for_bit(omni, interleaved):
    layout = interleaved.layout
    empty = ["audio->video@same", "image->last"]
    conditions = {"base": [], **{e: flow.edge_knockouts(e, layout, range(omni.n_layers)) for e in empty}}
    out = run_conditions(omni, interleaved, conditions)
    for edge in empty:
        assert int(flow.blocked_pairs(conditions[edge], layout).sum()) == 0
        assert torch.equal(out[edge].logits, out["base"].logits), edge


def _eager_logits(adapter, inputs, blocked: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits (B, V) at the last position of one eager forward of the model's own modules, with an additive mask
    per layer written by a pre-hook: causal, padding, minus ``blocked`` (B, L, L) edges, each position keeping
    its edge to itself."""
    layout = inputs.layout
    n = layout.length
    pos = torch.arange(n)
    causal = (pos[None, :] <= pos[:, None])[None] & layout.valid[:, None, :]
    masks = {}
    for i in range(adapter.n_layers):
        allowed = causal & ~blocked.get(i, torch.zeros_like(causal)) | torch.eye(n, dtype=torch.bool)[None]
        masks[i] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, kw, i=i: (args, {**kw, "attention_mask": masks[i]}), with_kwargs=True
        )
        for i, layer in enumerate(adapter.layers)
    ]
    before = adapter.text_attention
    adapter.set_text_attention("eager")
    try:
        with torch.no_grad():
            return adapter.model(**adapter.model_inputs(inputs), use_cache=False).logits[:, -1].float()
    finally:
        adapter.set_text_attention(before)
        for h in hooks:
            h.remove()


def test_a_multi_edge_cut_equals_the_same_mask_written_by_hand_on_the_eager_path(omni, interleaved):
    layout, n = interleaved.layout, omni.n_layers
    g = {name: layout.groups[name] for name in ("video", "audio", "question", "last", "other")}
    chunks = [layout.groups[c] for c in flow.chunks_of(layout)]
    # every path from video, from layer 1 on: any non-video query to any video key
    readers = g["last"] | g["question"] | g["audio"] | g["other"]
    cut = readers[:, :, None] & g["video"][:, None, :]
    # the interleaved cross-modal edges, same chunk and earlier chunks, in layer 0
    same = sum((g["audio"] & c)[:, :, None] & (g["video"] & c)[:, None, :] for c in chunks).bool()
    conditions = {
        "every path": route.route_knockouts(route.ROUTES[route.ALL_FROM_VIDEO], layout, 1, n),
        "same chunk": flow.edge_knockouts("video->audio@same", layout, [0]),
    }
    out = run_conditions(omni, interleaved, conditions)
    refs = {
        "every path": _eager_logits(omni, interleaved, {i: cut for i in range(1, n)}),
        "same chunk": _eager_logits(omni, interleaved, {0: same}),
    }
    plain = _eager_logits(omni, interleaved, {})
    for name, ref in refs.items():
        assert (out[name].logits - ref).abs().max() <= 1e-4, name
        assert (ref - plain).abs().max() > 1e-3, name  # the cut does something


def test_cutting_every_path_from_the_picture_from_layer_0_makes_the_answer_blind_to_it(omni):
    """With every edge out of the video cut in every layer, two clips that differ only in their frames get the
    same answer logits."""
    s = av_samples(6, 1, frames=8, seconds=4.0)[0]
    other = replace(s, video=np.random.default_rng(9).integers(0, 255, s.video.shape, dtype=np.uint8))
    inputs = omni.prepare([s, other], interleave=True)
    inputs = replace(inputs, layout=flow.with_other(inputs.layout))
    edges = route.ROUTES[route.ALL_FROM_VIDEO]
    out = run_conditions(
        omni, inputs, {"base": [], "cut": route.route_knockouts(edges, inputs.layout, 0, omni.n_layers)}
    )
    assert torch.allclose(out["cut"].logits[0], out["cut"].logits[1], atol=1e-5)
    assert not torch.allclose(out["base"].logits[0], out["base"].logits[1], atol=1e-3)


def _tiny_items(n: int = 4) -> list[Item]:
    out = []
    for i, s in enumerate(av_samples(7, n, frames=4, seconds=2.0)):
        for kind, prompt in {"hear": "What do you hear?", "see": "What do you see?"}.items():
            sid = f"c{i}/{kind}"
            out.append(Item(sid, replace(s, prompt=prompt, id=sid), "factual", kind, "dog", "dog", None))
    return out


def test_flow_and_route_are_deterministic(omni):
    items = _tiny_items()
    config = flow.Config(window=2)
    a, b = (pd.DataFrame(flow.collect(omni, items, config)["flow"]) for _ in range(2))
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == len(items) * len(config.edges) * (omni.n_layers - 2 + 1)
    r1, r2 = (pd.DataFrame(route.collect(omni, items, route.Config())["route"]) for _ in range(2))
    pd.testing.assert_frame_equal(r1, r2)


def test_summaries_find_the_planted_window():
    """A planted table: question->last lowers the right answer by 0.8 in window 2 only."""
    rows = []
    for i in range(6):
        for s in range(4):
            for edge in ("question->last", "video->last"):
                dp = -0.8 if (edge == "question->last" and s == 2) else -0.01 * i
                rows.append(
                    {
                        "id": f"c{i}/hear",
                        "question": "hear",
                        "condition": "factual",
                        "edge": edge,
                        "window_start": s,
                        "window_end": s + 1,
                        "pairs": 5,
                        "correct_base": i < 5,  # one item answered wrongly: left out of dp
                        "dp_expected": dp + (10.0 if i == 5 else 0.0),
                        "dp_answer": dp,
                    }
                )
    s = flow.summarize({"flow": pd.DataFrame(rows)})
    assert s.question_last_dp == -0.8 and s.question_last_start == 2
    r = s.edges["hear"]["factual"]["question->last"]
    assert r["n"] == 5 and r["low"] <= r["dp"] <= r["high"]
    assert s.answer_edges["hear"]["factual"]["video->last"]["start"] == 0  # ties: the first window
    assert s.window == 1 and s.n_layers == 4 and s.n_items == 6


@pytest.fixture(scope="module")
def organism_manifest(tmp_path_factory):
    from avlens.reproduce import _organism_data

    return _organism_data(tmp_path_factory.mktemp("flow"), 6, 0, None)


def test_flow_and_route_on_the_vision_heavy_organism(organism_manifest):
    adapter = avlens.load("organism:av-vision-heavy")
    items = items_from_manifest(organism_manifest, flow.Config().questions, conditions=("factual", "swapped"))
    silent = Item("mute/hear", Sample("What do you hear?"), "factual", "hear", None, None, None, "no media")
    tabs = {k: pd.DataFrame(v) for k, v in flow.collect(adapter, [*items, silent], flow.Config()).items()}
    assert list(tabs["errors"].id) == ["mute/hear"]
    s = flow.summarize(tabs)
    assert s.window == max(1, adapter.n_layers // 4) and s.n_items == len(items)
    assert set(s.edges) == {"hear", "see"} and "question->last" in s.edges["hear"]["factual"]
    assert flow.plot({"vision-heavy": tabs}).axes
    assert all(f.verdict in ("agrees", "partly", "disagrees", "not measured") for f in flow.findings({"m": s}))
    (table,) = flow.tables({"vision-heavy": s})
    assert "dp" in table.columns
    hear = items_from_manifest(organism_manifest, route.Config().questions, conditions=("factual", "swapped"))
    rtabs = {k: pd.DataFrame(v) for k, v in route.collect(adapter, hear, route.Config()).items()}
    r = route.summarize(rtabs)
    # the vision-heavy organism answers swapped clips with the picture; with no path from it, it cannot
    assert r.swapped_follows_audio_base <= 0.25
    blind = rtabs["route"][(rtabs["route"].route == route.ALL_FROM_VIDEO) & (rtabs["route"].from_layer == 0)]
    assert not (blind[blind.condition == "swapped"].follows == "visual").any()
    assert route.plot({"vision-heavy": rtabs}).axes and route.findings({"m": r})
    docs = documented_columns()
    for name, t in (("flow.flow", tabs["flow"]), ("route.route", rtabs["route"])):
        missing = set(t.columns) - docs[name] - docs["common"] - {"model"}
        assert not missing, f"{name}: columns {sorted(missing)} are not documented"


def test_a_negligible_drop_is_not_called_an_effect():
    """Cross-modal mixing: a knockout that lowers the answer by 0.2% (however sure) is no effect; one that lowers
    it by 30% in an early window is."""

    def summary(dp: float) -> flow.Summary:
        r = {"dp": dp, "low": dp - 0.001, "high": dp + 0.0005, "start": 0, "n": 40}
        return flow.Summary(edges={"hear": {"factual": {"video->audio": r, "audio->video": r}}}, n_layers=6)

    mixing = {f.claim: f for f in flow.findings({"m": summary(-0.002)})}
    assert mixing["Cross-modal mixing happens in early-to-middle layers"].verdict == "disagrees"
    mixing = {f.claim: f for f in flow.findings({"m": summary(-0.3)})}
    assert mixing["Cross-modal mixing happens in early-to-middle layers"].verdict == "agrees"
