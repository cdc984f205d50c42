"""Training the organism the way real AVLLMs are built, in stages, with the knobs real practice has.

- stage 0: the audio encoder and the vision encoder pretrained on their own modality (classification);
- stage 1: the vision-language base (vision + language model on video questions), saved as ``vl-base``;
- stage 2: audio-visual training from the base, with knobs: length relative to stage 1, which parts train
  (audio projector only, the audio encoder, + the language model at a lower learning rate, everything), the
  share of unimodal clips, and the share of swapped clips whose hearing answer comes from the audio.

Every stage checkpoints its state, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..models.qwen2_5_omni import Qwen2_5OmniAdapter
from .data import Bank, Batcher, Example, ExampleSampler, Mixture
from .world import CLASSES

PARTS = ("audio_proj", "audio", "vision", "lm")
"""Trainable parts: the audio projector, the whole audio encoder, the whole vision encoder (with its merger),
and the language model (with its embeddings and head)."""


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: e.g. "stage0-audio", "stage1", "stage2".
        steps: optimiser steps.
        train: trainable part -> learning-rate multiplier (parts not listed are frozen).
        mixture: the examples (None: stage 0's classification of one modality, given by ``modality``).
        modality: "audio" or "vision" for stage 0.
    """

    name: str
    steps: int
    train: dict[str, float]
    mixture: Mixture | None = None
    modality: str | None = None
    lr: float = 2e-3
    batch: int = 32
    warmup: int = 20
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """How one organism checkpoint is made: a name, the stages after the shared vision-language base."""

    name: str
    stage2: Stage | None
    description: str = ""
    knobs: dict = field(default_factory=dict)


def stage2(
    *,
    steps: int,
    trainable: str,
    unimodal: float,
    swapped: float,
    audio_questions: float = 0.5,
    lm_lr: float = 0.1,
    seed: int = 0,
) -> Stage:
    """A stage-2 (audio-visual) stage from its knobs.

    ``trainable``: "projector" (audio projector only), "audio" (the audio encoder), "audio+lm" (the audio
    encoder, and the language model at ``lm_lr`` times the learning rate), "audio+lm-full" (the audio encoder and
    the language model at the full rate), "all" (everything, the vision encoder too, full rate).
    """
    train = {
        "projector": {"audio_proj": 1.0},
        "audio": {"audio": 1.0},
        "audio+lm": {"audio": 1.0, "lm": lm_lr},
        "audio+lm-full": {"audio": 1.0, "lm": 1.0},
        "all": {"audio": 1.0, "vision": 1.0, "lm": 1.0},
    }[trainable]
    mix = Mixture(audio=True, unimodal=unimodal, swapped=swapped, multi=0.05, audio_questions=audio_questions)
    return Stage("stage2", steps, train, mix, lr=1e-3, seed=seed)


STAGE0_TEXT = Stage("stage0-text", 500, {"lm": 1.0}, Mixture(text=True), lr=1e-3, batch=64)
STAGE0_AUDIO = Stage("stage0-audio", 150, {"audio": 1.0}, modality="audio", lr=3e-3)
STAGE0_VISION = Stage("stage0-vision", 150, {"vision": 1.0}, modality="vision", lr=3e-3)
STAGE1 = Stage("stage1", 300, {"lm": 1.0}, Mixture(audio=False, unimodal=0.0, multi=0.0), lr=1e-3)


def parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    """The parameters of a trainable part of a Qwen2.5-Omni thinker."""
    inner = model.model
    if part == "audio_proj":
        return [*inner.audio_tower.proj.parameters(), *inner.audio_tower.ln_post.parameters()]
    if part == "audio":
        return list(inner.audio_tower.parameters())
    if part == "vision":
        return list(inner.visual.parameters())
    if part == "lm":  # (with tied embeddings the head's weight is the embedding: list it once)
        return list(dict.fromkeys([*inner.language_model.parameters(), *model.lm_head.parameters()]))
    raise ValueError(f"unknown part '{part}' (parts: {', '.join(PARTS)})")


