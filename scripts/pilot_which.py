"""A learning curve of "which of 2 clips has the sound of X / shows X?": does more training on it alone teach
the organism to look a clip up by its content?

Continues a checkpoint (default the shipped organism:av-balanced) on which-of-2 examples only (the audio
encoder and the language model at the full rate), and every ``--every`` steps measures on held-out questions
(scripts/diagnose_which.py's, world seed 4343, never used in training) the accuracy and the attention the last
position gives the clip that has X against the other (per layer, the most selective head). Nothing is saved
but the JSON record (``--out``); the checkpoint in the package is not touched.

    .venv/bin/python scripts/pilot_which.py --steps 300 --every 50 --out docs/pilots/which-diagnosis/curve.json
    .venv/bin/python scripts/pilot_which.py --model DIR/stages/stage1-KEY --v2 ...   # a v2 vision-language base
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from diagnose_which import emit, held_out, measure, questions, target_attention, world_config  # (scripts/ on the path)

from avlens import load
from avlens.organism.data import Mixture, SkillMixture, load_bank, make_world
from avlens.organism.train import Stage, train_stage


def curve_point(adapter, qs: list[dict]) -> dict:
    """Accuracy (of all questions, of the sound ones, of the picture ones), the share answering "1", and per
    layer the most selective head's attention to the clip with X minus its mean attention to each other clip."""
    was_training = adapter.model.training
    adapter.model.eval()
    m = measure(adapter, qs)
    if was_training:
        adapter.model.train()
    target = np.array([q["target"] for q in qs])
    hear = np.array([q["hear"] for q in qs])
    to_target, to_others = target_attention(m["attn"], target)  # (Q, layers, H) each
    select = (to_target - to_others).mean(0)  # (layers, H)
    return {
        "accuracy": round(float((m["chosen"] == target).mean()), 3),
        **{
            f"accuracy_{kind}": round(float((m["chosen"] == target)[hear == (kind == "hear")].mean()), 3)
            for kind in ("hear", "see")
        },
        "answers_1": round(float((m["chosen"] == 0).mean()), 3),
        "selectivity": [round(float(v), 3) for v in select.max(1)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism:av-balanced")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-clips", type=int, default=400, help="clips of the training world (seed 0)")
    ap.add_argument("--eval", type=int, default=60, help="held-out questions per curve point")
    ap.add_argument(
        "--skill",
        nargs=2,
        type=int,
        metavar=("LO", "HI"),
        help="train on the v2 skill's which-of-LO..HI examples (SkillMixture.which = 1) instead of v1's of 2",
    )
    ap.add_argument("--swapped", type=float, default=0.0, help="with --skill: the hard-negative share")
    ap.add_argument("--eval-clips", type=int, default=2, help="clips per held-out question")
    ap.add_argument("--v2", action="store_true", help="the v2 world (3 s clips, late sounds), for a v2 checkpoint")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    adapter = load(args.model)
    world = world_config(args.v2)
    bank = load_bank(make_world(args.train_clips, 0, world=world))
    mixture = Mixture(audio=True, unimodal=0.0, swapped=0.0, multi=1.0)
    if args.skill:
        mixture = SkillMixture(audio=True, unimodal=0.0, swapped=args.swapped, which=1.0, which_clips=tuple(args.skill))
    stage = Stage("which-pilot", args.steps, {"audio": 1.0, "lm": 1.0}, mixture, lr=args.lr, batch=args.batch)
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = held_out(Path(tmp), 60, 4343, world)
        qs = questions(manifest, args.eval_clips, args.eval, 4343)
        curve.append({"step": 0, **curve_point(adapter, qs)})
        print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
        t0 = time.perf_counter()

        def progress(done: int, total: int, loss: float) -> None:
            if done % args.every == 0 or done == total:
                curve.append({"step": done, "loss": round(loss, 4), **curve_point(adapter, qs)})
                curve[-1]["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(curve[-1]), file=sys.stderr, flush=True)

        train_stage(adapter, bank, stage, progress=progress)
    record = {"model": args.model, "stage": {**vars(args), "out": None}, "eval_world_seed": 4343, "curve": curve}
    emit(record, args.out)


if __name__ == "__main__":
    main()
