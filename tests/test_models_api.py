"""The adapters' public API beyond prepare: loading errors that name the problem, and Inputs from one's own ids."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, av_samples, samples_for

import avlens
from avlens.models.tiny import tiny_model

MEDIA_TENSORS = (
    "input_features",
    "feature_attention_mask",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
    "second_per_grid_ts",
    "pixel_values",
    "image_grid_thw",
    "use_audio_in_video",
)
"""What a user brings beside the ids: the media features and flags (mm_token_type_ids is derived)."""


def _own_tensors(inputs: avlens.Inputs) -> dict:
    return {k: v for k, v in inputs.tensors.items() if k in MEDIA_TENSORS}


def _assert_same_layout(got: avlens.TokenLayout, want: avlens.TokenLayout) -> None:
    assert got.names == want.names
    assert torch.equal(got.valid, want.valid)
    for name in want.names:
        assert torch.equal(got.groups[name], want.groups[name]), name


def _prepared(adapter, interleave: bool | None):
    if interleave:
        return adapter.prepare(av_samples(0, n=3), interleave=True)
    return adapter.prepare(samples_for(adapter, n=3))


CASES = [(f, None) for f in FAMILIES] + [(f, True) for f in FAMILIES if f != "qwen2.5-vl"]


@pytest.mark.parametrize(("family", "interleave"), CASES)
def test_inputs_from_ids_equal_the_prepared_batch(models, family, interleave):
    """Inputs built from a prepared (padded) batch's own ids and media tensors have the same layout groups (chunks
    of interleaved spans included), the same derived tensors, and give the same logits."""
    adapter = models[family]
    prepared = _prepared(adapter, interleave)
    assert prepared.batch_size == 3 and not bool(prepared.tensors["attention_mask"].all())  # padded
    if interleave:
        assert any(n.startswith("chunk") for n in prepared.layout.names)
    own = adapter.inputs_from_ids(prepared.input_ids, prepared.tensors["attention_mask"], **_own_tensors(prepared))
    _assert_same_layout(own.layout, prepared.layout)
    assert set(own.tensors) == set(prepared.tensors)
    for k, v in prepared.tensors.items():
        assert torch.equal(own.tensors[k], v) if isinstance(v, torch.Tensor) else own.tensors[k] == v, k
    assert own.samples == []
    with torch.no_grad():
        want = avlens.run(adapter, prepared).logits
        got = avlens.run(adapter, own).logits
    assert torch.equal(got, want)


def test_inputs_from_ids_without_media_or_template(omni):
    """Plain text ids (one row, no chat template): every position valid, no question derived (no user header), so
    one names it; a derived group of the same name is replaced and listed once."""
    ids = omni.tokenizer.encode("what do you hear", add_special_tokens=False)
    plain = omni.inputs_from_ids(ids)
    assert plain.input_ids.shape == (1, len(ids)) and bool(plain.tensors["attention_mask"].all())
    assert plain.layout.counts(0)["question"] == 0
    assert plain.layout.positions("last", 0).tolist() == [len(ids) - 1]
    inputs = omni.inputs_from_ids(ids, groups={"question": torch.ones(1, len(ids)), "tail": torch.arange(len(ids)) > 1})
    assert inputs.layout.positions("question", 0).tolist() == list(range(len(ids)))
    assert inputs.layout.positions("tail", 0).tolist() == list(range(2, len(ids)))
    assert inputs.layout.names.count("question") == 1
    assert torch.equal(avlens.run(omni, inputs).logits, avlens.run(omni, plain).logits)


def test_inputs_from_ids_refuses_bad_shapes(omni):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(avlens.InputError, match="left-padded"):
        omni.inputs_from_ids(ids, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(avlens.InputError, match="shape"):
        omni.inputs_from_ids(ids, torch.ones(2, 4))
    with pytest.raises(avlens.InputError, match="at least one token"):
        omni.inputs_from_ids(ids, torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(avlens.InputError, match="group 'mine'"):
        omni.inputs_from_ids(ids, groups={"mine": torch.ones(2, 2)})


def test_checkpoint_without_tokenizer_is_named_as_such(tmp_path):
    """A checkpoint directory whose tokenizer files are gone: one ModelNotFoundError saying so (the config loads
    first; transformers' own message is cut short)."""
    directory = tmp_path / "no-tokenizer"
    tiny_model("qwen2.5-omni", save_to=directory)
    for path in directory.iterdir():
        if path.name.startswith("tokenizer") or path.name.endswith(".jinja"):
            path.unlink()
    with pytest.raises(avlens.ModelNotFoundError, match="no tokenizer in the directory") as caught:
        avlens.load(directory)
    assert str(directory) in str(caught.value) and "tokenizer.json" in str(caught.value)


def test_broken_config_is_named_before_the_tokenizer(tmp_path):
    directory = tmp_path / "broken"
    tiny_model("qwen2.5-vl", save_to=directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(avlens.ModelNotFoundError, match="not a loadable checkpoint directory"):
        avlens.load(directory)


def test_organism_names_resolve_only_at_the_package_root():
    """avlens.load knows the organism's names; the model loader below it loads paths and hub ids only."""
    from avlens.models import load as load_checkpoint
    from avlens.organism.checkpoints import checkpoint_path

    assert avlens.load("organism:av-balanced").source == str(checkpoint_path("av-balanced"))
    with pytest.raises(avlens.ModelNotFoundError, match="no organism checkpoint 'nope'"):
        avlens.load("organism:nope")
    with pytest.raises(avlens.ModelNotFoundError):
        load_checkpoint("organism:av-balanced")
