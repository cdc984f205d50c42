"""Causal tracing (P2): restored probabilities against forward hooks on the model's own modules, the token sets'
invariants, the dominance rule, and the analysis end to end on the organism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import av_samples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_report import documented_columns
from test_sites import _hook, _reference

import avlens
from avlens.analyses import causal_trace as ct
from avlens.analyses.common import Item, items_from_manifest
from avlens.analyses.dominance import VARIANTS, dominant_of, zeroed
from avlens.media import VideoClip
from avlens.models.base import Sample
from avlens.models.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen2.5-omni", layers=4, hidden=64, heads=4, kv_heads=2, seed=3)


def _traced(adapter, dominant: str, n: int = 2) -> list:
    """Items with their three variants and a dominance set by hand (the engine's part is what is tested)."""
    out = []
    for i, s in enumerate(av_samples(4, n, frames=4, seconds=2.0)[:n]):
        clip = VideoClip(frames=s.video, fps=2.0, duration=len(s.video) / 2.0, source_fps=2.0)
        item = Item(f"c{i}/hear", replace(s, id=f"c{i}/hear"), "factual", "hear", None, None, None)
        variants = {
            v: Sample(s.prompt, video=m[0], audio=m[1], id=f"{item.id}:{v}") for v, m in zeroed(clip, s.audio).items()
        }
        out.append((item, variants))
    inputs = adapter.prepare([vs[v] for _, vs in out for v in VARIANTS], interleave=True)
    tokens = avlens.run(adapter, inputs).logits.argmax(-1).view(n, 3)
    return [
        (it, vs, dominant, {"tokens": dict(zip(VARIANTS, map(int, tokens[i]), strict=True)), "record": {}})
        for i, (it, vs) in enumerate(out)
    ]


def _restore(adapter, traced, config) -> dict[str, pd.DataFrame]:
    out = {"items": [], "effects": [], "errors": []}
    ct._restore(adapter, traced, config, out)
    return {k: pd.DataFrame(v) for k, v in out.items()}


@pytest.mark.parametrize("dominant", ["audio", "video"])
def test_restored_probabilities_equal_hooks_on_the_models_own_forward(tiny, dominant):
    """attn_in in all layers and the residual in each window: the analysis's restored P[correct] and P[corrupt]
    equal the model's own forward on the corrupted input with the clean values written by hooks."""
    adapter = tiny
    config = ct.Config(window=2, draws=2)
    traced = _traced(adapter, dominant)
    got = _restore(adapter, traced, config)
    corrupt_variant = "video_only" if dominant == "audio" else "audio_only"
    clean_in = adapter.prepare([vs["joint"] for _, vs, _, _ in traced], interleave=True)
    corrupt_in = adapter.prepare([vs[corrupt_variant] for _, vs, _, _ in traced], interleave=True)
    own = clean_in.layout.mask("video" if dominant == "audio" else "audio") & clean_in.layout.valid
    n = adapter.n_layers
    seen: dict[tuple[str, int], torch.Tensor] = {}
    keep = [
        (site, i, (lambda k: lambda x: seen.__setitem__(k, x.detach().clone()))((site, i)))
        for site in ("attn_in", "residual")
        for i in range(n)
    ]
    _reference(adapter, clean_in, "sdpa", keep)
    correct = torch.tensor([info["tokens"]["joint"] for *_, info in traced])
    corrupt = torch.tensor([info["tokens"][corrupt_variant] for *_, info in traced])

    def written(site, layers):
        def write(k):
            def fn(x):
                y = x.clone()
                y[own] = seen[k][own].to(y.dtype)
                return y

            return fn

        hooks = [(site, i, write((site, i))) for i in layers]
        logits = _reference(adapter, corrupt_in, "sdpa", hooks)[:, -1]
        p = logits.softmax(-1)
        return p.gather(1, correct[:, None])[:, 0], p.gather(1, corrupt[:, None])[:, 0]

    eff = got["effects"]
    cases = [("attn_in", -1, range(n))] + [("residual", s, range(s, s + 2)) for s in range(n - 1)]
    for site, start, layers in cases:
        pc, pw = written(site, layers)
        rows = eff[(eff.site == site) & (eff.start == start) & (eff.set == "all")].sort_values("id")
        assert len(rows) == len(traced)
        np.testing.assert_allclose(rows.p_correct, pc.numpy(), atol=1e-5)
        np.testing.assert_allclose(rows.p_corrupt, pw.numpy(), atol=1e-5)
    base = adapter.model(**adapter.model_inputs(corrupt_in), use_cache=False).logits[:, -1].softmax(-1)
    items = got["items"].sort_values("id")
    np.testing.assert_allclose(items.p_corrupt_correct, base.gather(1, correct[:, None])[:, 0].detach(), atol=1e-5)
    # IE_clean and IE_corrupt are the restored probabilities against the corrupted run's, x 100
    merged = eff.merge(items[["id", "p_corrupt_correct", "p_corrupt_corrupt"]], on="id")
    np.testing.assert_allclose(merged.ie_clean, 100 * (merged.p_correct - merged.p_corrupt_correct), atol=1e-4)
    np.testing.assert_allclose(merged.ie_corrupt, 100 * (merged.p_corrupt_corrupt - merged.p_corrupt), atol=1e-4)
    # patched tokens that all come before the dominant modality's first token hold nothing of it: IE is 0
    before = set(items[items.precedes].id)
    if dominant == "audio":
        assert before == set(items.id)  # one chunk: its video tokens come before its audio tokens
    assert (merged[merged.id.isin(before)][["ie_clean", "ie_corrupt"]].abs() < 1e-5).all().all()
    assert _hook  # the reference's hooks are test_sites' (one reference for every site test)


def test_every_set_is_within_the_non_dominant_modality_and_the_random_draws_match_the_sink_count(tiny):
    config = ct.Config(definition="received", draws=3, window=1)
    traced = _traced(tiny, "video")  # the audio tokens are patched: they follow the video of their chunk
    got = _restore(tiny, traced, config)
    items, eff = got["items"], got["effects"]
    assert set(items.definition) == {"received"}
    for _, row in items.iterrows():
        sinks = row.n_sinks_n2
        assert 0 < sinks <= row.n_all and row.n_sinks_n4 <= row.n_sinks_n3 <= sinks
        assert row.n_unimodal + row.n_cross_modal == sinks and row.n_most_attended == sinks
        draws = eff[(eff.id == row.id) & (eff.set == "random") & (eff.site == "attn_in")]
        assert sorted(draws.draw) == [0, 1, 2] and (draws.n_tokens == sinks).all()
    # the same seed gives the same records; another seed other random draws
    again = _restore(tiny, traced, config)["effects"]
    pd.testing.assert_frame_equal(eff, again)
    other = _restore(tiny, traced, replace(config, seed=1))["effects"]
    keys = ["id", "site", "start", "set", "draw"]
    r0, r1 = (e[e.set == "random"].sort_values(keys).reset_index(drop=True) for e in (eff, other))
    assert not np.allclose(r0.p_correct, r1.p_correct)


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(4, 40),
    seed=st.integers(0, 10_000),
    modality=st.sampled_from(["video", "audio"]),
)
def test_token_sets_partition_the_sinks_by_modality_dominance(length, seed, modality):
    rng = np.random.default_rng(seed)
    valid = torch.ones(length, dtype=torch.bool)
    valid[: rng.integers(0, 3)] = False  # left padding
    own = torch.from_numpy(rng.random(length) < 0.5) & valid
    hits = torch.from_numpy(rng.integers(0, 4, length).astype(np.float32)) * valid
    received = torch.from_numpy(rng.random(length).astype(np.float32))
    mds = torch.from_numpy(rng.uniform(-1, 1, length).astype(np.float32))
    config = ct.Config(draws=2)
    sets = ct.token_sets(own, valid, hits, received, mds, modality, config, np.random.default_rng(0))
    n_valid = int(valid.sum())
    for n in config.n:
        s = sets[f"sinks_n{n}"]
        assert not (s & ~own).any() and int(s.sum()) <= n_valid // n
        assert (hits[s] > 0).all()
    first, count = sets["sinks_n2"], int(sets["sinks_n2"].sum())
    uni, cross = sets["unimodal"], sets["cross_modal"]
    assert not (uni & cross).any() and torch.equal(uni | cross, first)
    assert int(uni.sum()) == -(-count // 2)
    toward = mds if modality == "video" else -mds
    if uni.any() and cross.any():
        assert toward[uni].min() >= toward[cross].max()
    for d in range(2):
        r = sets[f"random:{d}"]
        assert int(r.sum()) == count and not (r & ~own).any()
    m = sets["most_attended"]
    assert int(m.sum()) == count and not (m & ~own).any()
    if m.any() and (own & ~m).any():
        assert received[m].min() >= received[own & ~m].max()


def test_the_dominance_rule():
    assert dominant_of({"joint": 3, "audio_only": 3, "video_only": 5}) == "audio"
    assert dominant_of({"joint": 5, "audio_only": 3, "video_only": 5}) == "video"
    assert dominant_of({"joint": 5, "audio_only": 5, "video_only": 5}) is None
    assert dominant_of({"joint": 1, "audio_only": 3, "video_only": 5}) is None
    assert dominant_of({"joint": None, "audio_only": None, "video_only": 5}) is None


def test_bad_config_and_media_are_refused_in_one_line():
    with pytest.raises(avlens.InputError, match="unknown patch site 'mlp'"):
        ct.Config(sites=("mlp",))
    with pytest.raises(avlens.InputError, match="unknown sink definition"):
        ct.Config(definition="big")


@pytest.fixture(scope="module")
def organism_items(tmp_path_factory):
    from avlens.reproduce import _organism_data

    manifest = _organism_data(tmp_path_factory.mktemp("ct"), 8, 0, None)
    return items_from_manifest(manifest, {"hear": "What do you hear?"}, conditions=("swapped",))


def test_on_the_vision_heavy_organism_swapped_clips_are_video_dominant(organism_items):
    """The vision-heavy organism answers "what do you hear?" with the picture on swapped clips (MODEL.md): its
    items are video-dominant, its audio tokens are restored, and a clip without sound is refused, not traced."""
    adapter = avlens.load("organism:av-vision-heavy")
    items = list(organism_items)
    silent = Item(
        "mute/hear",
        Sample("What do you hear?", video=np.zeros((4, 224, 224, 3), np.uint8)),
        "factual",
        "hear",
        None,
        None,
        None,
    )
    config = ct.Config(draws=2)
    raw = ct.collect(adapter, [*items, silent], config)
    assert [e["id"] for e in raw["errors"]] == ["mute/hear"] and "sound" in raw["errors"][0]["reason"]
    tables = {k: pd.DataFrame(v) for k, v in raw.items()}
    dom = tables["items"].dominant.value_counts()
    assert dom.get("video", 0) >= 0.75 * len(items) and dom.get("audio", 0) == 0
    video_dominant = tables["items"][tables["items"].dominant == "video"]
    assert (video_dominant.answer_joint == video_dominant.answer_video_only).all()
    # the patched tokens are the audio tokens: the organism's 2 s clip has 50 of them (+ one of a second chunk)
    assert set(video_dominant.n_all) <= {50, 51, 52}
    s = ct.summarize(tables)
    assert s.n_video_dominant == len(video_dominant) and "video" in s.table and "all" in s.table["video"]
    assert s.table["video"]["all"]["n"] == len(video_dominant)
    assert s.ie_clean_all_low <= s.ie_clean_all <= s.ie_clean_all_high
    fig = ct.plot({"vision-heavy": tables})
    assert fig.axes and "video-dominant" in fig.axes[0].get_title()
    findings = ct.findings({"vision-heavy": s})
    assert len(findings) == 3 and all(f.verdict in ("agrees", "partly", "disagrees") for f in findings)
    (table,) = ct.tables({"vision-heavy": s})
    assert ("vision-heavy", "video-dominant", "all") in table.index and "IE_clean" in table.columns
    docs = documented_columns()
    for name in ("items", "effects"):
        missing = set(tables[name].columns) - docs[f"causal_trace.{name}"] - docs["common"] - {"model"}
        assert not missing, f"causal_trace.{name}: columns {sorted(missing)} are not documented"


def test_patching_the_whole_clean_state_restores_the_clean_run(tiny, monkeypatch):
    """Every position's residual patched, at any layer: the restored run is the clean run, so IE_clean is
    P_clean - P_corrupt[correct] (x 100) and P_restored[correct] is P_clean."""
    monkeypatch.setattr(ct, "token_sets", lambda own, valid, *args: {"all": valid.clone()})
    traced = _traced(tiny, "video")
    got = _restore(tiny, traced, ct.Config(window=1, sites=("residual",)))
    items = got["items"].set_index("id")
    eff = got["effects"]
    assert sorted(eff.start.unique()) == list(range(tiny.n_layers))
    for _, whole in eff.groupby("start"):
        whole = whole.set_index("id")
        np.testing.assert_allclose(whole.p_correct, items.p_clean[whole.index], rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            whole.ie_clean, 100 * (items.p_clean - items.p_corrupt_correct)[whole.index], rtol=0, atol=1e-4
        )
    assert (items.p_clean != items.p_corrupt_correct).all()  # the corruption did change something
