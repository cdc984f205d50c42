"""The organism's recipes, the pipeline that trains them, and the stage-2 sweep.

``train(recipe, out)`` runs the stages a recipe needs, reusing any stage already trained under ``out`` (stages
are keyed by their settings and everything before them), so training ``av-balanced`` after
``av-vision-heavy`` into the same directory trains only its own stage 2. Each trained checkpoint is a Hugging
Face directory with organism.json (recipe, seed, training time, losses) and, once evaluated, MODEL.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..models import load
from .data import LETTERS_V2, WORLD, Batcher, SkillMixture, load_bank, make_world
from .evaluate import (
    SkillItems,
    activation_magnitudes,
    bank_examples,
    evaluate_bank,
    evaluate_world,
    summary,
    world_items,
)
from .model import VOCABULARY, VOCABULARY_V2_LETTERS, OrganismConfig, new_organism, save_organism
from .train import STAGE0_AUDIO, STAGE0_TEXT, STAGE0_VISION, STAGE1, Recipe, Stage, stage2, train_stage
from .world import WorldConfig

TRAIN_CLIPS = 1200
TEST_CLIPS = 240
STAGE1_STEPS = STAGE1.steps

RECIPES: dict[str, Recipe] = {
    "vl-base": Recipe(
        "vl-base",
        None,
        "The vision-language base: encoders pretrained on their own modality, then the language model trained "
        "on video questions (what do you see, do you see X, describe what you see). Never trained with audio.",
    ),
    "av-vision-heavy": Recipe(
        "av-vision-heavy",
        stage2(steps=250, trainable="audio+lm", unimodal=0.1, swapped=0.0),
        "Audio-visual training from the base as real AVLLMs are aligned: the audio encoder trains, the language "
        "model at 0.1x the learning rate, vision frozen; congruent clips plus 10% unimodal ones; no clip whose "
        "sound disagrees with its picture.",
        {"steps": 250, "trainable": "audio+lm", "unimodal": 0.1, "swapped": 0.0},
    ),
    "av-balanced": Recipe(
        "av-balanced",
        stage2(steps=250, trainable="audio+lm-full", unimodal=0.1, swapped=0.3),
        "As av-vision-heavy, but the language model trains at the full learning rate and 30% of audio-visual "
        "clips carry the sound of an unrelated class, their hearing answer being that sound: the model must "
        "answer by modality.",
        {"steps": 250, "trainable": "audio+lm-full", "unimodal": 0.1, "swapped": 0.3},
    ),
}
DEFAULT = "av-vision-heavy"


@dataclass(frozen=True)
class Setup:
    """What every recipe shares: sizes, the training and test worlds, the seed."""

    seed: int = 0
    train_clips: int = TRAIN_CLIPS
    test_clips: int = TEST_CLIPS
    model: OrganismConfig = field(default_factory=OrganismConfig)
    stage0_text: Stage = STAGE0_TEXT
    stage0_audio: Stage = STAGE0_AUDIO
    stage0_vision: Stage = STAGE0_VISION
    stage1: Stage = STAGE1
    world: WorldConfig = WORLD
    vocabulary: tuple[str, ...] = VOCABULARY
    skills: dict = field(default_factory=dict)
    """SkillMixture fields added to every stage-2 mixture (e.g. ``{"which": 0.1, "choice": 0.2, ...}``); none
    by default (v1)."""
    skill_items: SkillItems | None = None
    """The organism-v2 skill questions of the held-out evaluation (none by default: v1's questions only)."""

    def stage2(self, stage: Stage) -> Stage:
        """A recipe's stage 2 as this setup trains it: its seed, and the setup's skills in its mixture."""
        mixture = stage.mixture
        if self.skills:
            mixture = SkillMixture(**{**asdict(mixture), **self.skills})
        return replace(stage, seed=self.seed, mixture=mixture)


V2_WORLD = replace(WORLD, duration=3.0, onset=(0.5, 2.0))
"""The v2 world: 3 s clips (three 1 s chunks), each clip's sound starting 0.5-2 s in (background noise before)."""
V2_SKILLS = {"which": 0.15, "choice": 0.2, "which_clips": (2, 3), "options": (4, 20), "letters": LETTERS_V2}
"""The skills added to every v2 stage-2 mixture."""


def setup_v2(
    seed: int = 0,
    *,
    text_steps: int = 6000,
    text_shares: tuple[float, float, float] = (0.2, 0.2, 0.2),
) -> Setup:
    """The organism-v2 setup (issue 11): 8 decoder layers at hidden 128 (4 heads, 2 KV heads, FFN 384), the v2
    words and option letters, 3 s clips whose sound starts at 0.5-2 s, laid out in 1 s chunks (3 interleaved
    chunks of 64 video + 25 audio tokens), and the skills about several clips and lettered options in every
    stage that has language:

    - stage 0 text: the text skills (``text_shares``: which of 2-3 clips, lettered multiple choice, option
      lookup; the rest see / hear / yes-no / describe) with 2-20 options, both counts growing over the first
      quarter of the draws; lr 3e-4, batch 48, warm-up 100 (the text-stage sweep's best point for lettered
      multiple choice, docs/organism-v2-status.md); 6000 steps, about what the first whole v2 job (36.1 min
      with 4500 steps at 0.229 s each) leaves room for in the 45 minutes;
    - stage 1: 20% lettered "what do you see?" about one clip, 4-20 options;
    - stage 2: 15% which of 2-3 clips, 20% lettered questions (4-20 options);
    - evaluation: the held-out skill rows of :class:`SkillItems` (120 questions per row).
    """
    which, choice, lookup, batch = *text_shares, 48
    text = SkillMixture(
        text=True,
        text_which=which,
        text_choice=choice,
        text_lookup=lookup,
        which_clips=(2, 3),
        options=(2, 20),
        curriculum=int(text_steps * batch * 0.25),  # (draws: the first quarter of the steps)
        letters=LETTERS_V2,
    )
    vl = SkillMixture(audio=False, unimodal=0.0, multi=0.0, choice=0.2, options=(4, 20), letters=LETTERS_V2)
    return Setup(
        seed=seed,
        model=OrganismConfig(layers=8, hidden=128, heads=4, kv_heads=2, ffn=384, seconds_per_chunk=1),
        stage0_text=Stage("stage0-text", text_steps, {"lm": 1.0}, text, lr=3e-4, batch=batch, warmup=100),
        stage1=replace(STAGE1, mixture=vl),
        world=V2_WORLD,
        vocabulary=VOCABULARY_V2_LETTERS,
        skills=dict(V2_SKILLS),
        skill_items=SkillItems(),
    )


def _key(*parts: object) -> str:
    blob = json.dumps(
        [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


_BANKS: dict[tuple[Path, float], object] = {}
Progress = Callable[[str, int, int, float | None], None]
"""progress(task, done, total, loss)."""


class Pipeline:
    """Trains stages into ``out/stages/<name>-<key>/``, each reused when it is already there."""

    def __init__(
        self, out: Path, setup: Setup = Setup(), progress: Progress | None = None, world_root: Path | None = None
    ):
        self.out, self.setup, self.progress = Path(out), setup, progress
        self.world_root = world_root
        self._bank = None
        self._batcher = None
        self._loaded: list = []  # a base loaded ahead by load_base, for the next recipe() call

    def _say(self, task: str, done: int, total: int, loss: float | None = None) -> None:
        if self.progress is not None:
            self.progress(task, done, total, loss)

    @property
    def bank(self):
        if self._bank is None:
            key = (self.train_manifest(), self.setup.model.fps)
            if key not in _BANKS:  # decoded once per process: every recipe trained here shares it
                self._say("decoding the training world", 0, 1)
                _BANKS.clear()
                _BANKS[key] = load_bank(key[0], fps=key[1])
            self._bank = _BANKS[key]
        return self._bank

    def train_manifest(self) -> Path:
        """The training world (written once)."""
        s = self.setup
        return make_world(
            s.train_clips,
            s.seed,
            root=self.world_root,
            progress=lambda i: self._say("writing the training world", i, s.train_clips),
            world=s.world,
        )

    def test_manifest(self) -> Path:
        s = self.setup
        return make_world(
            s.test_clips,
            s.seed + 1000,
            swapped_share=0.5,
            root=self.world_root,
            progress=lambda i: self._say("writing the test world", i, s.test_clips),
            world=s.world,
        )

    def test_manifest_congruent(self) -> Path:
        """A held-out world of congruent clips only (a bank for the sweep's quick measurements)."""
        s = self.setup
        return make_world(s.test_clips, s.seed + 2000, root=self.world_root, world=s.world)

    def _stage(self, adapter, stage: Stage, key: str) -> tuple[object, Path, dict]:
        """Train one stage (or load it if done); returns (adapter, checkpoint dir, log)."""
        directory = self._stage_dir(stage, key)
        if (directory / "organism.json").exists():
            loaded = load(directory)
            loaded.organism_config = self.setup.model
            return loaded, directory, json.loads((directory / "organism.json").read_text())["log"]
        if self._batcher is None or self._batcher.adapter is not adapter:
            self._batcher = Batcher(adapter, self.bank)
        state = directory.with_name(f"{directory.name}.state.pt")
        state.parent.mkdir(parents=True, exist_ok=True)
        log = train_stage(
            adapter,
            self.bank,
            stage,
            state_path=state,
            batcher=self._batcher,
            progress=lambda d, t, loss: self._say(stage.name, d, t, loss),
        )
        save_organism(adapter, directory, {"stage": asdict(stage), "log": log})
        state.unlink(missing_ok=True)
        return adapter, directory, log

    def base(self) -> tuple[object, Path, list[dict]]:
        """The vision-language base (stage 0 audio, stage 0 vision, stage 1)."""
        s = self.setup
        adapter = new_organism(s.model, seed=s.seed, vocabulary=s.vocabulary)
        logs = []
        key = _key(s.model, s.seed, s.train_clips)
        if s.world != WORLD or s.vocabulary != VOCABULARY:  # (v1's keys, hence its trained stages, stay as they were)
            key = _key(key, s.world, s.vocabulary)
        for stage in (s.stage0_text, s.stage0_audio, s.stage0_vision, s.stage1):
            stage = replace(stage, seed=s.seed)
            key = _key(key, stage)
            adapter, directory, log = self._stage(adapter, stage, key)
            logs.append(log)
        self._base_key = key
        return adapter, directory, logs

    def recipe(self, name: str, stage: Stage | None = None) -> tuple[object, Path, list[dict]]:
        """A recipe's checkpoint (``stage`` overrides its stage 2, for sweeps)."""
        adapter, directory, logs = self._loaded.pop() if self._loaded else self.base()
        stage = self._stage2(stage or RECIPES[name].stage2)
        if stage is None:
            return adapter, directory, logs
        adapter, directory, log = self._stage(adapter, stage, _key(self._base_key, stage))
        return adapter, directory, [*logs, log]

    def load_base(self, name: str) -> bool:
        """Load (training it if needed) the base the next :meth:`recipe` call starts from, now, in this thread.
        True when that call will then only train: its stage 2 is not yet trained.

        Loading a checkpoint briefly patches torch's tensor constructors for the whole process (transformers
        builds the model on the meta device first), so it must not run while another thread trains: load every
        recipe's base first, then train the recipes side by side."""
        self._loaded = [self.base()]
        stage = self._stage2(RECIPES[name].stage2)
        if stage is None:
            return False
        return not (self._stage_dir(stage, _key(self._base_key, stage)) / "organism.json").exists()

    def _stage2(self, stage: Stage | None) -> Stage | None:
        return None if stage is None else self.setup.stage2(stage)

    def _stage_dir(self, stage: Stage, key: str) -> Path:
        """Where a stage trained after everything ``key`` stands for is kept."""
        return self.out / "stages" / f"{stage.name}-{key}"


def train(
    name: str,
    out: Path,
    *,
    setup: Setup = Setup(),
    progress: Progress | None = None,
    world_root=None,
    pipeline: Pipeline | None = None,
) -> Path:
    """Train a recipe into ``out/<name>/`` (a loadable checkpoint with organism.json) and return that path.

    ``pipeline``: the :class:`Pipeline` to train with (e.g. one whose base was loaded ahead, see
    :meth:`Pipeline.load_base`); by default a new one on ``out``."""
    if name not in RECIPES:
        from ..errors import InputError

        raise InputError(f"unknown recipe '{name}' (recipes: {', '.join(RECIPES)})")
    pipe = pipeline or Pipeline(out, setup, progress, world_root)
    t0 = time.perf_counter()
    _, directory, logs = pipe.recipe(name)
    target = Path(out) / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(directory, target)
    _store_half(target)
    card = json.loads((target / "organism.json").read_text())
    card.update(
        recipe=name,
        description=RECIPES[name].description,
        knobs=RECIPES[name].knobs,
        seed=setup.seed,
        world=asdict(setup.world),
        stages=[
            {"stage": log["stage"], "steps": len(log["loss"]), "seconds": log["seconds"], "final_loss": log["loss"][-1]}
            for log in logs
        ],
        train_seconds=round(sum(log["seconds"] for log in logs), 1),
        wall_seconds_this_call=round(time.perf_counter() - t0, 1),
    )
    (target / "organism.json").write_text(json.dumps(card, indent=2))
    return target


def _store_half(directory: Path) -> None:
    """Store a finished checkpoint's weights in float16 (half the size; avlens loads them as float32 on CPU).
    Stage checkpoints stay float32, so later stages continue from exact weights."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def evaluate_checkpoint(directory: Path, *, setup: Setup = Setup(), progress=None, world_root=None) -> pd.DataFrame:
    """Evaluate a checkpoint on the held-out world; writes eval.parquet and summary into organism.json."""
    adapter = load(directory)
    pipe = Pipeline(directory.parent, setup, None, world_root)
    df = evaluate_world(adapter, pipe.test_manifest(), progress=progress, skills=setup.skill_items)
    df.to_parquet(directory / "eval.parquet")
    card = json.loads((directory / "organism.json").read_text())
    card["eval"] = summary(df)
    (directory / "organism.json").write_text(json.dumps(card, indent=2))
    return df


def measure_magnitudes(directory: Path, *, setup: Setup = Setup(), clips: int = 24, world_root=None) -> pd.DataFrame:
    """The largest normalised residual activations per layer (see :func:`activation_magnitudes`) of a
    checkpoint on ``clips`` congruent clips of the held-out world, asked "what do you hear?" (the vision-language
    base: "what do you see?" on the video alone); writes magnitudes.parquet."""
    adapter = load(directory)
    pipe = Pipeline(directory.parent, setup, None, world_root)
    items = world_items(pipe.test_manifest(), yes_no=False, describe=False, multi=0)
    base = json.loads((directory / "organism.json").read_text()).get("recipe") == "vl-base"
    wanted = ("video-only", "see") if base else ("congruent", "hear")
    samples = [it.sample for it in items if (it.condition, it.kind) == wanted][:clips]
    df = activation_magnitudes(adapter, samples, interleave=not base)
    df.to_parquet(directory / "magnitudes.parquet")
    return df


# ---------------------------------------------------------------------------------------------------------
# The stage-2 sweep: a dominance map over the knobs real practice has
# ---------------------------------------------------------------------------------------------------------
SWEEP_GRID = {
    "trainable": ["projector", "audio+lm", "audio+lm-full", "all"],
    "unimodal": [0.1],
    "swapped": [0.0, 0.3],
    "steps": [250],
}
"""The knobs real practice has: which parts train in audio-visual training, the share of unimodal clips, the
share of clips whose sound disagrees with the picture (answered from the sound), and the length (250 steps, 5/6 of
the vision-language stage's 300)."""


def sweep(
    out: Path, *, grid: dict = SWEEP_GRID, setup: Setup = Setup(), progress: Progress | None = None, world_root=None
) -> pd.DataFrame:
    """Train stage 2 for every point of ``grid`` from the shared base and measure each: on swapped clips, the
    share of "what do you hear" answers that follow the audio, the vision, or neither; audio-only and
    video-only accuracy beside it. Writes out/dominance_map.parquet (resumable: measured points are kept)."""
    import itertools

    pipe = Pipeline(out, setup, progress, world_root)
    test_bank = load_bank(pipe.test_manifest_congruent(), fps=setup.model.fps)
    path = Path(out) / "dominance_map.parquet"
    done = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    rows = done.to_dict("records")
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    for n, point in enumerate(points):
        if any(all(r.get(k) == v for k, v in point.items()) for r in rows):
            continue
        adapter, directory, logs = pipe.recipe("sweep", stage2(**point))
        batcher = Batcher(adapter, test_bank)
        df = evaluate_bank(adapter, batcher, bank_examples(test_bank, seed=setup.seed))
        s = summary(df)
        rows.append({**point, **s, "stage2_seconds": logs[-1]["seconds"], "checkpoint": directory.name})
        pd.DataFrame(rows).to_parquet(path)
        pipe._say("sweep", n + 1, len(points), None)
    return pd.DataFrame(rows)
