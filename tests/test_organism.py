"""The organism: its tokenizer, its batches (equal to prepare), training lowers the loss, the shipped checkpoints."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import chunk_counts

import avlens
from avlens.organism.data import WORLD, Batcher, ExampleSampler, Mixture, load_bank, make_world
from avlens.organism.model import OrganismConfig, new_organism
from avlens.organism.train import Stage, stage2, train_stage
from avlens.organism.world import CLASSES, write_world

SMALL = OrganismConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vision_depth=1, audio_layers=1)


CHUNKED = replace(SMALL, seconds_per_chunk=1)
"""A clip layout of three interleaved chunks per 3 s clip (a candidate for organism v2)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(24, 3, root=tmp_path_factory.mktemp("worlds"))


@pytest.fixture(scope="module")
def bank(world):
    return load_bank(world)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    """24 clips of 3 s."""
    return write_world(tmp_path_factory.mktemp("world3"), 24, seed=3, cfg=replace(WORLD, duration=3.0))


@pytest.fixture(scope="module")
def bank3(world3):
    return load_bank(world3)


def test_bank_is_read_from_files(bank):
    assert bank.frames.shape == (24, 4, WORLD.height, WORLD.width, 3)  # 2 s at 2 fps
    assert bank.waves.shape[0] == 24 and abs(bank.waves.shape[1] - 32000) < 2000
    assert sorted(set(bank.labels)) == sorted(CLASSES)


def test_tokenizer_understands_questions_as_users_type_them():
    adapter = new_organism(SMALL)
    tok = adapter.tokenizer
    for a, b in (
        ("What do you see?", "what do you see"),
        ("Is there a sound of a BELL?", "is there a sound of a bell"),
    ):
        assert tok.encode(a, add_special_tokens=False)[: len(tok.encode(b, add_special_tokens=False))] == tok.encode(
            b, add_special_tokens=False
        )
    for q in (
        "What do you see?",
        "What do you hear?",
        "Is there a sound of drum?",
        "Do you see a gong?",
        "Describe what you see and hear.",
    ):
        assert tok.unk_token_id not in tok.encode(q, add_special_tokens=False), q
    with pytest.warns(UserWarning, match="vocabulary: zebra"):
        adapter.prepare([avlens.Sample("is there a zebra?", audio=np.full(16000, 0.1, dtype=np.float32))])


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_batches_equal_what_prepare_builds(bank, bank3, interleave, chunked):
    adapter = new_organism(CHUNKED if chunked else SMALL)
    bank = bank3 if chunked else bank
    batcher = Batcher(adapter, bank)
    sampler = ExampleSampler(bank, Mixture(unimodal=0.0, swapped=0.5, multi=0.0), seed=1)
    examples = [sampler.draw() for _ in range(6)]
    examples = [e for e in examples if e.layout_key == "va"][:3]
    batch = batcher.batch(examples, with_answers=False, interleave=interleave)
    inputs = adapter.prepare([bank.sample(e, str(i)) for i, e in enumerate(examples)], interleave=interleave)
    reference = adapter.model_inputs(inputs)
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["pixel_values_videos"], reference["pixel_values_videos"])
    n = batch["input_features"].shape[-1]
    assert torch.equal(batch["input_features"], reference["input_features"][..., :n])
    assert reference["feature_attention_mask"][:, n:].sum() == 0
    with torch.no_grad():
        ours = adapter.model(**batch).logits[:, -1]
        theirs = adapter.model(**reference).logits[:, -1]
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_checkpoint_keeps_its_clip_layout(world, world3, tmp_path):
    """fps and seconds per chunk are saved where a real checkpoint keeps them and used on loading: a 3 s clip of
    the world's mp4 at 1 s chunks interleaves 3 times (64 video + 25 audio tokens each), and 4 fps doubles the
    video tokens of a 2 s clip."""
    from avlens.models.base import Clip
    from avlens.organism.model import save_organism

    def layout_of(config: OrganismConfig, manifest) -> list[tuple[int, int]]:
        name = tmp_path / f"{config.seconds_per_chunk}-{config.fps}"
        save_organism(new_organism(config), name)
        adapter = avlens.load(name)
        assert adapter.options.fps == config.fps and adapter.model.config.seconds_per_chunk == config.seconds_per_chunk
        video = str(manifest.parent / json.loads(manifest.read_text().splitlines()[0])["video"])
        return chunk_counts(adapter.prepare([avlens.Sample("what do you hear?", clips=[Clip(video=video)])]).layout)

    assert layout_of(CHUNKED, world3) == [(64, 25)] * 3
    assert layout_of(SMALL, world3) == [(128, 50), (64, 25)]
    # 2 s clips decode to 2.048 s of audio: 51 audio tokens, the last one in a chunk of its own
    assert layout_of(SMALL, world) == [(128, 50), (0, 1)]
    assert layout_of(replace(SMALL, fps=4.0), world) == [(256, 50), (0, 1)]


