"""The organism-v2 skill questions about a held-out world (evaluate.skill_items): well formed, in their counts,
apart from the v1 items, scored by modality, and answerable through ``prepare`` with the v2 vocabulary; and the
world's sizes as a setting of a recipe setup."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, replace

import pytest
import torch
from conftest import chunk_counts

from avlens.organism.card import accuracy_table, follows_table
from avlens.organism.data import LETTERS_V2, WORLD, make_world, world_dir
from avlens.organism.evaluate import SkillItems, answer, records, summary, world_items
from avlens.organism.model import VOCABULARY_V2_LETTERS, OrganismConfig, new_organism
from avlens.organism.recipes import V2_WORLD, Pipeline, Setup
from avlens.organism.world import CLASSES

SMALL = OrganismConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vision_depth=1, audio_layers=1)
SKILLS = SkillItems(per_row=15)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(24, 11, swapped_share=0.5, root=tmp_path_factory.mktemp("worlds"))


@pytest.fixture(scope="module")
def rows(world):
    return {json.loads(x)["id"]: json.loads(x) for x in world.read_text().splitlines() if x.strip()}


@pytest.fixture(scope="module")
def items(world):
    return world_items(world, yes_no=False, describe=False, multi=0, skills=SKILLS)


def test_v1_items_are_the_same_with_or_without_skills(world, items):
    plain = world_items(world, yes_no=False, describe=False, multi=0)
    assert [(i.sample.id, i.sample.prompt, i.kind, i.condition) for i in items[: len(plain)]] == [
        (i.sample.id, i.sample.prompt, i.kind, i.condition) for i in plain
    ]
    assert all(not i.kind.startswith(("which2", "which3", "choice")) for i in plain)


def test_lettered_choice_items_point_at_the_asked_modality(items, rows):
    choice = [i for i in items if i.kind.startswith("choice")]
    congruent = sum(r["condition"] == "congruent" for r in rows.values())
    counts = Counter((i.condition, i.kind) for i in choice)
    assert counts[("congruent", "choice-hear")] == counts[("congruent", "choice-see")] == congruent
    assert counts[("audio-only", "choice-hear")] == counts[("video-only", "choice-see")] == congruent
    assert counts[("swapped", "choice-hear")] == len(rows) - congruent > 0
    sizes = set()
    for it in choice:
        listed = re.findall(r"\b([b-v])\. (\w+)", it.sample.prompt)
        n = len(listed)
        sizes.add(n)
        assert 4 <= n <= 20 and tuple(w for _, w in listed) == it.options and len(set(it.options)) == n
        assert [letter for letter, _ in listed] == list(LETTERS_V2[:n])
        row = rows[it.sample.id]
        right = row["audio_label"] if it.kind == "choice-hear" else row["visual_label"]
        assert it.options[LETTERS_V2.index(it.expected)] == right
        if it.condition == "swapped":  # the other modality's class is a distractor
            other = row["visual_label"] if it.kind == "choice-hear" else row["audio_label"]
            assert other in it.options and other != right
        has_audio = it.sample.audio is not None or (it.sample.video is not None and it.sample.video_audio)
        assert has_audio == (it.condition != "video-only")
    assert len(sizes) > 8  # option counts spread over 4..20


@pytest.mark.parametrize("n", [2, 3])
def test_which_clip_items_have_exactly_one_clip_with_x(items, rows, n):
    for hear in (True, False):
        kind = f"which{n}-{'hear' if hear else 'see'}"
        sel = [i for i in items if i.kind == kind]
        assert len(sel) == SKILLS.per_row
        for it in sel:
            ids = it.sample.id.split("+")
            assert len(ids) == n == len(it.sample.clips) and it.condition == "multi-clip"
            x = re.search(r"(?:sound of|shows) an? (\w+)\?$", it.sample.prompt).group(1)
            key = "audio_label" if hear else "visual_label"
            assert all(rows[i]["condition"] == "congruent" for i in ids)
            assert [rows[i][key] == x for i in ids] == [str(k + 1) == it.expected for k in range(n)]
        answers = Counter(i.expected for i in sel)
        assert len(answers) == n  # the right clip is placed anywhere


def test_audio_only_yes_no_has_both_classes(items, rows):
    sel = [i for i in items if (i.condition, i.kind) == ("audio-only", "hear-yn")]
    assert len(sel) == sum(r["condition"] == "congruent" for r in rows.values())
    for it in sel:
        x = re.search(r"(?:sound of|hear) (?:an? )?(\w+)\?$", it.sample.prompt).group(1)
        assert (x == rows[it.sample.id]["audio_label"]) == (it.expected == "yes") and x in CLASSES


def test_letter_answers_are_scored_and_classified_by_the_option_they_pick(items):
    """A letter answer counts as the option word it picks: `follows` on swapped clips says which modality's class
    that option is; a letter outside the options follows neither."""
    sel = [i for i in items if i.condition == "swapped" and i.kind == "choice-hear"][:3]
    a, v = sel[0].audio_label, sel[0].visual_label
    picks = [LETTERS_V2[sel[0].options.index(a)], LETTERS_V2[sel[0].options.index(v)], "v" * 2]
    df = records([sel[0]] * 3, picks)
    assert df.correct.tolist() == [True, False, False]
    assert df.follows.tolist() == ["audio", "visual", "neither"]
    assert "What do you hear? (lettered options" in follows_table(df)


def test_skill_items_are_answered_through_prepare_with_the_v2_vocabulary(items):
    """Every skill prompt is made of words the v2 tokenizer knows, and the batched answers equal one-by-one answers
    (mixed layouts: single clips, audio-only, video-only, 2 and 3 clips)."""
    adapter = new_organism(SMALL, seed=1, vocabulary=VOCABULARY_V2_LETTERS)
    skill = [i for i in items if i.kind.startswith(("which2", "which3", "choice")) or i.kind == "hear-yn"]
    unk = adapter.tokenizer.unk_token_id
    for it in skill:
        ids = adapter.tokenizer.encode(it.sample.prompt.lower(), add_special_tokens=False)
        assert unk not in ids, it.sample.prompt
    picked = [*skill[:3], *[i for i in skill if i.kind.startswith("which3")][:2]]
    torch.manual_seed(0)
    batched = answer(adapter, picked)
    alone = [answer(adapter, [it])[0] for it in picked]
    assert batched == alone
    df = records(picked, batched)
    s = summary(df)
    assert set(s) >= {"multi_clip_which3_hear"} or set(s) >= {"multi_clip_which3_see"}
    table = accuracy_table(df)
    assert "Which of 3 clips" in table and "Which clip has the sound of X? (two clips)" not in table


def test_the_world_is_a_setting_of_the_setup(tmp_path):
    """A setup's world sizes decide where its worlds are kept and what the training world holds; the default
    keeps v1's world directories."""
    three = replace(WORLD, duration=3.0, onset=(0.5, 2.0))
    assert world_dir(24, 0, 0.0, tmp_path) == world_dir(24, 0, 0.0, tmp_path, WORLD)
    assert world_dir(24, 0, 0.0, tmp_path, three) != world_dir(24, 0, 0.0, tmp_path)
    setup = Setup(train_clips=12, test_clips=12, world=three)
    manifest = Pipeline(tmp_path, setup, None, tmp_path).train_manifest()
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(rows) == 12 and all(0.5 <= r["audio_onset"] <= 2.0 for r in rows)
    assert manifest.parent == world_dir(12, 0, 0.0, tmp_path, three)


