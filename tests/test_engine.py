"""The intervention engine against reference computations and invariants, on all three families."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, samples_for

from avlens.trace import Capture, Discard, Knockout, Patch, Steer, generate, run, run_conditions
from avlens.trace.reference import knockout_logits

ATOL = 1e-5


def _batch(models, family, seed=0, n=2):
    adapter = models[family]
    return adapter, adapter.prepare(samples_for(adapter, seed, n))


def _close(a, b, atol=ATOL):
    valid = ~(torch.isnan(a) | torch.isnan(b))
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    return (a[valid] - b[valid]).abs().max().item() <= atol


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_equals_model_forward(models, family):
    adapter, inputs = _batch(models, family)
    with torch.no_grad():
        ref = adapter.model(**adapter.model_inputs(inputs)).logits.float()
    out = run(adapter, inputs, logits="all")
    valid = inputs.layout.valid
    assert (out.logits[valid] - ref[valid]).abs().max() <= 1e-5
    # One unpadded sample takes sdpa's own causal path: bit-identical to the model's forward.
    single = adapter.prepare(samples_for(adapter, 0, 1))
    with torch.no_grad():
        ref1 = adapter.model(**adapter.model_inputs(single)).logits.float()
    assert torch.equal(run(adapter, single, logits="all").logits, ref1)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_knockout_is_bit_identical(models, family):
    adapter, inputs = _batch(models, family)
    base = run(adapter, inputs, logits="all")
    for ko in (Knockout("last", "video", layers=[]), Knockout("generated", "video", layers=[0, 1])):
        assert torch.equal(run(adapter, inputs, [ko], logits="all").logits, base.logits)
    out = run_conditions(adapter, inputs, {"none": [], "empty": [Knockout("question", "video", layers=())]})
    assert torch.equal(out["empty"].logits, out["none"].logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_knockout_equals_explicit_eager_mask(models, family, attn):
    adapter, inputs = _batch(models, family)
    kos = [Knockout("last+question", "video", layers=[1, 2]), Knockout("question", "video", layers=[0])]
    if adapter.has_audio:
        kos.append(Knockout("audio", "video", layers=[0, 2]))
    ref = knockout_logits(adapter, inputs, kos)
    out = run(adapter, inputs, kos, logits="all", attn=attn)
    valid = inputs.layout.valid
    assert (out.logits[valid] - ref[valid]).abs().max() <= ATOL
    base = run(adapter, inputs, logits="all")
    assert (out.logits[valid] - base.logits[valid]).abs().max() > 1e-3  # the knockout did something


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_knockout_leaves_earlier_positions_unchanged(omni, layer):
    inputs = omni.prepare(samples_for(omni, 1, 1))
    question = inputs.layout.positions("question", 0)
    cap = [Capture.residual()]
    base = run(omni, inputs, capture=cap, logits="all")
    ko = run(omni, inputs, [Knockout("question", "video", layers=[layer])], capture=cap, logits="all")
    first = int(question[0])
    assert torch.equal(ko.logits[:, :first], base.logits[:, :first])
    for i in range(omni.n_layers + 1):
        assert torch.equal(ko.captures["residual"][i][:, :first], base.captures["residual"][i][:, :first])
        changed = (ko.captures["residual"][i][:, first:] - base.captures["residual"][i][:, first:]).abs().max()
        assert (changed > 0) == (i > layer)
    assert (ko.logits[:, first:] - base.logits[:, first:]).abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_every_position_reproduces_the_source(models, family):
    adapter = models[family]
    a = adapter.prepare(samples_for(adapter, 0, 1))
    b = adapter.prepare(samples_for(adapter, 5, 1))  # same shapes, other content
    assert a.input_ids.shape == b.input_ids.shape
    cap = [Capture.residual()]
    src = run(adapter, a, capture=cap, logits="all")
    target = run(adapter, b, logits="all")
    assert (src.logits - target.logits).abs().max() > 1e-3
    # Qwen3-Omni adds deepstack visual features after layer 0: patching layer 0 cannot override those.
    for layer in (1, 2) if family == "qwen3-omni" else (0, 2):
        patched = run(adapter, b, [Patch("all", layers=[layer], source=src.captures["residual"])], logits="all")
        assert (patched.logits - src.logits).abs().max() <= ATOL


def _conditions(adapter, source):
    conds = {
        "base": [],
        "last->video": [Knockout("last", "video", layers=[1, 2])],
        "question->video": [Knockout("question", "video", layers=[0])],
        "steer-post": [Steer("video", layers=[1], alpha=0.5)],
        "steer-bias": [Steer("video", layers=[2], alpha=1.5, mode="bias", heads=[0, 2])],
        "discard": [Discard("video", 1)],
        "patch": [Patch("question", layers=[1], source=source)],
        "two": [Knockout("last", "video", layers=[2]), Steer("question", layers=[1], alpha=0.2)],
    }
    if adapter.has_audio:
        conds["audio->video"] = [Knockout("audio", "video", layers=[0, 1])]
        conds["last->audio"] = [Knockout("last+generated", "audio", layers=[0, 1, 2])]
    return conds


CAPTURES = [Capture.residual(), Capture.attention("last", ["video", "question"], name="att")]


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_conditions_equal_full_recomputation(models, family):
    adapter, inputs = _batch(models, family)
    other = adapter.prepare(samples_for(adapter, 7, 2))
    source = run(adapter, other, capture=[Capture.residual(layers=[1])]).captures["residual"]
    conds = _conditions(adapter, source)
    fast = run_conditions(adapter, inputs, conds, capture=CAPTURES, logits="all")
    slow = run_conditions(adapter, inputs, conds, capture=CAPTURES, logits="all", incremental=False)
    for name in conds:
        assert _close(fast[name].logits, slow[name].logits), name
        for i in range(adapter.n_layers + 1):
            assert _close(fast[name].captures["residual"][i], slow[name].captures["residual"][i]), (name, i)
        for i in range(adapter.n_layers):
            assert _close(fast[name].captures["att"][i], slow[name].captures["att"][i]), (name, i)
    assert torch.equal(fast["base"].logits, run(adapter, inputs, logits="all").logits)
    for name in conds:
        if name != "base":
            assert not torch.equal(fast[name].logits.nan_to_num(), fast["base"].logits), name


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_conditions_equals_one_by_one(models, family):
    adapter, inputs = _batch(models, family)
    source = run(adapter, inputs, capture=[Capture.residual(layers=[1])]).captures["residual"]
    conds = _conditions(adapter, source)
    together = run_conditions(adapter, inputs, conds, capture=CAPTURES, logits="all")
    for name, ivs in conds.items():
        alone = run_conditions(adapter, inputs, {name: ivs}, capture=CAPTURES, logits="all")[name]
        assert _close(together[name].logits, alone.logits), name
        assert _close(together[name].captures["att"][2], alone.captures["att"][2]), name
        direct = run(adapter, inputs, ivs, capture=CAPTURES, logits="all")
        assert _close(together[name].logits, direct.logits), name


def _last(adapter, inputs, ivs):
    """Reference logits (B, V) at the last prompt position, from a run that computes every position."""
    return run(adapter, inputs, ivs, logits="all").logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_position_logits_run_the_last_layer_on_that_position_only(models, family):
    """With logits="last" and nothing recorded from the last layer, that layer runs the other positions only
    as far as their keys/values; the answer is the same as from computing every position."""
    adapter, inputs = _batch(models, family)
    n = adapter.n_layers
    source = run(adapter, inputs, capture=[Capture.residual(layers=[n])]).captures["residual"]
    cases = [
        [],
        [Knockout("last", "video", layers=[n - 1])],
        [Steer("video", layers=[n - 1], alpha=0.8)],
        [Discard("video", n - 1)],
        [Patch("question", layers=[n], source=source)],
    ]
    rows = []
    hook = adapter.layers[-1].mlp.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[1]))
    try:
        for ivs in cases:
            rows.clear()
            assert (run(adapter, inputs, ivs).logits - _last(adapter, inputs, ivs)).abs().max() <= ATOL, ivs
            assert rows[0] == 1, ivs
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_conditions_equal_their_own_runs(models, family, monkeypatch):
    """Conditions acting on the last few positions through attention ride along in the baseline's pass; each
    gives what it gives run alone, and the knockouts what the papers' explicit eager mask gives."""
    from avlens.trace import engine

    adapter, inputs = _batch(models, family)
    n = adapter.n_layers
    conds = {f"last->video {i}": [Knockout("last", "video", layers=[i])] for i in range(n)}
    conds |= {
        "base": [],
        "question->video": [Knockout("question", "video", layers=[0, 2])],
        "steer": [Steer("video", layers=[1], alpha=0.5, heads=[0, 1])],
        "two": [Knockout("last", "video", layers=[2]), Steer("question", layers=[1], alpha=0.2, mode="bias")],
        "discard": [Discard("video", 1)],  # not folded: it changes the sequence
    }
    folds = []
    start = engine._Forward.start_fold
    monkeypatch.setattr(
        engine._Forward, "start_fold", lambda self, p, s: (folds.append(len(self.rows)), start(self, p, s))
    )
    out = run_conditions(adapter, inputs, conds)
    assert folds == [inputs.batch_size * (len(conds) - 2)]  # all but the baseline and the discard
    for name, ivs in conds.items():
        assert (out[name].logits - _last(adapter, inputs, ivs)).abs().max() <= ATOL, name
        if ivs and all(isinstance(iv, Knockout) for iv in ivs):
            ref = knockout_logits(adapter, inputs, ivs)[:, -1]
            assert (out[name].logits - ref).abs().max() <= ATOL, name
    # (The baseline's pass now multiplies more rows at once: equal to the plain run up to rounding.)
    assert (out["base"].logits - run(adapter, inputs).logits).abs().max() <= ATOL
    moved = [(out[name].logits - out["base"].logits).abs().max() for name in conds if name != "base"]
    assert min(moved) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_residuals_equal_output_hidden_states(models, family):
    adapter, inputs = _batch(models, family)
    with torch.no_grad():
        hs = adapter.model(**adapter.model_inputs(inputs), output_hidden_states=True).hidden_states
    out = run(adapter, inputs, capture=[Capture.residual()])
    res = out.captures["residual"]
    valid = inputs.layout.valid
    n = adapter.n_layers
    assert len(hs) == n + 1
    # The residual entering layer i includes what the model adds after layer i-1 (Qwen3's deepstack features);
    # transformers records layer outputs before that addition.
    added = adapter.embed(inputs).additions
    assert bool(added) == (family == "qwen3-omni")
    for i in range(n):
        expected = hs[i] + added[i - 1] if i - 1 in added else hs[i]
        assert (res[i][valid] - expected[valid]).abs().max() <= ATOL, i
    # transformers' last hidden state is after the final norm.
    assert (adapter.final_norm(res[n])[valid] - hs[n][valid]).abs().max() <= ATOL
    mean = run(adapter, inputs, capture=[Capture.residual([1], at="video", reduce="mean")]).captures["residual"][1]
    rows = [res[1][b][inputs.layout.mask("video")[b]].mean(0) for b in range(inputs.batch_size)]
    assert torch.allclose(mean, torch.stack(rows), atol=1e-6)