def test_batchers_share_features_until_the_vision_weights_change(bank):
    adapter = new_organism(SMALL, seed=4)
    first = Batcher(adapter, bank)
    first.cache_video_features(adapter.model)
    second = Batcher(adapter, bank)
    second.cache_video_features(adapter.model)
    assert second.features is first.features and second.video_features is first.video_features
    grid = first.grid.expand(2, -1)
    with torch.no_grad():
        direct = adapter.model.model.get_video_features(first.pixels([0, 1]), grid).pooler_output
        next(adapter.model.model.visual.parameters()).add_(0.01)
        changed = adapter.model.model.get_video_features(first.pixels([0, 1]), grid).pooler_output
    assert (first.video_features[:2] - torch.stack(list(direct))).abs().max() <= 1e-5
    second.cache_video_features(adapter.model)  # new vision weights: computed again
    assert (second.video_features[:2] - torch.stack(list(changed))).abs().max() <= 1e-5
    assert not torch.allclose(second.video_features, first.video_features)


def test_a_step_split_by_length_has_the_loss_and_gradients_of_one_batch(bank, monkeypatch):
    from avlens.organism import train as train_module
    from avlens.organism.data import SkillMixture
    from avlens.organism.model import VOCABULARY_V2

    adapter = new_organism(SMALL, seed=4, vocabulary=VOCABULARY_V2)
    batcher = Batcher(adapter, bank)
    mixture = SkillMixture(text=True, text_which=0.3, text_choice=0.3, options=(2, 20))
    text_sampler, av_sampler = ExampleSampler(bank, mixture, seed=6), ExampleSampler(bank, Mixture(multi=0.0), seed=7)
    examples = [text_sampler.draw() for _ in range(40)] + [av_sampler.draw() for _ in range(6)]
    params = [p for p in adapter.model.parameters() if p.requires_grad]

    def step(piece: int) -> tuple[float, list[torch.Tensor]]:
        monkeypatch.setattr(train_module, "PIECE", piece)
        adapter.model.zero_grad(set_to_none=True)
        loss = train_module._lm_step(adapter.model, batcher, examples, random.Random(0))
        return float(loss), [None if p.grad is None else p.grad.clone() for p in params]

    text = [e for e in examples if e.layout_key == ""]
    monkeypatch.setattr(train_module, "PIECE", 8)
    pieces = train_module._pieces(batcher, text, False)
    lengths = [[len(batcher.prompt_ids(e, False)) for e in p] for p in pieces]
    every = [id(e) for p in pieces for e in p]
    assert len(pieces) == len(text) // 8 and sorted(every) == sorted(map(id, text))
    assert all(max(a) <= min(b) for a, b in itertools.pairwise(lengths))  # sorted by length
    assert sum(len(p) * max(n) for p, n in zip(pieces, lengths, strict=True)) < len(text) * max(map(max, lengths))
    one_loss, one_grads = step(10_000)  # each layout in one forward
    split_loss, split_grads = step(8)
    assert [g is None for g in one_grads] == [g is None for g in split_grads]
    assert sum(g is not None for g in one_grads) > 0.9 * len(params)  # (the encoders' too: the clips train them)
    assert abs(one_loss - split_loss) <= 1e-5 * abs(one_loss)
    for a, b in zip(one_grads, split_grads, strict=True):
        assert a is None or (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7


def test_a_few_training_steps_lower_the_loss(bank):
    adapter = new_organism(SMALL, seed=2)
    batcher = Batcher(adapter, bank)
    stage = Stage("stage0-audio", 40, {"audio": 1.0}, modality="audio", lr=3e-3, batch=16, warmup=2)
    log = train_stage(adapter, bank, stage, batcher=batcher)
    assert np.mean(log["loss"][-5:]) < np.mean(log["loss"][:5]) - 0.2
    # Language-model steps: the loss on a fixed batch goes down.
    fixed = [ExampleSampler(bank, Mixture(), seed=5).draw() for _ in range(8)]

    def loss() -> float:
        by = {}
        for e in fixed:
            by.setdefault(e.layout_key, []).append(e)
        total = 0.0
        with torch.no_grad():
            for group in by.values():
                b = batcher.batch(group, interleave=True)
                labels = b.pop("labels")
                total += float(adapter.model(**b, labels=labels).loss) * len(group)
        return total / len(fixed)

    before = loss()
    train_stage(
        adapter,
        bank,
        replace(stage2(steps=12, trainable="audio+lm", unimodal=0.2, swapped=0.2), batch=8, warmup=2),
        batcher=batcher,
    )
    assert loss() < before


def test_training_resumes_where_it_stopped(bank, tmp_path):
    stage = Stage("stage0-audio", 6, {"audio": 1.0}, modality="audio", batch=8)
    straight = new_organism(SMALL, seed=3)
    train_stage(straight, bank, stage)

    class Stop(Exception):
        pass

    def stop_at_3(done: int, total: int, loss: float) -> None:
        if done == 3:
            raise Stop

    state = tmp_path / "state.pt"
    resumed = new_organism(SMALL, seed=3)
    with pytest.raises(Stop):
        train_stage(resumed, bank, stage, state_path=state, save_every=2, progress=stop_at_3)
    assert torch.load(state, weights_only=False)["step"] == 2
    log = train_stage(resumed, bank, stage, state_path=state, save_every=2)
    assert len(log["loss"]) == 6
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_shipped_checkpoints_load_offline_and_answer(tmp_path):
    """The shipped organism loads through the Qwen2.5-Omni adapter like any checkpoint and answers
    held-out clips (a smoke check; MODEL.md has the full evaluation)."""
    from avlens.organism.checkpoints import SHIPPED, checkpoint_path
    from avlens.organism.evaluate import answer, records, summary, world_items

    world = make_world(24, 4242, swapped_share=0.5, root=tmp_path)
    for name in SHIPPED:
        path = checkpoint_path(name)
        assert (path / "MODEL.md").exists() and (path / "config.json").exists()
        adapter = avlens.load(f"organism:{name}")
        assert (
            adapter.family == "qwen2.5-omni"
            and type(adapter.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
        )
        items = world_items(world, yes_no=False, describe=False, multi=0)
        s = summary(records(items, answer(adapter, items)))
        assert s["video_only_see"] >= 0.85, (name, s)
        if name != "vl-base":
            assert s["congruent_see"] >= 0.8 and s["congruent_hear"] >= 0.8, (name, s)
            assert s["audio_only_hear"] >= 0.7, (name, s)
        if name == "av-balanced":
            assert s["swapped_by_modality"] >= 0.7, s
    assert avlens.load("organism").source == str(checkpoint_path("av-vision-heavy"))


def test_activation_magnitudes_match_forward_hooks_on_the_decoder_layers(bank):
    """The massive-activation measure equals max|h| / median|h| of each decoder layer's own output, read by forward
    hooks on transformers' modules (reference), and names where the largest sits."""
    from avlens.organism.evaluate import activation_magnitudes

    adapter = new_organism(SMALL, seed=5)
    with torch.no_grad():  # plant a massive activation: a large bias on one dimension of the first layer's MLP
        adapter.model.model.language_model.layers[0].mlp.down_proj.weight[7].mul_(300.0)
    sample = bank.sample(ExampleSampler(bank, Mixture(unimodal=0, multi=0), 0).draw(), "s0")
    df = activation_magnitudes(adapter, [sample])
    outputs = {}
    layers = adapter.model.model.language_model.layers

    def keep(k: int):
        def hook(module, args, output):
            outputs[k + 1] = output[0] if isinstance(output, tuple) else output

        return hook

    hooks = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            adapter.model(**adapter.model_inputs(adapter.prepare([sample], interleave=True)))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(df.layer) == list(range(1, len(layers) + 1))
    for row in df.itertuples():
        a = outputs[row.layer][0].abs()
        assert row.top_ratio == pytest.approx(float(a.max() / a.median()), rel=1e-4)
    assert set(df.dim) == {7}  # the planted dimension carries the largest activation at every layer
    assert df.top_ratio.min() > 20
