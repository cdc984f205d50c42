"""Guided decoding (P2's mitigation): two branches with their own caches, combined per step; weight 0 is plain
decoding and weight 1 the guided branch alone, token for token; a schedule sees the plain branch's attention."""

from __future__ import annotations

import pytest
import torch
from conftest import samples_for

from avlens import Capture, Knockout, Steer, generate, run
from avlens.trace import generate_guided


@pytest.fixture(scope="module")
def batch(models):
    adapter = models["qwen2.5-omni"]
    return adapter, adapter.prepare(samples_for(adapter, 2, 2))


GUIDED = (Knockout("last+generated", "video", layers=range(2)),)
STEPS = 6


def test_weight_zero_is_plain_decoding_token_for_token(batch):
    adapter, inputs = batch
    plain = generate(adapter, inputs, max_new_tokens=STEPS)
    got = generate_guided(adapter, inputs, GUIDED, weight=0.0, max_new_tokens=STEPS)
    assert torch.equal(got.tokens, plain.tokens) and got.text == plain.text
    ok = ~torch.isnan(plain.step_logits)
    assert torch.allclose(got.step_logits[ok], plain.step_logits.log_softmax(-1)[ok], atol=1e-5)
    assert (got.captures["guidance"][0] == 0).all()


def test_weight_one_is_the_guided_branch_alone(batch):
    adapter, inputs = batch
    guided = generate(adapter, inputs, GUIDED, max_new_tokens=STEPS)
    got = generate_guided(adapter, inputs, GUIDED, weight=1.0, max_new_tokens=STEPS)
    assert torch.equal(got.tokens, guided.tokens)
    # and a weight between mixes the two log-probabilities of the first step
    plain = generate(adapter, inputs, max_new_tokens=1).logits.log_softmax(-1)
    half = generate_guided(adapter, inputs, GUIDED, weight=0.5, max_new_tokens=1).logits
    assert torch.allclose(half, 0.5 * plain + 0.5 * guided.logits.log_softmax(-1), atol=1e-5)


class _Recorder:
    """A schedule that records the attention mass it is given and returns a fixed weight."""

    def __init__(self, w: float) -> None:
        self.w, self.seen = w, []

    def captures(self):
        return [Capture.attention("last+generated", ["video", "audio"], layers=[0, 1], name="mass")]

    def weight(self, step, mass, previous):
        self.seen.append((step, {i: m.clone() for i, m in mass["mass"].items()}, previous.clone()))
        return torch.full_like(previous, self.w)


def test_a_schedule_sees_the_plain_branchs_attention_of_each_step(batch):
    adapter, inputs = batch
    rec = _Recorder(0.0)
    got = generate_guided(adapter, inputs, GUIDED, weight=rec, max_new_tokens=STEPS)
    steps = got.tokens.shape[1]
    assert [s for s, _, _ in rec.seen][:steps] == list(range(steps))
    assert (rec.seen[0][2] == 0).all()  # previous weights start at zero
    # step 0 is the prompt's last query: the prefill capture of the same mass
    first = run(adapter, inputs, capture=[Capture.attention("last", ["video", "audio"], layers=[0, 1], name="m")])
    for layer in (0, 1):
        assert torch.allclose(rec.seen[0][1][layer], first.captures["m"][layer], atol=1e-5)
    # every step: with weight 0 both decodings feed the same tokens, so the plain generation's capture (the mean
    # over the 1 + STEPS query positions of last+generated, zero where no query ran) is the steps' sum / (1 + STEPS)
    cap = Capture.attention("last+generated", ["video", "audio"], layers=[0, 1], name="mass")
    plain = generate(adapter, inputs, max_new_tokens=STEPS, capture=[cap])
    for layer in (0, 1):
        total = sum(seen[layer] for _, seen, _ in rec.seen[:steps])
        assert torch.allclose(total / (1 + STEPS), plain.captures["mass"][layer], atol=1e-5)


def test_steering_and_guidance_compose(batch):
    """Interventions shared by both branches (a steer) apply to both: weight 0 equals steered plain decoding."""
    adapter, inputs = batch
    steer = (Steer("video", layers=range(adapter.n_layers), alpha=0.5),)
    plain = generate(adapter, inputs, steer, max_new_tokens=STEPS)
    got = generate_guided(adapter, inputs, GUIDED, weight=0.0, interventions=steer, max_new_tokens=STEPS)
    assert torch.equal(got.tokens, plain.tokens)


def test_a_guided_branch_acting_on_generated_tokens_only(batch):
    """The guided branch shares the plain one's prefill below its first acting position; one that acts only on
    generated tokens shares all of it, and weight 1 still equals it alone."""
    adapter, inputs = batch
    only_generated = (Knockout("generated", "video", layers=range(adapter.n_layers)),)
    alone = generate(adapter, inputs, only_generated, max_new_tokens=STEPS)
    got = generate_guided(adapter, inputs, only_generated, weight=1.0, max_new_tokens=STEPS)
    assert torch.equal(got.tokens, alone.tokens)