def _eager_attentions(adapter, inputs) -> tuple[torch.Tensor, ...]:
    """transformers' own attention weights, one (B, H, L, L) per layer, from its eager attention."""
    before = adapter.text_attention
    adapter.set_text_attention("eager")
    try:
        with torch.no_grad():
            return adapter.model(**adapter.model_inputs(inputs), output_attentions=True).attentions
    finally:
        adapter.set_text_attention(before)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_equals_eager_weights(models, family):
    adapter, inputs = _batch(models, family)
    keys = ["video", "question", "audio"] if adapter.has_audio else ["video", "question"]
    query = "question+last"
    out = run(adapter, inputs, capture=[Capture.attention(query, keys)])
    att = _eager_attentions(adapter, inputs)
    lay = inputs.layout
    q = lay.mask(query).float()
    for i in range(adapter.n_layers):
        for g, key in enumerate(keys):
            k = lay.mask(key).float()
            expected = torch.einsum("bhqk,bq,bk->bh", att[i].float(), q, k) / q.sum(1, keepdim=True)
            assert (out.captures["attention"][i][..., g] - expected).abs().max() <= ATOL, (i, key)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("query", ["all", "video", "audio+question"])
def test_received_attention_equals_eager_column_sums(models, family, query):
    """Capture.received: the attention each position receives from strictly later query positions, summed, per
    head; equal to the column sums of transformers' own eager attention weights (padded rows included)."""
    adapter, inputs = _batch(models, family)
    if "audio" in query and not adapter.has_audio:
        query = "question"
    cap = Capture.received(query)
    out = run(adapter, inputs, capture=[cap])
    att = _eager_attentions(adapter, inputs)
    lay = inputs.layout
    q = lay.mask(query).float()
    length = lay.length
    later = torch.arange(length)[:, None] > torch.arange(length)[None, :]  # (Q, K): q after k
    for i in range(adapter.n_layers):
        expected = torch.einsum("bhqk,bq,qk->bhk", att[i].float(), q, later.float())
        got = out.captures["received"][i]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= ATOL, i
    count = cap.count(lay)
    assert torch.equal(count, torch.einsum("bq,qk->bk", q, later.float()))
    with pytest.raises(ValueError, match="run_conditions"):
        run_conditions(adapter, inputs, {"none": []}, capture=[cap])
    with pytest.raises(ValueError, match="generate"):
        generate(adapter, inputs, max_new_tokens=2, capture=[cap])