def _tiny_v2_setup() -> Setup:
    """A v2 setup (its vocabulary, 3 s clips with late sounds at 1 s chunks, skill shares) small enough to train
    in seconds."""
    from avlens.organism.train import STAGE0_AUDIO, STAGE0_TEXT, STAGE0_VISION, STAGE1

    return Setup(
        train_clips=12,
        test_clips=12,
        model=replace(SMALL, seconds_per_chunk=1),
        world=V2_WORLD,
        vocabulary=VOCABULARY_V2_LETTERS,
        stage0_text=replace(STAGE0_TEXT, steps=2, batch=8),
        stage0_audio=replace(STAGE0_AUDIO, steps=1),
        stage0_vision=replace(STAGE0_VISION, steps=1),
        stage1=replace(STAGE1, steps=2, batch=8),
        skills={"which": 0.3, "choice": 0.3, "options": (2, 8), "letters": LETTERS_V2},
        skill_items=SkillItems(per_row=2, options=(4, 8)),
    )


def test_a_trained_checkpoint_records_its_world_and_the_shipped_world_is_read_from_them(tmp_path, monkeypatch):
    """train() records the setup's world in organism.json; shipped_world() (the world reproduce draws its held-out
    clips from) is that world, v1's WORLD for checkpoints that record none, and refused when they disagree."""
    import shutil

    from avlens.errors import ModelNotFoundError
    from avlens.organism import checkpoints
    from avlens.organism.recipes import train

    directory = train("vl-base", tmp_path / "runs", setup=_tiny_v2_setup(), world_root=tmp_path / "worlds")
    assert json.loads((directory / "organism.json").read_text())["world"] == json.loads(json.dumps(asdict(V2_WORLD)))
    here = tmp_path / "package"
    for name in checkpoints.SHIPPED:
        shutil.copytree(directory, here / name)
    monkeypatch.setattr(checkpoints, "HERE", here)
    assert checkpoints.shipped_world() == V2_WORLD

    def forget_world(name: str) -> None:  # (as v1's checkpoints, trained before the world was recorded)
        card = here / name / "organism.json"
        card.write_text(json.dumps({k: v for k, v in json.loads(card.read_text()).items() if k != "world"}))

    forget_world(checkpoints.DEFAULT)
    with pytest.raises(ModelNotFoundError, match="different worlds"):
        checkpoints.shipped_world()
    for name in checkpoints.SHIPPED:
        forget_world(name)
    assert checkpoints.shipped_world() == WORLD


