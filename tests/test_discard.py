"""The ``discard`` analysis (P3): the layer-choosing rule on planted maps, FastV's set against transformers' own
attention weights, the records against single runs of the engine, and the whole analysis on the organism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import av_samples
from test_report import documented_columns

import avlens
from avlens.analyses import discard as dc
from avlens.analyses.common import first_token, items_from_manifest
from avlens.errors import InputError
from avlens.trace import Discard, run


def _planted(dp_dev: dict[int, float], correct_test: dict[int, list[bool]], n_items: int = 40) -> pd.DataFrame:
    """discard rows of one target over layers 0..3: on dev, every item's dp at layer l is dp_dev[l] plus noise
    of +-0.002; on test, item k is right at layer l when correct_test[l][k] (right without discarding)."""
    rows = []
    rng = np.random.default_rng(0)
    for split in ("dev", "test"):
        for k in range(n_items):
            for layer in range(4):
                dp = dp_dev[layer] + rng.uniform(-0.002, 0.002) if split == "dev" else 0.0
                right = True if split == "dev" else correct_test[layer][k % len(correct_test[layer])]
                rows.append(
                    {
                        "id": f"{split}{k}/hear",
                        "split": split,
                        "target": "video+audio",
                        "draw": 0,
                        "from_layer": layer,
                        "dropped": 10,
                        "max_dp": 0.05,
                        "dp_expected": dp,
                        "correct": right,
                        "correct_base": True,
                        "answer": "bell" if right else "dog",
                        "answer_base": "bell",
                    }
                )
    return pd.DataFrame(rows)


def test_the_layer_is_the_first_from_which_every_later_dp_is_within_the_bound():
    # dp -0.5, -0.2, -0.01, -0.03: layers 2 and 3 are within 0.05, layer 1 is not
    df = _planted({0: -0.5, 1: -0.2, 2: -0.01, 3: -0.03}, {k: [True] for k in range(4)})
    s = dc.summarize({"discard": df})
    assert s.targets["video+audio"]["from_layer"] == 2 and s.n_layers == 4
    # a late layer that moves the answer again breaks the run: only layer 3 qualifies... and then none
    df = _planted({0: -0.5, 1: -0.01, 2: -0.2, 3: -0.01}, {k: [True] for k in range(4)})
    assert dc.summarize({"discard": df}).targets["video+audio"]["from_layer"] == 3
    df = _planted({0: -0.5, 1: -0.3, 2: -0.2, 3: -0.1}, {k: [True] for k in range(4)})
    s = dc.summarize({"discard": df})
    assert s.targets["video+audio"]["from_layer"] == 4 and s.prefill_speedup is None
    assert {f.claim: f.verdict for f in dc.findings({"m": s})}[dc.SPEC.claim] == "disagrees"


def test_the_accuracy_is_reported_on_the_test_clips_not_those_the_layer_was_chosen_on():
    # dev items are all right everywhere; at the chosen layer 2, 1 test item in 4 turns wrong
    df = _planted({0: -0.5, 1: -0.2, 2: 0.0, 3: 0.0}, {0: [False], 1: [False], 2: [True, True, True, False], 3: [True]})
    r = dc.summarize({"discard": df}).targets["video+audio"]
    assert r["from_layer"] == 2 and r["n"] == 40
    assert r["accuracy_base"] == 1.0 and r["accuracy"] == 0.75 and r["accuracy_change"] == -0.25
    assert r["acc_low"] <= -0.25 <= r["acc_high"] < 0 and r["answers_changed"] == 0.25


def test_bad_settings_are_refused_in_one_line():
    for bad in (
        {"targets": ()},
        {"targets": ("video+",)},
        {"max_dp": 0.0},
        {"fastv_ratio": 1.0},
        {"fastv_layer": 0},
        {"latency_targets": ("audio+question",)},
        {"latency_tokens": 1},
    ):
        with pytest.raises(InputError) as e:
            dc.Config(**bad)
        assert "\n" not in str(e.value)


def test_fastv_drops_the_half_the_last_position_attends_to_least_in_transformers_own_weights(omni):
    inputs = omni.prepare(av_samples(3, 2, frames=8, seconds=4.0), interleave=True)
    layer = 1
    got = dc.fastv_tokens(omni, inputs, layer, 0.5)
    before = omni.text_attention
    omni.set_text_attention("eager")
    try:
        with torch.no_grad():
            att = omni.model(**omni.model_inputs(inputs), output_attentions=True).attentions[layer]
    finally:
        omni.set_text_attention(before)
    last = inputs.layout.mask("last")
    video = inputs.layout.mask("video") & inputs.layout.valid
    for b in range(inputs.batch_size):
        q = int(last[b].nonzero())
        score = att[b, :, q].float().mean(0)  # (L,): mean over heads of the last query's weights
        pos = video[b].nonzero().flatten()
        k = len(pos) // 2
        want = set(pos[torch.argsort(score[pos], stable=True)[:k]].tolist())
        assert set(got[b].nonzero().flatten().tolist()) == want
        # and FastV's half is attended less than the half it keeps
        kept = sorted(set(pos.tolist()) - want)
        assert score[sorted(want)].max() <= score[kept].min() + 1e-6


def test_random_tokens_draw_the_count_from_the_video_and_depend_on_the_draw(omni):
    inputs = omni.prepare(av_samples(3, 2, frames=8, seconds=4.0), interleave=True)
    items = [type("I", (), {"id": f"x{b}"})() for b in range(inputs.batch_size)]
    counts = torch.tensor([5, 7])
    a = dc.random_tokens(inputs.layout, counts, items, 0, 0)
    b = dc.random_tokens(inputs.layout, counts, items, 0, 1)
    video = inputs.layout.mask("video")
    assert a.sum(1).tolist() == [5, 7] and not (a & ~video).any()
    assert torch.equal(a, dc.random_tokens(inputs.layout, counts, items, 0, 0)) and not torch.equal(a, b)


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    from avlens.reproduce import _organism_data

    manifest = _organism_data(tmp_path_factory.mktemp("discard"), 4, 0, None)
    adapter = avlens.load("organism:av-vision-heavy")
    items = items_from_manifest(manifest, {"hear": "What do you hear?"}, conditions=("factual", "swapped"))
    config = dc.Config(batch_size=8, random_draws=2, latency_tokens=3)
    tables = {k: pd.DataFrame(v) for k, v in dc.collect(adapter, items, config).items()}
    return adapter, items, config, tables


def test_every_record_is_what_a_single_run_with_that_discard_gives(organism_run):
    adapter, items, config, tables = organism_run
    df = tables["discard"]
    n = adapter.n_layers
    per_item = len(config.targets) * n + 1 + config.random_draws
    assert len(df) == len(items) * per_item and tables["errors"].empty
    inputs = adapter.prepare([it.sample for it in items], interleave=True)
    base = torch.softmax(run(adapter, inputs).logits, -1)
    sizes = {t: (inputs.layout.mask(t) & inputs.layout.valid).sum(1) for t in config.targets}
    for target, start in [("video", 1), ("video+audio", 3), ("audio", 0), ("video+audio+question", 2)]:
        p = torch.softmax(run(adapter, inputs, [Discard(target, start)]).logits, -1)
        got = df[(df.target == target) & (df.from_layer == start)].set_index("id")
        for b, it in enumerate(items):
            token = first_token(adapter, it.expected)
            want = (float(p[b, token]) - float(base[b, token])) / float(base[b, token])
            assert abs(got.loc[it.id, "dp_expected"] - want) < 1e-4
            assert got.loc[it.id, "dropped"] == int(sizes[target][b])
    fast = df[df.target == "fastv"]
    video = (inputs.layout.mask("video") & inputs.layout.valid).sum(1)
    assert (fast.from_layer == config.fastv_layer).all()
    assert sorted(fast.dropped.tolist()) == sorted((video // 2).tolist())
    rnd = df[df.target == "random"]
    assert set(rnd.draw) == set(range(config.random_draws))
    assert (rnd.groupby("id").dropped.first().sort_index() == fast.set_index("id").dropped.sort_index()).all()


def test_latency_is_timed_for_no_discarding_and_every_timed_target_and_layer(organism_run):
    adapter, items, config, tables = organism_run
    lat = tables["latency"]
    n = adapter.n_layers
    batches = lat.batch.nunique()
    assert len(lat) == batches * (1 + n * len(config.latency_targets) + 2)
    assert (lat.prefill_s > 0).all() and (lat.decode_s_per_token > 0).all()
    none = lat[lat.target == "none"]
    assert (none.from_layer == n).all() and (none.dropped == 0).all()
    s = dc.summarize(tables)
    r = s.targets["video+audio"]
    if r["from_layer"] < n:
        assert r["prefill_speedup"] > 0 and r["decode_speedup"] > 0 and s.prefill_speedup == r["prefill_speedup"]
    assert s.n_dev + s.n_test == len(items)
    assert dc.plot({"vision-heavy": tables}).axes and len(dc.findings({"m": s})) == 2
    (table,) = dc.tables({"vision-heavy": s})
    assert ("vision-heavy", "fastv") in table.index
    docs = documented_columns()
    for name in ("discard", "latency"):
        missing = set(tables[name].columns) - docs[f"discard.{name}"] - docs["common"] - {"model"}
        assert not missing, f"discard.{name}: columns {sorted(missing)} are not documented"
