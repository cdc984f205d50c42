"""Patch, Ablate and Capture at the sites of a decoder layer, against forward hooks on the model's own modules
during the model's own forward, on all three families, sdpa and eager, padded batches.

Sites of decoder layer i: "residual" (the layer's input; i = n_layers is the last layer's output), "attn_in" (the
output of its ``input_layernorm``: what self-attention reads), "attn_out" (the output of its ``self_attn``, before
the residual add), "mlp_out" (the output of its ``mlp``, before the residual add; Qwen3-Omni's is a sparse MoE
block)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from conftest import FAMILIES, samples_for

from avlens import Ablate, Capture, Knockout, Patch, run, run_conditions

SITES = ("residual", "attn_in", "attn_out", "mlp_out")
ATTNS = ("sdpa", "eager")
ATOL = 1e-5
LOGITS_ATOL = 1e-4


def _batch(models, family, seed=0):
    adapter = models[family]
    inputs = adapter.prepare(samples_for(adapter, seed, 2))
    assert not bool(inputs.layout.valid.all())  # left-padded: the rows have different lengths
    return adapter, inputs


def _other(adapter, inputs):
    """Another batch of the same layout (other media content)."""
    other = adapter.prepare(samples_for(adapter, 7, 2))
    assert torch.equal(other.layout.valid, inputs.layout.valid)
    return other


def _site_layers(adapter, site: str) -> list[int]:
    return list(range(adapter.n_layers + 1 if site == "residual" else adapter.n_layers))


def _mask(inputs, at) -> torch.Tensor:
    """(B, L) bool: a group expression or explicit positions, at valid (non-padding) positions only."""
    layout = inputs.layout
    if isinstance(at, str):
        return layout.mask(at) & layout.valid
    mask = torch.zeros_like(layout.valid)
    mask[:, list(at)] = True
    return mask & layout.valid


# ---------------------------------------------------------------------------------------------------------
# The reference: the model's own forward with hooks on its own modules
# ---------------------------------------------------------------------------------------------------------
def _hook(adapter, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register on the model's module for ``site`` of decoder layer ``layer`` a hook calling ``fn(x)`` with the
    site's value x (B, L, D); fn returns a replacement, or None to leave it."""
    n = adapter.n_layers
    if site == "residual":  # the input of layer i (or of the final norm for i = n)
        module = adapter.layers[layer] if layer < n else adapter.final_norm

        def pre(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            y = fn(x)
            if y is None:
                return None
            return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

        return module.register_forward_pre_hook(pre, with_kwargs=True)
    decoder_layer = adapter.layers[layer]
    module = {
        "attn_in": decoder_layer.input_layernorm,
        "attn_out": decoder_layer.self_attn,
        "mlp_out": decoder_layer.mlp,
    }[site]

    def post(_module, _args, out):
        # self_attn returns (output, weights); an MoE block may return (output, router logits).
        x = out[0] if isinstance(out, tuple) else out
        y = fn(x)
        if y is None:
            return None
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return module.register_forward_hook(post)


@contextlib.contextmanager
def _attn_implementation(adapter, attn: str):
    """The model's own text attention on ``attn`` for the block (sdpa: as it is), restored after."""
    config = adapter.model.config.get_text_config()
    before = config._attn_implementation
    if attn == "eager":
        adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        if attn == "eager":
            adapter.model.set_attn_implementation({"text_config": before})


@torch.no_grad()
def _reference(adapter, inputs, attn: str, hooks=()) -> torch.Tensor:
    """Logits (B, L, V) of the model's own forward with ``hooks`` = [(site, layer, fn)] registered."""
    handles = []
    with _attn_implementation(adapter, attn):
        try:
            for site, layer, fn in hooks:
                handles.append(_hook(adapter, site, layer, fn))
            return adapter.model(**adapter.model_inputs(inputs), use_cache=False).logits.float()
        finally:
            for h in handles:
                h.remove()


def _observed(adapter, inputs, attn: str, site: str, layers) -> dict[int, torch.Tensor]:
    """The site's values (B, L, D) at ``layers`` during the model's own forward."""
    seen: dict[int, torch.Tensor] = {}

    def keep(i):
        return lambda x: seen.__setitem__(i, x.detach().clone())

    _reference(adapter, inputs, attn, [(site, i, keep(i)) for i in layers])
    assert sorted(seen) == sorted(layers)
    return seen


def _writes(adapter, inputs, attn, writes) -> torch.Tensor:
    """The model's own logits (B, L, V) with ``writes`` = [(site, layer, mask (B, L), values (B, L, D) or (D,))]:
    each overwrites the site's value at the masked positions."""

    def write(mask, values):
        def fn(x):
            y = x.clone()
            v = values if values.dim() == 1 else values[mask]
            y[mask] = v.to(y.dtype)
            return y

        return fn

    return _reference(adapter, inputs, attn, [(site, i, write(m, v)) for site, i, m, v in writes])


def _assert_valid_close(a: torch.Tensor, b: torch.Tensor, inputs, atol: float, what) -> None:
    valid = inputs.layout.valid
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = (a[valid] - b[valid]).abs().max().item()
    assert diff <= atol, (what, diff)


# ---------------------------------------------------------------------------------------------------------
# (i) Capture at a site
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_at_a_site_equals_a_hook_on_the_models_module(models, family, site, attn):
    adapter, inputs = _batch(models, family)
    layers = _site_layers(adapter, site)
    seen = _observed(adapter, inputs, attn, site, layers)
    caps = [
        Capture.residual(layers, site=site, name=site),
        Capture.residual(layers, at="video", reduce="mean", site=site, name="video mean"),
    ]
    out = run(adapter, inputs, capture=caps, attn=attn)
    got, means = out.captures[site], out.captures["video mean"]
    assert sorted(got) == layers and sorted(means) == layers
    video = inputs.layout.mask("video")
    b, length, d = inputs.batch_size, inputs.length, adapter.hidden_size
    for i in layers:
        assert got[i].shape == (b, length, d), (site, i, got[i].shape)
        _assert_valid_close(got[i], seen[i], inputs, ATOL, (site, i))
        expected = torch.stack([seen[i][r][video[r]].mean(0) for r in range(b)])
        assert (means[i] - expected).abs().max() <= ATOL, (site, i)
    # The sites are different values (so the comparison above could tell them apart).
    if site != "residual":
        residual = _observed(adapter, inputs, attn, "residual", layers)
        assert all((seen[i] - residual[i])[inputs.layout.valid].abs().max() > 1e-3 for i in layers)


# ---------------------------------------------------------------------------------------------------------
# (ii) Patch at a site
# ---------------------------------------------------------------------------------------------------------
def _patch_layers(adapter, site: str) -> tuple[list[int], list[int]]:
    """Layers of the two patches of a test: the first and last of the site's layers, and one in between."""
    last = _site_layers(adapter, site)[-1]
    return [0, last], [1]


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_at_a_site_equals_hooks_overwriting_the_models_module(models, family, site, attn):
    adapter, inputs = _batch(models, family)
    length = inputs.length
    # Another sample's values at the site (for the first patch) and random ones of the same scale (second).
    source = _observed(adapter, _other(adapter, inputs), attn, site, _site_layers(adapter, site))
    gen = torch.Generator().manual_seed(3)
    noise = {i: torch.randn(s.shape, generator=gen) * s.std() for i, s in source.items()}
    layers_a, layers_b = _patch_layers(adapter, site)
    at_b = (0, length - 3, length - 2)  # position 0 is padding in the shorter row
    patches = [
        Patch("question", layers=layers_a, source=source, site=site),
        Patch(at_b, layers=layers_b, source=noise, site=site),
    ]
    out = run(adapter, inputs, patches, logits="all", attn=attn)
    qa, qb = _mask(inputs, "question"), _mask(inputs, at_b)
    writes = [(site, i, qa, source[i]) for i in layers_a] + [(site, i, qb, noise[i]) for i in layers_b]
    ref = _writes(adapter, inputs, attn, writes)
    _assert_valid_close(out.logits, ref, inputs, LOGITS_ATOL, site)
    base = _reference(adapter, inputs, attn)
    assert (ref - base)[inputs.layout.valid].abs().max() > 1e-3  # the patch changed the answer
    # What the patched run records at the site is what it wrote there.
    cap = run(adapter, inputs, patches, capture=[Capture.residual(layers_b, site=site, name="s")], attn=attn)
    recorded = cap.captures["s"][1]
    assert (recorded[qb] - noise[1][qb]).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------------------
# (iii) Ablate at a site: zero, or a mean over a reference set
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_ablate_at_a_site_equals_hooks_writing_zeros_or_the_mean(models, family, site, attn):
    adapter, inputs = _batch(models, family)
    length = inputs.length
    layers = _site_layers(adapter, site)
    # The mean over a reference set: every valid position of another batch, at each layer.
    other = _other(adapter, inputs)
    reference = _observed(adapter, other, attn, site, layers)
    mean = {i: reference[i][other.layout.valid].mean(0) for i in layers}
    layers_a, layers_b = _patch_layers(adapter, site)
    at_b = (0, length - 2, length - 1)
    cases = [  # (at, layers, how)
        ("video", layers_a, "zero"),
        (at_b, layers_b, "mean"),
        ("question", layers_a, "mean"),
    ]
    base = _reference(adapter, inputs, attn)
    d = adapter.hidden_size
    for at, at_layers, how in cases:
        name = (at, at_layers, how)
        value = mean if how == "mean" else None
        out = run(
            adapter, inputs, [Ablate(at, layers=at_layers, site=site, how=how, value=value)], logits="all", attn=attn
        )
        m = _mask(inputs, at)
        writes = [(site, i, m, torch.zeros(d) if how == "zero" else mean[i]) for i in at_layers]
        ref = _writes(adapter, inputs, attn, writes)
        _assert_valid_close(out.logits, ref, inputs, LOGITS_ATOL, (site, name))
        assert (ref - base)[inputs.layout.valid].abs().max() > 1e-4, name  # the ablation changed the answer


# ---------------------------------------------------------------------------------------------------------
# (iv) Conditions with patches and ablations at several sites: incremental equals full recomputation
# ---------------------------------------------------------------------------------------------------------
def _site_conditions(adapter, inputs, attn) -> dict[str, list]:
    n, length = adapter.n_layers, inputs.length
    other = _other(adapter, inputs)
    conds: dict[str, list] = {"base": []}
    for site in SITES:
        layers = _site_layers(adapter, site)
        src = _observed(adapter, other, attn, site, layers)
        mean = {i: src[i][other.layout.valid].mean(0) for i in layers}
        last = layers[-1]
        conds[f"{site}: question"] = [Patch("question", layers=[1], source=src, site=site)]
        conds[f"{site}: last position, last layer"] = [Patch("last", layers=[last], source=src, site=site)]
        conds[f"{site}: positions"] = [Patch((length - 4, length - 2), layers=[0, last], source=src, site=site)]
        conds[f"{site}: zero video"] = [Ablate("video", layers=[0], site=site)]
        conds[f"{site}: mean last"] = [Ablate("last", layers=[n - 1], site=site, how="mean", value=mean)]
    attn_src = _observed(adapter, other, attn, "attn_in", range(n))
    mlp_mean = {
        i: v[other.layout.valid].mean(0) for i, v in _observed(adapter, other, attn, "mlp_out", range(n)).items()
    }
    conds["mixed"] = [
        Patch("question", layers=[1], source=attn_src, site="attn_in"),
        Ablate("last+question", layers=[n - 1], site="mlp_out", how="mean", value=mlp_mean),
        Ablate("video", layers=[2], site="attn_out"),
        Knockout("last", "video", layers=[1]),
    ]
    return conds


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_site_conditions_incremental_equal_full_recomputation(models, family, attn):
    adapter, inputs = _batch(models, family)
    n = adapter.n_layers
    conds = _site_conditions(adapter, inputs, attn)
    caps = [Capture.residual(), Capture.residual(range(n), site="attn_out", name="attn_out")]
    valid = inputs.layout.valid
    fast = run_conditions(adapter, inputs, conds, capture=caps, logits="all", attn=attn)
    slow = run_conditions(adapter, inputs, conds, capture=caps, logits="all", attn=attn, incremental=False)
    for name, ivs in conds.items():
        _assert_valid_close(fast[name].logits, slow[name].logits, inputs, ATOL, name)
        for cap in ("residual", "attn_out"):
            for i, x in fast[name].captures[cap].items():
                _assert_valid_close(x, slow[name].captures[cap][i], inputs, ATOL, (name, cap, i))
        alone = run(adapter, inputs, ivs, logits="all", attn=attn)
        _assert_valid_close(fast[name].logits, alone.logits, inputs, ATOL, (name, "alone"))
        if name != "base":
            assert (fast[name].logits - fast["base"].logits)[valid].abs().max() > 0, name
    # Last-position logits (the last layer then runs on the last position only, where nothing asks for more).
    fast = run_conditions(adapter, inputs, conds, logits="last", attn=attn)
    slow = run_conditions(adapter, inputs, conds, logits="last", attn=attn, incremental=False)
    for name in conds:
        assert (fast[name].logits - slow[name].logits).abs().max() <= ATOL, name


# ---------------------------------------------------------------------------------------------------------
# (v) A Patch of the last layer's output with last-position logits
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_of_the_last_layer_output_with_last_position_logits(models, family, attn):
    """``Patch(layers=[n_layers])`` (the residual after the last layer) on the incremental path with
    ``logits="last"`` equals the full recomputation and the model's own forward with the same write."""
    adapter, inputs = _batch(models, family)
    n, length = adapter.n_layers, inputs.length
    source = _observed(adapter, _other(adapter, inputs), attn, "residual", range(n + 1))
    conds = {
        "base": [],
        "question": [Patch("question", layers=[n], source=source)],
        "last": [Patch("last", layers=[n], source=source)],
        "positions": [Patch((length - 3, length - 1), layers=[n], source=source, site="residual")],
        "earlier too": [Patch("video", layers=[1, n], source=source)],
    }
    fast = run_conditions(adapter, inputs, conds, logits="last", attn=attn, incremental=True)
    slow = run_conditions(adapter, inputs, conds, logits="last", attn=attn, incremental=False)
    for name, ivs in conds.items():
        assert (fast[name].logits - slow[name].logits).abs().max() <= ATOL, name
        writes = [("residual", i, _mask(inputs, iv.at), source[i]) for iv in ivs for i in iv.layers]
        ref = _writes(adapter, inputs, attn, writes)[:, -1]
        assert (fast[name].logits - ref).abs().max() <= LOGITS_ATOL, name
    # Writing the last position's final residual decides its logits: the source's own.
    expected = adapter.lm_head(adapter.final_norm(source[n][:, -1:]))[:, 0].float()
    assert (fast["last"].logits - expected).abs().max() <= ATOL
    assert (fast["last"].logits - fast["base"].logits).abs().max() > 1e-3
