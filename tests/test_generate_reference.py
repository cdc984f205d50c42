"""Generation through the engine against transformers' own greedy generate, on all three families, with a
left-padded batch of three samples of very different lengths (video frames, audio length, prompt words)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES

import avlens
from avlens import generate
from avlens.analyses.common import items_from_manifest
from avlens.models import Sample
from avlens.models.tiny import tiny_model
from avlens.reproduce import _organism_data

N_NEW = 6
# (video frames, audio seconds, prompt): the rows' prompt lengths differ by a factor of about four.
ROWS = [
    (2, 0.5, "what"),
    (6, 3.0, "what do you hear in this video and the audio clip"),
    (4, 1.5, "describe the sound of the bell"),
]


def _samples(adapter, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for frames, seconds, prompt in ROWS:
        video = rng.integers(0, 255, (frames, 56, 84, 3), dtype=np.uint8)
        audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        out.append(Sample(prompt, video=video, audio=audio if adapter.has_audio else None))
    return out


def _batch(adapter):
    inputs = adapter.prepare(_samples(adapter))
    valid = inputs.layout.valid
    lengths = valid.sum(1)
    # Left-padded: every row ends at the last column, two of the three rows have padding in front.
    assert bool(valid[:, -1].all()) and int((~valid[:, 0]).sum()) == 2
    assert int(lengths.max()) >= 2 * int(lengths.min()), lengths
    return inputs


@torch.no_grad()
def _reference(adapter, inputs, n=N_NEW):
    """transformers' greedy generate: new ids (B, n) (pad after a row's eos) and per-step logits (B, n, V)."""
    out = adapter.model.generate(
        **adapter.model_inputs(inputs),
        max_new_tokens=n,
        do_sample=False,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    ids = out.sequences[:, inputs.length :]
    return ids, torch.stack(out.logits, 1).float()


def _ends(ids: torch.Tensor, eos: list[int]) -> list[int]:
    """Per row, the number of generated tokens up to and including the first eos (or all of them)."""
    ends = []
    for row in ids.tolist():
        hit = [t for t, i in enumerate(row) if i in eos]
        ends.append(hit[0] + 1 if hit else len(row))
    return ends


def _assert_equal_to_reference(adapter, inputs, ours, ids, ref_logits):
    eos = adapter.eos_ids
    ends = _ends(ids, eos)
    assert ours.tokens.shape == (inputs.batch_size, max(ends)), (ours.tokens.shape, ends)
    assert ours.step_logits.shape[:2] == ours.tokens.shape
    for r, end in enumerate(ends):
        # Token for token up to the row's end (its eos included), then avlens's padding.
        assert ours.tokens[r, :end].tolist() == ids[r, :end].tolist(), (r, ours.tokens[r], ids[r])
        assert (ours.tokens[r, end:] == -1).all(), (r, ours.tokens[r])
        # The logits that produced each of the row's tokens are transformers' own.
        diff = (ours.step_logits[r, :end] - ref_logits[r, :end]).abs().max()
        assert diff <= 1e-4, (r, float(diff))
    return ends


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_transformers_greedy_on_a_left_padded_batch(models, family):
    adapter = models[family]
    inputs = _batch(adapter)
    ours = generate(adapter, inputs, max_new_tokens=N_NEW)
    ids, ref_logits = _reference(adapter, inputs)
    ends = _assert_equal_to_reference(adapter, inputs, ours, ids, ref_logits)
    assert sum(ends) >= inputs.batch_size * 2  # eos did not end the rows at once: something was generated
    # The rows generate different answers (the padding did not make them one).
    assert len({tuple(row) for row in ids.tolist()}) > 1


def _early_stopper(family: str):
    """A model of ``family`` whose greedy answer ends early in some rows of the batch but not in others.

    A random model seldom emits its eos; so take a token t that transformers' greedy generate emits in some row
    at step >= 1 and never in another row, and swap the lm_head rows of t and eos. Every row then generates what
    it did, with eos where it had t: the rows that had t stop there, the others go on.
    """
    adapter = tiny_model(family, layers=3, hidden=64, seed=1)  # our own copy: the session's is not changed
    inputs = _batch(adapter)
    ids, _ = _reference(adapter, inputs)
    eos = int(adapter.model.generation_config.eos_token_id)
    assert eos in adapter.eos_ids
    rows = [row.tolist() for row in ids]
    candidates = []
    for t in sorted({i for row in rows for i in row} - set(adapter.eos_ids)):
        first = [row.index(t) if t in row else None for row in rows]
        if None in first and any(s is not None and 1 <= s <= N_NEW - 2 for s in first):
            candidates.append((min(s for s in first if s is not None), t))
    assert candidates, f"no token to turn into eos in {rows}"
    _, t = min(candidates)
    with torch.no_grad():
        w = adapter.lm_head.weight
        w[[t, eos]] = w[[eos, t]].clone()
    return adapter, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_finish_early_equal_transformers_and_have_nan_step_logits(family):
    adapter, inputs = _early_stopper(family)
    ids, ref_logits = _reference(adapter, inputs)
    ends = _ends(ids, adapter.eos_ids)
    assert min(ends) <= N_NEW - 1 and max(ends) == N_NEW, ends  # the setup: some rows stop early, some do not
    assert min(ends) >= 2
    ours = generate(adapter, inputs, max_new_tokens=N_NEW)
    ends = _assert_equal_to_reference(adapter, inputs, ours, ids, ref_logits)
    for r, end in enumerate(ends):
        # A finished row has no logits after its eos (issue 9: "finished rows' step logits are NaN").
        nan_after = torch.isnan(ours.step_logits[r, end:]).all(-1).tolist()
        assert all(nan_after), f"row {r} ended after {end} tokens; steps after it all NaN: {nan_after}"
        assert bool(torch.isfinite(ours.step_logits[r, :end]).all()), (r, end)
    # The text stops at each row's end.
    eos = set(adapter.eos_ids)
    for r, end in enumerate(ends):
        expected = adapter.decode([i for i in ids[r, :end].tolist() if i not in eos])
        assert ours.text[r] == expected, r


def test_min_new_tokens_equals_transformers_on_a_model_that_stops_early(tmp_path):
    """The organism ends its answer after a word or two; with ``min_new_tokens`` both transformers' generate
    and the engine keep it from choosing an end-of-turn token before then, token for token."""
    adapter = avlens.load("organism:av-vision-heavy")
    manifest = _organism_data(tmp_path, 4, 0, None)
    items = items_from_manifest(manifest, {"hear": "What do you hear?"}, conditions=("factual",))[:3]
    inputs = adapter.prepare([it.sample for it in items], interleave=True)
    free = generate(adapter, inputs, max_new_tokens=12)
    assert free.tokens.shape[1] < 8  # it stops early on its own
    n = 10
    ours = generate(adapter, inputs, max_new_tokens=n, min_new_tokens=n)
    with torch.no_grad():
        ref = adapter.model.generate(
            **adapter.model_inputs(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    assert ours.tokens.shape == (3, n)
    assert ours.tokens.tolist() == ref[:, inputs.length :].tolist()
    assert not set(ours.tokens.flatten().tolist()) & set(adapter.eos_ids)
