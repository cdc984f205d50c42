"""Property tests of the engine (hypothesis): on random tiny configs (layers, heads, KV heads, head size), random
batches (one to three samples of different video frames, audio lengths and prompt words, so left-padded) and
random mixtures of interventions (Knockout, Steer, Patch and Ablate at every site, Discard),

- ``run_conditions`` with ``incremental=True`` equals the full recomputation (``incremental=False``),
- it equals each condition run alone with ``run``,
- an empty intervention list is bit-identical to the model's own forward,

for last-position and all-position logits and for captures at every site, within 1e-5 (NaN where a discard removed a
position: the NaN patterns must agree too)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from conftest import FAMILIES
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from avlens import Ablate, Capture, Discard, Knockout, Patch, Sample, Steer, run, run_conditions
from avlens.models.tiny import WORDS, tiny_model

ATOL = 1e-5
# No shrinking phase: the file must run in well under a minute on one core, failing or not (a failure is reported
# with the example as drawn; its message names the config, batch, conditions and captures).
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Where interventions point: group expressions of the layout.
GROUPS = {True: ["last", "video", "audio", "question", "audio+video", "last+question"], False: []}
GROUPS[False] = [g for g in GROUPS[True] if "audio" not in g]
DISCARDABLE = {True: ["video", "audio", "question", "audio+video"], False: ["video", "question"]}


# ---------------------------------------------------------------------------------------------------------
# Models and batches, cached so that hypothesis's examples share them
# ---------------------------------------------------------------------------------------------------------
@functools.cache
def _model(family: str, layers: int, heads: int, kv_heads: int, head_dim: int, seed: int):
    # Qwen's mrope sections split head_dim / 2 rotary pairs as [16, 24, 24]/64: head_dim a multiple of 16.
    return tiny_model(family, layers=layers, hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, seed=seed)


@functools.cache
def _inputs(config: tuple, rows: tuple, media_seed: int):
    """A batch of ``rows`` = ((video frames, audio seconds, prompt), ...); media drawn from ``media_seed`` (other
    seeds give other content in the same layout)."""
    adapter = _model(*config)
    rng = np.random.default_rng(media_seed)
    samples = []
    for frames, seconds, prompt in rows:
        video = rng.integers(0, 255, (frames, 56, 84, 3), dtype=np.uint8)
        audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        samples.append(Sample(prompt, video=video, audio=audio if adapter.has_audio else None))
    return adapter.prepare(samples)


SITES = ("residual", "attn_in", "attn_out", "mlp_out")


@functools.cache
def _source(config: tuple, rows: tuple):
    """site -> layer -> (B, L, D): the states of another batch of the same layout (what a Patch copies in)."""
    adapter = _model(*config)
    other = _inputs(config, rows, 99)
    assert torch.equal(other.layout.valid, _inputs(config, rows, 0).layout.valid)
    return run(adapter, other, capture=[Capture.residual(site=s, name=s) for s in SITES]).captures


@st.composite
def configs(draw) -> tuple:
    family = draw(st.sampled_from(FAMILIES))
    layers = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([16, 32]))
    seed = draw(st.integers(0, 3))
    return family, layers, heads, kv_heads, head_dim, seed


def _row(frames: int, seconds: float, words: list[str]) -> tuple:
    return frames, seconds, " ".join(words)


ROW = st.builds(
    _row,
    st.sampled_from([2, 4, 6]),
    st.sampled_from([0.5, 1.0, 2.0]),
    st.lists(st.sampled_from(WORDS[:20]), min_size=1, max_size=6),
)
BATCHES = st.lists(ROW, min_size=1, max_size=3).map(tuple)


def _layers(n: int, upto: int):
    """Layers 0..upto-1; the first and the last one on their own are drawn often (where the edge cases are)."""
    some = st.lists(st.integers(0, upto - 1), min_size=1, max_size=min(n, 3), unique=True)
    return st.one_of(st.just([upto - 1]), st.just([0]), some)


def _intervention(data, adapter, inputs, source):
    """One random Knockout, Steer, Patch or Discard for this batch."""
    n, av = adapter.n_layers, adapter.has_audio
    group = st.sampled_from(GROUPS[av])
    kind = data.draw(st.sampled_from(["knockout", "steer", "patch", "ablate", "discard"]))
    if kind == "knockout":
        return Knockout(data.draw(group), data.draw(group), layers=data.draw(_layers(n, n)))
    if kind == "steer":
        mode = data.draw(st.sampled_from(["post", "bias"]))
        alpha = data.draw(st.floats(-0.9, 2.0) if mode == "post" else st.floats(-3.0, 3.0))
        heads = data.draw(st.none() | st.lists(st.integers(0, adapter.n_heads - 1), min_size=1, unique=True))
        key, layers, query = data.draw(group), data.draw(_layers(n, n)), data.draw(group)
        return Steer(key, layers=layers, alpha=alpha, query=query, heads=heads, mode=mode)
    if kind in ("patch", "ablate"):
        positions = st.lists(st.integers(0, inputs.length - 1), min_size=1, max_size=4, unique=True).map(tuple)
        at = data.draw(group | positions)
        site = data.draw(st.sampled_from(SITES))
        upto = n + 1 if site == "residual" else n  # the residual at 0..n_layers, the other sites in layers 0..n-1
        layers = data.draw(_layers(upto, upto))
        src = source[site]
        if kind == "patch":
            return Patch(at, layers=layers, source=src, site=site)
        if data.draw(st.booleans()):
            return Ablate(at, layers=layers, site=site)
        mean = {i: src[i][inputs.layout.valid].mean(0) for i in layers}  # over the other batch's valid positions
        return Ablate(at, layers=layers, site=site, how="mean", value=mean)
    return Discard(data.draw(st.sampled_from(DISCARDABLE[av])), from_layer=data.draw(st.integers(0, n)))


def _conditions(data, adapter, inputs, source) -> dict[str, list]:
    k = data.draw(st.integers(1, 4), label="conditions")
    conds = {}
    for j in range(k):
        m = data.draw(st.integers(0 if j == 0 else 1, 3), label="interventions")
        conds[f"c{j}"] = [_intervention(data, adapter, inputs, source) for _ in range(m)]
    return conds


def _captures(data, adapter) -> list[Capture]:
    n = adapter.n_layers
    group = st.sampled_from(GROUPS[adapter.has_audio])
    choice = data.draw(st.sampled_from(["none", "none", "all", "some", "mean"]), label="capture")
    if choice == "none":
        return []
    if choice == "all":
        return [Capture.residual()]
    site = data.draw(st.sampled_from(SITES))
    upto = n + 1 if site == "residual" else n
    layers = data.draw(_layers(upto, upto))
    if choice == "some":
        return [Capture.residual(layers, site=site)]
    mean = Capture.residual(layers, at=data.draw(group), reduce="mean", name="mean", site=site)
    return [Capture.residual(layers, site=site), mean]


# ---------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------
def _assert_close(a: torch.Tensor, b: torch.Tensor, what, valid: torch.Tensor | None = None, atol: float = ATOL):
    """a, b equal within ``atol`` (at the valid positions of (B, L, ...) tensors if ``valid`` (B, L) is given),
    NaN at the same places."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if valid is not None:
        a, b = a[valid], b[valid]
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), (what, "NaN at different places", int((nan_a != nan_b).sum()))
    ok = ~nan_a
    diff = (a[ok] - b[ok]).abs().max().item() if bool(ok.any()) else 0.0
    assert diff <= atol, (what, diff)