def test_steer_post_is_renormalised_amplification(omni):
    """At the steered layer itself, A + alpha*|A| on the key columns, renormalised, in the heads asked."""
    inputs = omni.prepare(samples_for(omni, 2, 2))
    keys = ["video", "audio", "question"]
    cap = [Capture.attention("last", keys, layers=[1])]
    base = run(omni, inputs, capture=cap).captures["attention"][1]
    alpha, heads = 0.7, [1, 3]
    steered = run(omni, inputs, [Steer("video", layers=[1], alpha=alpha, heads=heads)], capture=cap)
    got = steered.captures["attention"][1]
    mk = base[..., 0]  # mass on the steered group, (B, H)
    z = 1 + alpha * mk
    expected = base.clone()
    expected[:, heads, 0] = ((1 + alpha) * mk / z)[:, heads]
    expected[:, heads, 1:] = (base[..., 1:] / z[..., None])[:, heads]
    assert (got - expected).abs().max() <= ATOL
    assert (got[:, heads, 0] - base[:, heads, 0]).min() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_discard_at_n_layers_is_no_discard(models, family):
    adapter, inputs = _batch(models, family)
    base = run(adapter, inputs, logits="all")
    assert torch.equal(run(adapter, inputs, [Discard("video", adapter.n_layers)], logits="all").logits, base.logits)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_discard_equals_blocking_every_edge_to_the_group(omni, layer):
    """Discarding a group from layer L on leaves later positions as if nothing attended to it in layers >= L."""
    inputs = omni.prepare(samples_for(omni, 3, 2))
    discarded = run(omni, inputs, [Discard("video", layer)])
    blocked = run(omni, inputs, [Knockout("all", "video", layers=range(layer, omni.n_layers))])
    assert (discarded.logits - blocked.logits).abs().max() <= ATOL
    assert (discarded.logits - run(omni, inputs).logits).abs().max() > 1e-4