class _Head(nn.Module):
    """Stage 0's classifier: the mean of an encoder's output tokens against fixed class codes, by cosine
    similarity.

    The vision encoder is aligned with the language model's own input embeddings of the class names (the
    vision-language base is a strong, aligned VLM). The audio encoder is aligned with codes of its own (a random
    orthogonal set), like a speech/audio encoder pretrained outside the LLM: audio-visual training must learn to
    map it to the language model's space, which is where thin audio supervision can bite."""

    def __init__(self, words: torch.Tensor, temperature: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("words", nn.functional.normalize(words.detach().clone(), dim=-1))  # (classes, D)
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.normalize(tokens.mean(1), dim=-1)  # (B, D)
        return pooled @ self.words.T / self.temperature


def _encode(adapter: Qwen2_5OmniAdapter, batcher: Batcher, modality: str, clips: list[int]) -> torch.Tensor:
    """Encoder output tokens (B, n, D) of clips for stage 0."""
    inner = adapter.model.model
    if modality == "audio":
        feats = batcher.features[clips]
        mask = torch.ones(feats.shape[0], feats.shape[2], dtype=torch.long)
        out = inner.get_audio_features(feats, mask).last_hidden_state
        return out.view(len(clips), -1, out.shape[-1])
    grid = batcher.grid.expand(len(clips), -1)
    return torch.stack(list(inner.get_video_features(batcher.pixels(clips), grid).pooler_output))


def _lr(stage: Stage, step: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_stage(
    adapter: Qwen2_5OmniAdapter,
    bank: Bank,
    stage: Stage,
    *,
    state_path: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    batcher: Batcher | None = None,
    save_every: int = 50,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Train one stage in place; returns its log (losses, seconds).

    If ``state_path`` holds the state of an interrupted run of this stage, training continues from it, and the
    state is saved there every ``save_every`` steps. A saved state whose ``"optim"`` is None (weights, step and
    sampler state only) continues with a fresh optimizer.

    ``stop``: asked after every step (after ``progress``); when it returns True, the state is saved (with a
    ``state_path``) and training ends there, so the run can be resumed later exactly where it stopped. The log
    then has ``"stopped"``: the steps done.
    """
    model = adapter.model
    torch.manual_seed(stage.seed)
    model.requires_grad_(False)
    groups = []
    for part, mult in stage.train.items():
        params = parameters(model, part)
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": stage.lr * mult, "base": stage.lr * mult})
    head = None
    if stage.mixture is None:
        if stage.modality == "vision":
            codes = adapter.embed_tokens.weight[[adapter.tokenizer.convert_tokens_to_ids(c) for c in CLASSES]]
        else:
            generator = torch.Generator().manual_seed(stage.seed + 12345)
            codes = torch.linalg.qr(torch.randn(adapter.hidden_size, len(CLASSES), generator=generator))[0].T
        head = _Head(codes)
    optim = torch.optim.AdamW(groups, weight_decay=0.01)
    batcher = batcher or Batcher(adapter, bank)
    frozen_vision = "vision" not in stage.train and stage.modality != "vision"
    if frozen_vision and stage.mixture is not None and not stage.mixture.text:  # (text stages have no video)
        batcher.cache_video_features(model)
    else:
        batcher.video_features = None
    sampler = ExampleSampler(bank, stage.mixture or Mixture(), stage.seed)
    rng = random.Random(stage.seed + 1)
    log = {"stage": stage.name, "loss": [], "seconds": 0.0}
    start = 0
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        if saved["optim"] is not None:
            optim.load_state_dict(saved["optim"])
        if head is not None:
            head.load_state_dict(saved["head"])
        sampler.rng.setstate(saved["sampler"])
        sampler.draws = saved.get("draws", 0)
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch"])
        start, log = saved["step"], saved["log"]
        log.pop("stopped", None)  # (a stop of an earlier session)
    model.train()
    t0 = time.perf_counter() - log["seconds"]
    for step in range(start, stage.steps):
        for g in optim.param_groups:
            g["lr"] = g["base"] * _lr(stage, step)
        optim.zero_grad(set_to_none=True)
        if head is not None:
            clips = [rng.randrange(len(bank)) for _ in range(stage.batch)]
            target = torch.tensor([CLASSES.index(bank.labels[i]) for i in clips])
            loss = nn.functional.cross_entropy(head(_encode(adapter, batcher, stage.modality, clips)), target)
            loss.backward()
        else:
            loss = _lm_step(model, batcher, [sampler.draw() for _ in range(stage.batch)], rng)
        optim.step()
        loss = float(loss.detach())
        log["loss"].append(round(loss, 5))
        if state_path is not None and ((step + 1) % save_every == 0 or step + 1 == stage.steps):
            log["seconds"] = time.perf_counter() - t0
            _save_state(state_path, model, optim, head, sampler, rng, step + 1, log)
        if progress is not None:
            progress(step + 1, stage.steps, loss)
        if stop is not None and step + 1 < stage.steps and stop():
            log["stopped"] = step + 1
            if state_path is not None and (step + 1) % save_every != 0:
                log["seconds"] = time.perf_counter() - t0
                _save_state(state_path, model, optim, head, sampler, rng, step + 1, log)
            break
    model.eval()
    model.requires_grad_(False)
    log["seconds"] = round(time.perf_counter() - t0, 1)
    return log


PIECE = 16
"""Fewest examples per forward when a step's examples of one layout are split by length (see :func:`_pieces`)."""


def _pieces(batcher: Batcher, group: list[Example], interleave: bool) -> list[list[Example]]:
    """``group`` sorted by prompt length and cut into ``len // PIECE`` forwards of near-equal size (at least
    one), so that short prompts are not padded to the longest of the step.

    Every example is left-padded and masked, so its loss does not depend on the forward it lands in (up to float
    rounding): the split only saves the padded positions' compute (text prompts of the skill mixtures fill about
    half of a padded batch; three pieces of 16 about 80%)."""
    n = max(1, len(group) // PIECE)
    ranked = sorted(group, key=lambda ex: len(batcher.prompt_ids(ex, interleave)))
    size = -(-len(ranked) // n)
    return [ranked[i : i + size] for i in range(0, len(ranked), size)]


def _lm_step(model: nn.Module, batcher: Batcher, examples: list[Example], rng: random.Random) -> torch.Tensor:
    """One step's mean loss over answer tokens; examples of different layouts run as separate forwards, and
    those of one layout in pieces of similar length (:func:`_pieces`)."""
    by_layout: dict[str, list[Example]] = {}
    for ex in examples:
        by_layout.setdefault(ex.layout_key, []).append(ex)
    batches = []
    for group in by_layout.values():
        # Audio-visual clips are laid out interleaved (a video with its own track) or as separate spans.
        interleave = rng.random() < 0.7
        for piece in _pieces(batcher, group, interleave):
            batch = batcher.batch(piece, interleave=interleave)
            batches.append((batch, batch.pop("labels")[:, 1:]))
    total = sum(int(labels.ne(-100).sum()) for _, labels in batches)
    loss_sum = torch.zeros(())
    for batch, labels in batches:
        logits = model(**batch, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        if loss.requires_grad:  # (a video-only group has nothing to train when only the audio side trains)
            (loss / total).backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum / total


def _save_state(path: Path, model, optim, head, sampler, rng, step: int, log: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "head": head.state_dict() if head is not None else None,
            "sampler": sampler.rng.getstate(),
            "draws": sampler.draws,
            "rng": rng.getstate(),
            "torch": torch.get_rng_state(),
            "step": step,
            "log": log,
        },
        tmp,
    )
    tmp.replace(path)


def stage_key(stage: Stage) -> str:
    """A short stable name for a stage's settings (its checkpoint directory name)."""
    import hashlib

    blob = json.dumps(asdict(stage), sort_keys=True, default=str)
    return f"{stage.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def with_steps(stage: Stage, steps: int) -> Stage:
    return replace(stage, steps=steps)