def test_a_v2_setup_trains_its_skills_in_the_chunked_layout_and_asks_them(tmp_path):
    """A setup with the v2 vocabulary, 3 s clips at 1 s chunks and skill shares: its stage 2 draws which-of-N and
    lettered examples (and v1's default setup keeps a plain stage 2), a 3-clip training batch equals what
    ``prepare`` builds, and the held-out evaluation asks the skill questions."""
    from avlens.organism.data import Batcher, ExampleSampler, SkillMixture, load_bank
    from avlens.organism.evaluate import evaluate_world
    from avlens.organism.recipes import RECIPES
    from avlens.organism.train import stage2

    setup = _tiny_v2_setup()
    pipe = Pipeline(tmp_path, setup, None, tmp_path)
    assert type(Pipeline(tmp_path, Setup())._stage2(RECIPES["av-balanced"].stage2).mixture).__name__ == "Mixture"
    stage = pipe._stage2(stage2(steps=3, trainable="audio+lm-full", unimodal=0.1, swapped=0.3))
    assert isinstance(stage.mixture, SkillMixture) and stage.mixture.which == 0.3 and stage.mixture.swapped == 0.3
    adapter, directory, logs = pipe.recipe("sweep", replace(stage, batch=8))
    assert [len(log["loss"]) for log in logs] == [2, 1, 1, 2, 3]
    assert json.loads((directory / "organism.json").read_text())["stage"]["mixture"]["choice"] == 0.3

    bank = load_bank(pipe.train_manifest())
    sampler = ExampleSampler(bank, stage.mixture, seed=2)
    three = next(e for e in iter(sampler.draw, None) if len(e.clips) == 3)
    lettered = next(e for e in iter(sampler.draw, None) if e.kind.startswith("choice") and e.video is not None)
    for ex in (three, lettered):
        batch = Batcher(adapter, bank).batch([ex], with_answers=False)
        reference = adapter.model_inputs(adapter.prepare([bank.sample(ex)], interleave=True))
        assert torch.equal(batch["input_ids"], reference["input_ids"])
        assert (batch["input_ids"] == adapter.tokenizer.unk_token_id).sum() == 0
        with torch.no_grad():
            ours, theirs = adapter.model(**batch).logits[:, -1], adapter.model(**reference).logits[:, -1]
        assert (ours - theirs).abs().max() <= 1e-5
    df = evaluate_world(adapter, pipe.test_manifest(), yes_no=False, describe=False, multi=0, skills=setup.skill_items)
    assert {"which3-hear", "which2-see", "choice-hear", "choice-see"} <= set(df.kind)


def test_the_v2_setup_interleaves_three_chunks_with_a_late_sound(tmp_path):
    """setup_v2 (issue 11 items 1-2): 8 decoder layers; a clip of its world, read by a saved and reloaded
    checkpoint of its config, is 3 chunks of 64 video + 25 audio tokens (video 2.56x the audio), and its sound
    starts inside the clip (the manifest's audio_onset, in the world's onset range)."""
    import avlens
    from avlens.models.base import Clip
    from avlens.organism.model import save_organism
    from avlens.organism.recipes import setup_v2

    setup = setup_v2()
    assert setup.model.layers == 8 and setup.stage0_text.steps == 6000
    config = replace(setup.model, vision_depth=1, audio_layers=1)  # (the layout does not depend on depth)
    save_organism(new_organism(config, vocabulary=setup.vocabulary), tmp_path / "v2")
    adapter = avlens.load(tmp_path / "v2")
    manifest = make_world(4, 5, root=tmp_path / "worlds", world=setup.world)
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    lo, hi = setup.world.onset
    assert all(lo <= r["audio_onset"] <= hi for r in lines)
    video = str(manifest.parent / lines[0]["video"])
    layout = adapter.prepare([avlens.Sample("what do you hear?", clips=[Clip(video=video)])]).layout
    assert chunk_counts(layout) == [(64, 25)] * 3
    from avlens.organism.card import _layout

    assert "chunks of 1 s, each 64 video tokens and 25 audio tokens" in _layout(asdict(config))  # (MODEL.md's words)
    assert "chunks of 2 s, each 128 video tokens and 50 audio tokens" in _layout(asdict(SMALL))


def test_the_organism_commands_train_the_v2_setup_with_v2(tmp_path, monkeypatch):
    """``avlens organism train --v2`` hands setup_v2 to the pipeline (without it, v1's Setup)."""
    from typer.testing import CliRunner

    from avlens import cli
    from avlens.organism import recipes

    seen = []

    def fake_train(name, out, *, setup, progress=None):
        seen.append((name, setup))
        return tmp_path

    monkeypatch.setattr(recipes, "train", fake_train)
    for flags in (["--v2"], []):
        args = ["organism", "train", "--recipe", "vl-base", "--out", str(tmp_path), "--seed", "3", "--no-evaluate"]
        result = CliRunner().invoke(cli.app, [*args, *flags])
        assert result.exit_code == 0, result.output
    assert seen == [("vl-base", recipes.setup_v2(3)), ("vl-base", Setup(seed=3))]
