"""The engine through the adapter's decoder contract: sliding windows honoured, unhonoured configs refused, the
user's model left as it was, groups and positions alike, typed captures, interventions as open classes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import FAMILIES, samples_for

from avlens import Ablate, Capture, Discard, Knockout, Patch, Steer, run, run_conditions
from avlens.errors import UnsupportedModelError
from avlens.models.tiny import tiny_model
from avlens.trace.interventions import Intervention, first_acting
from avlens.trace.ops import WriteState, positions_mask
from avlens.trace.reference import knockout_logits

ATOL = 1e-5
SLIDING = dict(
    layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window=12, use_sliding_window=True
)


@pytest.fixture(scope="module")
def sliding():
    """family -> (a 3-layer model whose layers 1-2 attend through a window of 12, the same weights with full
    attention everywhere)."""
    return {
        f: (tiny_model(f, layers=3, hidden=64, seed=1, text_config=SLIDING), tiny_model(f, layers=3, hidden=64, seed=1))
        for f in ("qwen2.5-omni", "qwen2.5-vl")
    }


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen2.5-vl"])
def test_sliding_window_layers_equal_the_models_own_forward(sliding, family):
    adapter, full = sliding[family]
    assert [adapter.attention_window(i) for i in range(3)] == [None, 12, 12]
    inputs = adapter.prepare(samples_for(adapter, 0, 2))
    assert inputs.length > 2 * 12
    valid = inputs.layout.valid
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(inputs)).logits.float()
        ref_full = full.model(**full.model_inputs(inputs)).logits.float()
    assert (ref[valid] - ref_full[valid]).abs().max() > 1e-2  # the window changes the answer
    out = run(adapter, inputs, logits="all")
    assert (out.logits[valid] - ref[valid]).abs().max() <= ATOL
    # Every strategy applies the window: folded slots (last-position knockouts), shared prefix (a discard), the
    # papers' explicit mask on the eager path as the reference for knockouts.
    conds = {
        "base": [],
        "last->video 1": [Knockout("last", "video", layers=[1])],
        "last->video 2": [Knockout("last", "video", layers=[2])],
        "question->video": [Knockout("question", "video", layers=[1, 2])],
        "discard": [Discard("video", 1)],
    }
    fast = run_conditions(adapter, inputs, conds)
    slow = run_conditions(adapter, inputs, conds, incremental=False)
    for name in conds:
        assert (fast[name].logits - slow[name].logits).abs().max() <= ATOL, name
    assert (fast["base"].logits - ref[:, -1]).abs().max() <= ATOL
    eager = run(adapter, inputs, [Knockout("last", "video", layers=[2])], attn="eager")
    assert (eager.logits - fast["last->video 2"].logits).abs().max() <= ATOL


def test_knockout_reference_differs_where_the_window_cuts(sliding):
    """The papers' explicit-mask reference knows no window: on a sliding model, it is the full-attention model's
    answer, which avlens does not give (avlens follows the model)."""
    adapter, full = sliding["qwen2.5-omni"]
    inputs = adapter.prepare(samples_for(adapter, 0, 2))
    ko = [Knockout("last", "video", layers=[1])]
    ours = run(adapter, inputs, ko).logits
    assert (ours - run(full, inputs, ko).logits).abs().max() > 1e-3
    assert (run(full, inputs, ko).logits - knockout_logits(full, inputs, ko)[:, -1]).abs().max() <= ATOL


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(layer_types=["full_attention", "chunked_attention"]), "layer_types has \\['chunked_attention'\\]"),
        (dict(attn_logit_softcapping=30.0), "attn_logit_softcapping=30.0"),
        (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=None), "no integer sliding_window"),
    ],
)
def test_a_config_the_engine_does_not_honour_is_refused_at_load(setting, message):
    with pytest.raises(UnsupportedModelError, match=message):
        tiny_model("qwen2.5-omni", layers=2, hidden=64, text_config=setting)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_users_model_is_not_changed_in_place(models, family):
    """avlens switches the text attention to its own only inside a run: the user's eager model still returns
    its attention weights afterwards, the same as before."""
    adapter = models[family]
    inputs = adapter.prepare(samples_for(adapter, 0, 1))
    before = adapter.text_attention
    adapter.set_text_attention("eager")
    try:
        with torch.no_grad():
            att = adapter.model(**adapter.model_inputs(inputs), output_attentions=True).attentions
        run(adapter, inputs, [Knockout("last", "video", layers=[1])], capture=[Capture.attention("last", ["video"])])
        assert adapter.text_attention == "eager"
        with torch.no_grad():
            again = adapter.model(**adapter.model_inputs(inputs), output_attentions=True).attentions
        assert len(again) == adapter.n_layers
        assert all(torch.equal(a, b) for a, b in zip(att, again, strict=True))
    finally:
        adapter.set_text_attention(before)


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_and_explicit_positions_are_alike(models, family):
    adapter = models[family]
    inputs = adapter.prepare(samples_for(adapter, 1, 1))
    lay = inputs.layout
    video = tuple(lay.positions("video", 0).tolist())
    question = tuple(lay.positions("question", 0).tolist())
    last = (inputs.length - 1,)
    n = adapter.n_layers
    source = run(adapter, adapter.prepare(samples_for(adapter, 6, 1)), capture=[Capture.residual(layers=[1])])
    pairs = [
        (Knockout("last+question", "video", layers=[1, 2]), Knockout(last + question, video, layers=[1, 2])),
        (Steer("video", layers=[1], alpha=0.7, query="last"), Steer(video, layers=[1], alpha=0.7, query=last)),
        (Discard("video", 1), Discard(video, 1)),
        (
            Patch("question", [1], source.captures["residual"]),
            Patch(question, [1], source.captures["residual"]),
        ),
        (Ablate("video", [n - 1], site="attn_out"), Ablate(video, [n - 1], site="attn_out")),
    ]
    base = run(adapter, inputs, logits="all").logits
    for by_group, by_position in pairs:
        a = run(adapter, inputs, [by_group], logits="all").logits
        b = run(adapter, inputs, [by_position], logits="all").logits
        assert torch.equal(a.isnan(), b.isnan()), by_group
        assert (a.nan_to_num() - b.nan_to_num()).abs().max() <= ATOL, by_group
        assert (a.nan_to_num() - base).abs().max() > 1e-4, by_group  # it did something
    with pytest.raises(ValueError, match="outside the sequence"):
        run(adapter, inputs, [Knockout((inputs.length + 3,), "video", layers=[0])])


def test_residual_capture_has_one_result_type(omni):
    inputs = omni.prepare(samples_for(omni, 0, 2))
    full = run(omni, inputs, capture=[Capture.residual(layers=[1])]).captures["residual"][1]
    at = run(omni, inputs, capture=[Capture.residual(layers=[1], at="video")]).captures["residual"][1]
    video = inputs.layout.mask("video")
    assert at.shape == full.shape
    assert torch.equal(at[video], full[video])
    assert at[~video].isnan().all()


@dataclass(frozen=True)
class _ScaleAttentionOutput(Intervention):
    """A new intervention, defined here: scale a group's attention output in some layers (lowered into writes
    of values computed from another run of the same batch)."""

    at: str
    layers: tuple[int, ...]
    source: dict

    def start(self, layout, n_layers):
        return first_acting(self.layers, positions_mask(self.at, layout))

    def lower(self, low):
        where = low.positions(self.at)
        return [WriteState(i, "attn_out", where, 2.0 * self.source[i][low.rows]) for i in self.layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_intervention_is_one_class(models, family):
    """An intervention defined outside the package, lowered into the engine's primitive writes, runs on every
    path: equal to the model's own forward with a hook doing the same, incremental equal to recomputation."""
    adapter = models[family]
    inputs = adapter.prepare(samples_for(adapter, 2, 2))
    clean = run(adapter, inputs, capture=[Capture.residual(site="attn_out", name="out")], logits="all")
    iv = _ScaleAttentionOutput("question", (1,), clean.captures["out"])
    ours = run(adapter, inputs, [iv], logits="all").logits
    where = inputs.layout.mask("question")

    def double(_module, _args, output):
        out = output[0].clone()
        out[where] = 2 * out[where]
        return (out, *output[1:])

    hook = adapter.layers[1].self_attn.register_forward_hook(double)
    try:
        with torch.no_grad():
            ref = adapter.model(**adapter.model_inputs(inputs)).logits.float()
    finally:
        hook.remove()
    valid = inputs.layout.valid
    assert (ours[valid] - ref[valid]).abs().max() <= 1e-4
    assert (ours[valid] - clean.logits[valid]).abs().max() > 1e-4
    conds = {"base": [], "scaled": [iv], "with knockout": [iv, Knockout("last", "video", layers=[2])]}
    fast = run_conditions(adapter, inputs, conds)
    slow = run_conditions(adapter, inputs, conds, incremental=False)
    for name in conds:
        assert (fast[name].logits - slow[name].logits).abs().max() <= ATOL, name
