"""What one training step of each organism stage costs at an organism-v2 size and clip layout, and what the
shipping job would take at v1's step counts. Prints one JSON object.

The organism: 8 decoder layers (hidden from ``--hidden``, head dim 32, FFN 3x), the v2 words, 3 s clips at 224 px
and 2 fps with 1 s chunks (3 interleaved chunks of 64 video + 25 audio tokens per clip), sounds starting at 0.5-2 s.
Its stages are :func:`avlens.organism.recipes.setup_v2`'s (stage0-text with the v2 text skills, stage0-audio,
stage0-vision, stage1 with lettered see questions, stage 2 of both audio-visual recipes with which-of-2/3 clips
and lettered questions), each run
for ``--steps`` steps on a world of ``--clips`` clips from random weights: the time of a step does not depend on
what the weights know.

- world_seconds_per_clip: writing the world (mp4 + wav), per clip;
- decode_seconds_per_clip: decoding it into the training bank, per clip;
- seconds_per_step: per stage, the median over steps after the first;
- setup_seconds: per stage, what it spends besides its steps (features of every clip cached at its start), scaled
  from ``--clips`` to the training world's 1200 clips;
- projected_seconds: seconds_per_step x v1's step count of the stage (the text stage at ``--text-steps``) plus
  its setup, and
  the job as scripts/train_organism.py runs it: the world, the base (text, audio, vision, stage 1 one after the
  other), then the two stage 2s side by side (each at its one-thread time).

Usage: python benchmarks/organism_v2_steps.py [--hidden 128] [--steps 6] [--clips 36] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from avlens.organism.data import load_bank, make_world
from avlens.organism.model import new_organism
from avlens.organism.recipes import RECIPES, TRAIN_CLIPS, Setup, setup_v2
from avlens.organism.train import train_stage


def stages(setup: Setup, text_batch: int) -> dict:
    """The stages timed: the v2 setup's, with v1's step counts (stage 2: both audio-visual recipes)."""
    text = setup.stage0_text.mixture
    return {
        # (no curriculum: a step is timed at the full option and clip counts, as after the first quarter)
        "stage0-text": replace(setup.stage0_text, batch=text_batch, mixture=replace(text, curriculum=0)),
        "stage0-audio": setup.stage0_audio,
        "stage0-vision": setup.stage0_vision,
        "stage1": setup.stage1,
        "stage2-vision-heavy": setup.stage2(RECIPES["av-vision-heavy"].stage2),
        "stage2-balanced": setup.stage2(RECIPES["av-balanced"].stage2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--clips", type=int, default=36)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-steps", type=int, default=6000, help="the text stage's step count (projection)")
    parser.add_argument("--text-batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = args.hidden // 32
    setup = setup_v2()
    config = replace(setup.model, hidden=args.hidden, heads=heads, kv_heads=max(1, heads // 2), ffn=3 * args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = make_world(args.clips, 0, root=Path(tmp), world=setup.world)
        world_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank = load_bank(manifest, fps=config.fps)
        decode_seconds = time.perf_counter() - t0
    adapter = new_organism(config, vocabulary=setup.vocabulary)
    per_step, full, overhead = {}, {}, {}
    for name, stage in stages(setup, args.text_batch).items():
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(done: int, total: int, loss: float, times=times, last=last) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        start = last[0] = time.perf_counter()
        train_stage(adapter, bank, replace(stage, steps=args.steps), progress=tick)
        per_step[name] = round(statistics.median(times[1:]), 3)
        # what the stage spends besides its steps (before and in its first: caching features of every clip),
        # scaled to the full world
        extra = time.perf_counter() - start - sum(times[1:]) - per_step[name]
        overhead[name] = round(max(0.0, extra) / args.clips * TRAIN_CLIPS, 1)
        full[name] = args.text_steps if name == "stage0-text" else stage.steps
    projected = {name: round(per_step[name] * full[name] + overhead[name], 1) for name in per_step}
    world_total = (world_seconds + decode_seconds) / args.clips * TRAIN_CLIPS
    base = sum(projected[n] for n in ("stage0-text", "stage0-audio", "stage0-vision", "stage1"))
    side_by_side = max(projected["stage2-vision-heavy"], projected["stage2-balanced"])
    out = {
        "hidden": args.hidden,
        "threads": args.threads,
        "steps_timed": args.steps,
        "world_seconds_per_clip": round(world_seconds / args.clips, 3),
        "decode_seconds_per_clip": round(decode_seconds / args.clips, 3),
        "seconds_per_step": per_step,
        "v1_steps": full,
        "setup_seconds": overhead,
        "projected_seconds": projected,
        "projected_job_seconds": round(world_total + base + side_by_side, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
