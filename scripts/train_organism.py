"""Train, evaluate and ship the organism checkpoints (how the checkpoints inside the package were made).

    python scripts/train_organism.py --out organism-runs [--sweep organism-sweep] [--ship]

Trains vl-base, av-vision-heavy and av-balanced into OUT (the world is written under OUT/worlds, so the timing
includes writing it), evaluates each on the held-out world, writes MODEL.md, and with --ship copies the three
checkpoints (float16 weights) and the dominance map of the sweep directory into avlens/organism/checkpoints/.
Prints the training time of the three (writing the worlds plus each distinct stage's measured time; stages
already trained under OUT, e.g. by a sweep into the same OUT, are reused): it must stay under 30 minutes on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from avlens.organism.card import dominance_table, write_model_card
from avlens.organism.checkpoints import HERE, SHIPPED
from avlens.organism.data import make_world
from avlens.organism.recipes import Pipeline, Setup, evaluate_checkpoint, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", type=Path, help="a directory written by `avlens organism sweep`")
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    setup = Setup(seed=args.seed)
    worlds = args.out / "worlds"

    def progress(task: str, done: int, total: int, loss: float | None = None) -> None:
        if done == total or done % 50 == 0:
            print(
                f"{time.strftime('%H:%M:%S')} {task} {done}/{total}" + (f" loss {loss:.3f}" if loss else ""), flush=True
            )

    world_seconds = _write_worlds(args.out, setup, progress)
    t0 = time.perf_counter()
    trained = {name: train(name, args.out, setup=setup, progress=progress, world_root=worlds) for name in SHIPPED}
    wall = time.perf_counter() - t0
    # Stages already trained under OUT (e.g. by a sweep) are reused, so the training time is what each stage
    # measured when it trained, summed over the distinct stages of the shipped checkpoints, plus the world.
    cards = [json.loads((d / "organism.json").read_text()) for d in trained.values()]
    stages = {(s["stage"], s["seconds"]) for card in cards for s in card["stages"]}
    train_wall = world_seconds + sum(seconds for _, seconds in stages)
    print(json.dumps({"train_seconds": round(train_wall, 1), "wall_seconds_this_call": round(wall, 1)}), flush=True)
    sweep = pd.read_parquet(args.sweep / "dominance_map.parquet") if args.sweep else None
    for name, directory in trained.items():
        df = evaluate_checkpoint(directory, setup=setup, world_root=worlds)
        card = json.loads((directory / "organism.json").read_text())
        card["all_checkpoints_train_seconds"] = round(train_wall, 1)
        (directory / "organism.json").write_text(json.dumps(card, indent=2))
        notes = _notes(name, sweep, train_wall)
        write_model_card(directory, df, notes=notes)
        print(name, json.dumps(card.get("eval")), flush=True)
    if args.ship:
        for name, directory in trained.items():
            target = HERE / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(directory, target, ignore=shutil.ignore_patterns("*.state.pt"))
        if sweep is not None:
            (HERE / "dominance_map.md").write_text(_map_page(sweep))
            sweep.to_csv(HERE / "dominance_map.csv", index=False)
        print(f"shipped into {HERE}")


def _write_worlds(out: Path, setup: Setup, progress) -> float:
    """Write the training and test worlds under out/worlds; their writing time (kept in world_seconds.json)."""
    record = out / "worlds" / "world_seconds.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    pipe = Pipeline(out, setup, progress, out / "worlds")
    t0 = time.perf_counter()
    make_world(setup.train_clips, setup.seed, root=out / "worlds")
    pipe.test_manifest()
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps({"seconds": round(seconds, 1)}))
    return seconds


def _notes(name: str, sweep: pd.DataFrame | None, wall: float) -> str:
    text = f"All three shipped checkpoints together took {wall / 60:.1f} min to train on 2 CPU cores "
    text += "(scripts/train_organism.py: each stage's measured time, summed over the distinct stages, "
    text += "plus writing the worlds).\n"
    if sweep is not None and name != "vl-base":
        text += "\n## The stage-2 sweep this recipe comes from\n\n" + dominance_table(sweep) + "\n"
    return text


def _map_page(sweep: pd.DataFrame) -> str:
    return (
        "# Dominance map of the organism's stage-2 recipes\n\n"
        "Each row: stage 2 trained from the same vision-language base with one setting of the knobs; measured on "
        "held-out clips whose sound is swapped for an unrelated class ('what do you hear?': does the answer follow "
        "the audio, the vision, or neither), beside audio-only and video-only accuracy. Written by "
        "`avlens organism sweep`.\n\n" + dominance_table(sweep) + "\n"
    )


if __name__ == "__main__":
    main()
