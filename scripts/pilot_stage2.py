"""A pilot of the organism v2's media stages: one stage 2 from a trained v2 base (with ``--replay``, a stage 1
trained again too), with other skill shares, measured on a pilot world (seed 3000: neither training's 0,
MODEL.md's 1000 nor the sweep's 2000), 120 questions per row.

    python scripts/pilot_stage2.py --out DIR [--which 0.35 --choice 0.3 --steps 400 --unimodal 0.2 --replay 0.2]

DIR: a directory the v2 job (``scripts/train_organism.py --out DIR --v2``) trained into; the stages it already
has are reused. ``--replay R``: stage 1 and stage 2 draw a share R of text examples of the text stage's kinds
(SkillMixture.text_replay, with the text stage's which / choice / lookup shares). Prints the pilot's summary as
JSON and writes it with the records under DIR/pilots/.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from train_organism import print_progress  # (scripts/ is on the path of a script run from it)

from avlens.models import load
from avlens.organism.data import make_world
from avlens.organism.evaluate import evaluate_world, summary
from avlens.organism.recipes import V2_SKILLS, Pipeline, setup_v2
from avlens.organism.train import stage2

PILOT_SEED = 3000
"""The pilot world's seed (training's is 0, MODEL.md's 1000, the sweep's 2000)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--which", type=float, default=V2_SKILLS["which"])
    parser.add_argument("--choice", type=float, default=V2_SKILLS["choice"])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--trainable", default="audio+lm-full")
    parser.add_argument("--unimodal", type=float, default=0.1)
    parser.add_argument("--swapped", type=float, default=0.3)
    parser.add_argument("--replay", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = setup_v2()
    skills = {**V2_SKILLS, "which": args.which, "choice": args.choice}
    if args.replay:
        text = setup.stage0_text.mixture
        replay = {
            "text_replay": args.replay,
            **{k: getattr(text, k) for k in ("text_which", "text_choice", "text_lookup")},
        }
        skills |= replay
        stage1 = replace(setup.stage1, mixture=replace(setup.stage1.mixture, **replay))
        setup = replace(setup, stage1=stage1)
    setup = replace(setup, skills=skills)
    worlds = args.out / "worlds"

    point = {"steps": args.steps, "trainable": args.trainable, "unimodal": args.unimodal, "swapped": args.swapped}
    _, directory, logs = Pipeline(args.out, setup, print_progress, worlds).recipe("pilot", stage2(**point))
    world = make_world(240, PILOT_SEED, swapped_share=0.5, root=worlds, world=setup.world)
    df = evaluate_world(load(directory), world, skills=setup.skill_items)
    record = {**point, "which": args.which, "choice": args.choice, "replay": args.replay}
    record["stage_seconds"] = {log["stage"]: log["seconds"] for log in logs}
    record["eval_world_seed"] = PILOT_SEED
    record["summary"] = summary(df)
    pilots = args.out / "pilots"
    pilots.mkdir(exist_ok=True)
    df.to_parquet(pilots / f"{directory.name}.eval.parquet")
    (pilots / f"{directory.name}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