@pytest.mark.parametrize("layer", [0, 2])
def test_discard_shortens_the_kv_cache_by_the_groups_size_from_its_layer_on(omni, layer):
    inputs = omni.prepare(samples_for(omni, 3, 2))
    n, valid = omni.n_layers, inputs.layout.valid
    size = (inputs.layout.groups["video"] & valid).sum(1)  # (B,)
    base, dropped = run(omni, inputs), run(omni, inputs, [Discard("video", layer)])
    assert torch.equal(base.cache_entries, valid.sum(1)[:, None].expand(-1, n))  # every valid position, each layer
    shortened = (torch.arange(n) >= layer)[None] * size[:, None]  # (B, n_layers)
    assert torch.equal(base.cache_entries - dropped.cache_entries, shortened)
    # and while decoding: the generated positions join both caches alike
    steps = 3
    gen_base = generate(omni, inputs, max_new_tokens=steps)
    gen_dropped = generate(omni, inputs, [Discard("video", layer)], max_new_tokens=steps)
    assert torch.equal(gen_base.cache_entries, base.cache_entries + steps - 1)
    assert torch.equal(gen_base.cache_entries - gen_dropped.cache_entries, shortened)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_knockout_acts_only_where_it_should(models, family):
    adapter, inputs = _batch(models, family)
    free = generate(adapter, inputs, max_new_tokens=4)
    assert free.step_logits.shape[1] >= 2
    later = generate(
        adapter, inputs, [Knockout("generated", "video", layers=range(adapter.n_layers))], max_new_tokens=4
    )
    # The first answer token comes from the last prompt position, which this knockout does not touch...
    assert torch.equal(later.step_logits[:, 0], free.step_logits[:, 0])
    # ...the following ones are produced by generated positions, which it does.
    n = min(later.step_logits.shape[1], free.step_logits.shape[1])
    assert (later.step_logits[:, 1:n] - free.step_logits[:, 1:n]).abs().max() > 1e-4
    first = generate(
        adapter, inputs, [Knockout("last+generated", "video", layers=range(adapter.n_layers))], max_new_tokens=4
    )
    assert (first.step_logits[:, 0] - free.step_logits[:, 0]).abs().max() > 1e-4
    # Greedy generation through the engine equals re-running the prompt plus the generated tokens.
    assert torch.equal(free.logits, run(adapter, inputs).logits)


