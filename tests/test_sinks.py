"""The sinks analysis (P2): massive dimensions found, not hard-coded; sink positions; MDS and its split."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import samples_for

from avlens.analyses import sinks
from avlens.analyses.common import Item
from avlens.models.tiny import tiny_model
from avlens.reproduce import reproduce

PLANTED = 17
CONFIG = sinks.Config()  # the relative threshold: 0.418 x sqrt(256) = 6.7 on RMS-normalised values
HIDDEN = 256


def _model():
    return tiny_model("qwen2.5-omni", layers=3, hidden=HIDDEN, heads=4, kv_heads=2, seed=5)


def _items(adapter, n: int = 4) -> list[Item]:
    samples = samples_for(adapter, seed=3, n=n)
    return [
        Item(f"s{i}/hear", replace(s, id=f"s{i}/hear"), "factual", "hear", None, None, None)
        for i, s in enumerate(samples)
    ]


def _tables(adapter, config=CONFIG) -> dict[str, pd.DataFrame]:
    raw = sinks.collect(adapter, _items(adapter), config)
    tables = {k: pd.DataFrame(v) for k, v in raw.items()}
    return sinks.finalize(tables, config)


@pytest.fixture(scope="module")
def planted():
    """A tiny model whose first token (<|im_start|>) carries a massive value at one dimension of its embedding,
    which the residual stream carries through every layer (what real LLMs' first-token sinks look like)."""
    adapter = _model()
    start = adapter.tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        adapter.embed_tokens.weight[start, PLANTED] = 300.0
    return adapter, start


def test_a_planted_massive_dimension_is_found_and_its_positions_are_the_sinks(planted):
    adapter, start = planted
    t = _tables(adapter)
    assert t["dims"].dim.tolist() == [PLANTED]
    s = sinks.summarize(t)
    assert s.dims_found == 1 and s.dims == [PLANTED] and s.n_items == 4
    assert set(s.by_received) == {"video", "audio", "text"} and sum(s.by_received.values()) == pytest.approx(
        1, abs=2e-3
    )
    inputs = adapter.prepare([it.sample for it in _items(adapter)])
    for b, it in enumerate(_items(adapter)):
        ids = inputs.input_ids[b][inputs.layout.valid[b]]  # positions count from the prompt's first token
        expected = set((ids == start).nonzero().flatten().tolist())
        got = t["sinks"][t["sinks"].id == it.id]
        assert set(got.position) == expected  # every <|im_start|>, nothing else
        assert (got.hits == adapter.n_layers).all() and (got.group == "text").all()
    assert s.share_text == 1.0 and s.largest > sinks.tau_of(CONFIG, HIDDEN) and s.ceiling == pytest.approx(16.0)
    # P2's absolute tau of 25 cannot fire below the ceiling sqrt(256) = 16: nothing found, and said so
    absolute = _tables(adapter, sinks.Config(threshold="absolute", tau=25.0))
    assert absolute["dims"].empty and sinks.summarize(absolute).threshold.startswith("tau = 25")


def test_no_dimension_is_found_where_none_is_planted():
    adapter = _model()
    t = _tables(adapter)
    assert t["dims"].empty and t["sinks"].empty
    s = sinks.summarize(t)
    assert s.dims_found == 0 and s.dims == [] and s.sinks_per_item is None  # measured: none found
    assert 0 < s.largest <= s.ceiling == pytest.approx(16.0)
    fig = sinks.plot({"tiny": t})
    assert "no sink dimensions found" in fig.axes[0].get_title()
    finding = sinks.findings({"tiny": s})[0]
    assert finding.verdict == "disagrees" and "0 dims" in finding.measured


def test_received_attention_of_the_first_token_is_what_later_queries_give_it(planted):
    """``received`` is the head- and layer-mean attention from strictly later queries: at the last valid position
    there are none (0); all rows of the causal softmax sum to one, so the received attention summed over keys,
    weighted by the number of later queries, equals the number of (query, earlier key) pairs' mass."""
    adapter, _ = planted
    t = _tables(adapter)
    pos = t["positions"]
    for _, sel in pos.groupby("id"):
        last = sel[sel.position == sel.position.max()]
        assert float(last.received.iloc[0]) == 0.0
        assert (sel.received >= 0).all() and (sel.received <= 1 + 1e-6).all()


def test_mds_and_the_unimodal_cross_modal_split_on_a_hand_built_table():
    assert sinks.mds(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])).tolist() == pytest.approx(
        [0.5, -0.5, 0.0]
    )
    # one item, 8 positions: 4 video sinks with MDS 0.9, 0.5, -0.2, -0.6 and 2 audio sinks with MDS -0.8, 0.4
    groups = ["video"] * 4 + ["audio"] * 2 + ["text"] * 2
    mds_values = [0.9, 0.5, -0.2, -0.6, -0.8, 0.4, np.nan, np.nan]
    positions = pd.DataFrame(
        {
            "id": "x/hear",
            "position": range(8),
            "group": groups,
            "chunk": None,
            "length": 16,
            "received": np.linspace(0.1, 0.8, 8),
            "mds": mds_values,
        }
    )
    hits = pd.DataFrame({"id": "x/hear", "position": range(6), "layer": 0, "dim": 3, "value": 9.0})
    peaks = pd.DataFrame({"id": ["x/hear"], "layer": [0], "length": [1000], "tau": [5.0], "ceiling": [8.0]})
    t = sinks.finalize({"positions": positions, "hits": hits, "peaks": peaks}, sinks.Config(max_share=0.05))
    kind = dict(zip(t["sinks"].position, t["sinks"].kind, strict=True))
    # video sinks toward video first (MDS descending), audio sinks toward audio first (MDS ascending)
    assert kind == {0: "unimodal", 1: "unimodal", 2: "cross-modal", 3: "cross-modal", 4: "unimodal", 5: "cross-modal"}


def test_sinks_runs_through_reproduce_into_records_summary_and_report(planted, tmp_path):
    """As every analysis: records in results/, a strict-JSON summary, a report section with its figure."""
    from conftest import write_av

    from avlens.models.tiny import preprocessor_config, save, video_preprocessor_config

    adapter, _ = planted
    root = save(adapter, tmp_path / "model", preprocessor_config(), video_preprocessor_config())

    write_av(tmp_path / "clip.mp4", seconds=2.0)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "c0", "video": "clip.mp4"}) + "\n")
    result = reproduce(
        tmp_path / "out",
        models={"tiny": str(root)},
        base=None,
        data=tmp_path / "m.jsonl",
        analyses=["sinks"],
    )
    s = result.summary["sinks"]["tiny"]
    assert s.dims == [PLANTED]
    dims = pd.read_parquet(result.out / "results" / "sinks.dims.parquet")
    assert dims.dim.tolist() == [PLANTED]
    html = result.report.read_text()
    assert "Sink tokens" in html


def test_every_sinks_column_is_documented(planted):
    from test_report import documented_columns

    docs = documented_columns()
    tables = _tables(planted[0])
    for name, df in tables.items():
        if name == "errors":
            continue
        key = f"sinks.{name}"
        assert key in docs, key
        missing = set(df.columns) - docs[key] - docs["common"] - (docs["sinks.positions"] if name == "sinks" else set())
        assert not missing, (key, sorted(missing))
