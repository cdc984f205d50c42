"""``unchanged_prefix``: where two batches first feed the decoder differently. Before it every layer's state is
the same in both runs, bit for bit, so a causal trace may leave those positions out of a patch: the trimmed patch
restores exactly what the whole one does. ``unchanged_inputs`` also says which positions' first-layer inputs are
equal: a layer-0 patch there writes what is already there."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import av_samples

from avlens import Capture, Patch, run
from avlens.trace import run_conditions, unchanged_inputs, unchanged_prefix


@pytest.fixture(scope="module")
def pair(omni):
    """Interleaved clips of two chunks, and the same clips with their audio zeroed."""
    samples = av_samples(3, 2, frames=8, seconds=4.0)
    zeroed = [replace(s, audio=np.zeros_like(s.audio)) for s in samples]
    return omni.prepare(samples, interleave=True), omni.prepare(zeroed, interleave=True)


def test_a_batch_is_unchanged_throughout_against_itself(omni, pair):
    clean, _ = pair
    assert unchanged_prefix(omni, clean, clean).tolist() == [clean.length] * clean.batch_size


def test_zeroed_audio_first_reaches_the_decoder_at_the_first_audio_token(omni, pair):
    clean, zeroed = pair
    since = unchanged_prefix(omni, clean, zeroed)
    audio = clean.layout.groups["audio"] & clean.layout.valid
    first_audio = [int(audio[i].nonzero().min()) for i in range(clean.batch_size)]
    video = clean.layout.groups["video"] & clean.layout.valid
    assert since.tolist() == first_audio
    assert all(int(video[i].nonzero().min()) < s for i, s in enumerate(first_audio))  # some video comes before


def test_states_before_it_are_equal_bit_for_bit_in_every_layer(omni, pair):
    clean, zeroed = pair
    since = unchanged_prefix(omni, clean, zeroed)
    cap = [Capture.residual(range(omni.n_layers))]
    a, b = run(omni, clean, capture=cap).captures["residual"], run(omni, zeroed, capture=cap).captures["residual"]
    for layer in range(omni.n_layers):
        for i, s in enumerate(since.tolist()):
            assert torch.equal(a[layer][i, :s], b[layer][i, :s])
            assert not torch.equal(a[layer][i, s], b[layer][i, s])


@pytest.mark.parametrize("site", ["residual", "attn_in"])
def test_a_patch_trimmed_to_the_changed_positions_restores_what_the_whole_patch_does(omni, pair, site):
    clean, zeroed = pair
    n = omni.n_layers
    since = unchanged_prefix(omni, clean, zeroed)
    video = clean.layout.groups["video"] & clean.layout.valid
    trimmed = video & (torch.arange(clean.length)[None] >= since[:, None])
    assert 0 < int(trimmed.sum()) < int(video.sum())
    name = "attn_in" if site == "attn_in" else "residual"
    states = run(omni, clean, capture=[Capture.residual(range(n), site=site, name=name)]).captures[name]
    layout = zeroed.layout.with_group("whole", video).with_group("trimmed", trimmed)
    conditions = {g: [Patch(g, range(n), states, site=site)] for g in ("whole", "trimmed")}
    out = run_conditions(omni, replace(zeroed, layout=layout), conditions)
    assert torch.allclose(out["whole"].logits, out["trimmed"].logits, atol=1e-5)
    assert not torch.allclose(out["whole"].logits, run(omni, zeroed).logits, atol=1e-3)  # the patch does act


def test_zeroed_audio_changes_the_first_layers_input_at_the_audio_tokens_only(omni, pair):
    clean, zeroed = pair
    first_layer, prefix = unchanged_inputs(omni, clean, zeroed)
    audio = clean.layout.groups["audio"] & clean.layout.valid
    assert torch.equal(~first_layer & clean.layout.valid, audio)
    assert torch.equal(prefix, unchanged_prefix(omni, clean, zeroed))
    _, itself = unchanged_inputs(omni, clean, clean)
    assert itself.tolist() == [clean.length] * clean.batch_size


@pytest.mark.parametrize("site", ["residual", "attn_in"])
def test_a_layer_0_patch_where_the_first_layers_input_is_unchanged_is_a_no_op(omni, pair, site):
    clean, zeroed = pair
    first_layer, _ = unchanged_inputs(omni, clean, zeroed)
    video = clean.layout.groups["video"] & clean.layout.valid
    audio = clean.layout.groups["audio"] & clean.layout.valid
    name = "attn_in" if site == "attn_in" else "residual"
    states = run(omni, clean, capture=[Capture.residual([0], site=site, name=name)]).captures[name]
    layout = zeroed.layout.with_group("video", video).with_group("audio", audio)
    inputs = replace(zeroed, layout=layout)
    none = run(omni, inputs).logits
    every_equal = run(omni, inputs, [Patch("video", [0], states, site=site)]).logits  # inputs equal there
    changed = run(omni, inputs, [Patch("audio", [0], states, site=site)]).logits  # the changed positions
    assert bool(first_layer[video].all())
    assert torch.equal(every_equal, none)
    assert not torch.allclose(changed, none, atol=1e-3)