def test_generation_equals_model_generate(omni):
    inputs = omni.prepare(samples_for(omni, 4, 1))
    ours = generate(omni, inputs, max_new_tokens=5)
    with torch.no_grad():
        theirs = omni.model.generate(**omni.model_inputs(inputs), max_new_tokens=5, do_sample=False)
    ids = theirs[0, inputs.length :].tolist()
    n = ours.tokens.shape[1]
    assert ours.tokens[0].tolist() == ids[:n]


def test_patch_source_of_wrong_batch_size_is_refused(omni):
    a = omni.prepare(samples_for(omni, 0, 2))
    one = omni.prepare(samples_for(omni, 0, 1))
    src = run(omni, one, capture=[Capture.residual(layers=[1])]).captures["residual"]
    with pytest.raises(ValueError, match="batch size 1, the inputs have 2"):
        run(omni, a, [Patch("audio", layers=[1], source=src)])


def test_unknown_group_is_one_clear_error(omni):
    inputs = omni.prepare(samples_for(omni, 0, 1))
    from avlens.errors import UnknownGroupError

    with pytest.raises(UnknownGroupError, match=r"unknown token group 'vidoe'.*video"):
        run_conditions(omni, inputs, {"ok": [], "typo": [Knockout("last", "vidoe", layers=[1])]})
    with pytest.raises(ValueError, match="out of range"):
        run(omni, inputs, [Knockout("last", "video", layers=[7])])