def _assert_traces_close(a, b, inputs, logits: str, what):
    valid = inputs.layout.valid
    _assert_close(a.logits, b.logits, (what, "logits"), valid if logits == "all" else None)
    assert a.captures.keys() == b.captures.keys(), what
    for name, per_layer in a.captures.items():
        assert per_layer.keys() == b.captures[name].keys(), (what, name)
        for i, x in per_layer.items():
            full = x.dim() == 3  # (B, L, D), else (B, D) means
            _assert_close(x, b.captures[name][i], (what, name, i), valid if full else None)


def _describe(config, rows, conds, cap) -> str:
    return f"config={config} rows={rows} conditions={conds} capture={cap}"


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(config=configs(), rows=BATCHES, data=st.data())
def test_incremental_equals_full_recomputation(config, rows, data):
    adapter = _model(*config)
    inputs = _inputs(config, rows, 0)
    conds = _conditions(data, adapter, inputs, _source(config, rows))
    cap = _captures(data, adapter)
    for logits in ("last", "all"):
        what = (logits, _describe(config, rows, conds, cap))
        fast = run_conditions(adapter, inputs, conds, capture=cap, logits=logits, incremental=True)
        slow = run_conditions(adapter, inputs, conds, capture=cap, logits=logits, incremental=False)
        assert list(fast) == list(slow) == list(conds)
        for name in conds:
            _assert_traces_close(fast[name], slow[name], inputs, logits, (name, what))


@SETTINGS
@given(config=configs(), rows=BATCHES, data=st.data())
def test_conditions_together_equal_each_run_alone(config, rows, data):
    adapter = _model(*config)
    inputs = _inputs(config, rows, 0)
    conds = _conditions(data, adapter, inputs, _source(config, rows))
    cap = _captures(data, adapter)
    for logits in ("last", "all"):
        what = (logits, _describe(config, rows, conds, cap))
        together = run_conditions(adapter, inputs, conds, capture=cap, logits=logits)
        for name, ivs in conds.items():
            alone = run(adapter, inputs, ivs, capture=cap, logits=logits)
            _assert_traces_close(together[name], alone, inputs, logits, (name, what))


@SETTINGS
@given(config=configs(), rows=BATCHES, row=ROW, n=st.integers(1, 3))
def test_empty_intervention_list_is_bit_identical_to_the_model_forward(config, rows, row, n):
    """On sdpa: at every valid position of a padded batch, and on a batch without padding (rows of the same shapes,
    other content; sdpa's own causal path)."""
    adapter = _model(*config)
    for inputs in (_inputs(config, rows, 0), _inputs(config, (row,) * n, 0)):
        valid = inputs.layout.valid
        with torch.no_grad():
            ref = adapter.model(**adapter.model_inputs(inputs)).logits.float()
        assert torch.equal(run(adapter, inputs, [], logits="all").logits[valid], ref[valid])
        for incremental in (True, False):
            out = run_conditions(adapter, inputs, {"base": []}, logits="all", incremental=incremental)
            assert torch.equal(out["base"].logits[valid], ref[valid]), incremental
            # With last-position logits the last layer runs on that position alone (the same products in other
            # shapes): equal up to rounding.
            out = run_conditions(adapter, inputs, {"base": []}, logits="last", incremental=incremental)
            _assert_close(out["base"].logits, ref[:, -1], ("last", incremental))
        _assert_close(run(adapter, inputs, logits="last").logits, ref[:, -1], "last")
    assert bool(valid.all())  # the second batch has no padding
