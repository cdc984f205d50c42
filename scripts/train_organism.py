"""Train, evaluate and ship the organism checkpoints (how the checkpoints inside the package were made).

    python scripts/train_organism.py --out organism-runs [--sweep organism-sweep] [--ship]
    python scripts/train_organism.py --out organism-v2-runs --v2 [--text-steps 6000]   # the organism v2

Trains vl-base, av-vision-heavy and av-balanced into OUT (the world is written under OUT/worlds, so the timing
includes writing it), evaluates each on the held-out world, writes MODEL.md, and with --ship copies the three
checkpoints (float16 weights) and the dominance map of the sweep directory into avlens/organism/checkpoints/.
Prints the job's wall time (writing the worlds included; the goal is 30 minutes on 2 CPU cores) and the sum of
the stages' own times. With --cards-only it trains nothing and rewrites MODEL.md of the checkpoints in OUT (e.g.
once a sweep into the same OUT has finished, to add its map).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from avlens.organism.card import dominance_table, write_model_card
from avlens.organism.checkpoints import HERE, SHIPPED
from avlens.organism.recipes import (
    SWEEP_GRID,
    Pipeline,
    Setup,
    evaluate_checkpoint,
    measure_magnitudes,
    setup_v2,
    train,
)

BASE = "vl-base"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", type=Path, help="a directory written by `avlens organism sweep`")
    parser.add_argument("--ship", action="store_true", help="copy the checkpoints into the package")
    parser.add_argument(
        "--cards-only", action="store_true", help="only rewrite MODEL.md (and the map) of the checkpoints in OUT"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--v2", action="store_true", help="the organism-v2 setup (recipes.setup_v2)")
    parser.add_argument("--text-steps", type=int, default=6000, help="with --v2: steps of the text stage")
    parser.add_argument(
        "--text-shares",
        type=float,
        nargs=3,
        default=(0.2, 0.2, 0.2),
        metavar=("WHICH", "CHOICE", "LOOKUP"),
        help="with --v2: the text stage's shares of which-clip, lettered multiple choice and option lookup",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    setup = (
        setup_v2(args.seed, text_steps=args.text_steps, text_shares=tuple(args.text_shares))
        if args.v2
        else Setup(seed=args.seed)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cards_only:
        _train_and_evaluate(args.out, setup)
    sweep = pd.read_parquet(args.sweep / "dominance_map.parquet") if args.sweep else None
    for name in SHIPPED:
        directory = args.out / name
        if not (directory / "magnitudes.parquet").exists():
            measure_magnitudes(directory, setup=setup, world_root=args.out / "worlds")
        card = json.loads((directory / "organism.json").read_text())
        write_model_card(directory, pd.read_parquet(directory / "eval.parquet"), notes=_notes(name, sweep, card))
    if args.ship:
        for name in SHIPPED:
            target = HERE / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(args.out / name, target, ignore=shutil.ignore_patterns("*.state.pt"))
        if sweep is not None:
            (HERE / "dominance_map.md").write_text(_map_page(sweep))
            sweep.to_csv(HERE / "dominance_map.csv", index=False)
        print(f"shipped into {HERE}")


def print_progress(task: str, done: int, total: int, loss: float | None = None) -> None:
    """A pipeline's progress as log lines: every 50th step and the last, with the time and the loss."""
    if done == total or done % 50 == 0:
        print(f"{time.strftime('%H:%M:%S')} {task} {done}/{total}" + (f" loss {loss:.3f}" if loss else ""), flush=True)


def _train_and_evaluate(out: Path, setup: Setup) -> None:
    """Train the three checkpoints into OUT, timing the whole job, and evaluate each (eval.parquet)."""

    worlds = out / "worlds"
    world_seconds = _write_training_world(out, setup, print_progress)
    t0 = time.perf_counter()
    trained = {BASE: train(BASE, out, setup=setup, progress=print_progress, world_root=worlds)}
    base_seconds = time.perf_counter() - t0
    # The audio-visual recipes share the base and differ only in stage 2: they train side by side, one core
    # each (two one-thread runs use two cores better than one two-thread run after the other does). Every
    # checkpoint they start from is loaded first, here: loading must not run beside training (load_base).
    pipes = {name: Pipeline(out, setup, print_progress, worlds) for name in SHIPPED if name != BASE}
    side_by_side = all([pipe.load_base(name) for name, pipe in pipes.items()])
    threads = torch.get_num_threads()
    share = max(1, threads // len(pipes)) if side_by_side else threads

    def one(name: str) -> Path:
        torch.set_num_threads(share)
        return train(name, out, setup=setup, pipeline=pipes[name])

    torch.set_num_threads(share)
    with ThreadPoolExecutor(len(pipes) if side_by_side else 1) as pool:
        jobs = {name: pool.submit(one, name) for name in pipes}
        trained |= {name: job.result() for name, job in jobs.items()}
    torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    # Stages already trained under OUT (e.g. by a sweep) are reused: the stage sum counts each distinct stage
    # once, at the time it measured when it trained; the wall time is this job's (meaningful on a fresh OUT).
    cards = [json.loads((d / "organism.json").read_text()) for d in trained.values()]
    stages = {(s["stage"], s["seconds"]) for card in cards for s in card["stages"]}
    timing = {
        "world_seconds": round(world_seconds, 1),
        "base_seconds": round(base_seconds, 1),
        "av_stage2_wall_seconds": round(wall - base_seconds, 1),
        "stage_seconds_sum": round(sum(seconds for _, seconds in stages), 1),
        "job_wall_seconds": round(world_seconds + wall, 1),
    }
    print(json.dumps(timing), flush=True)
    for name, directory in trained.items():
        evaluate_checkpoint(directory, setup=setup, world_root=worlds)
        card = json.loads((directory / "organism.json").read_text())
        card["all_checkpoints_timing"] = timing
        (directory / "organism.json").write_text(json.dumps(card, indent=2))
        print(name, json.dumps(card.get("eval")), flush=True)


def _write_training_world(out: Path, setup: Setup, progress) -> float:
    """Write the training world under out/worlds; its writing time (kept in world_seconds.json). (The test
    world is written when the checkpoints are evaluated: training does not need it.)"""
    record = out / "worlds" / "world_seconds.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    t0 = time.perf_counter()
    Pipeline(out, setup, progress, out / "worlds").train_manifest()
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps({"seconds": round(seconds, 1)}))
    return seconds


def _notes(name: str, sweep: pd.DataFrame | None, card: dict) -> str:
    t = card.get("all_checkpoints_timing", {})
    text = ""
    if t.get("base_seconds") is not None:
        text += (
            "Training all three shipped checkpoints with scripts/train_organism.py took "
            f"{t['job_wall_seconds'] / 60:.1f} min of wall time on 2 CPU cores: "
            f"{t['world_seconds'] / 60:.1f} min writing the training world, "
            f"{t['base_seconds'] / 60:.1f} min for vl-base (stages 0 and 1, decoding included), and "
            f"{t['av_stage2_wall_seconds'] / 60:.1f} min for the stage 2 of av-vision-heavy and av-balanced, "
            "trained side by side with one thread each.\n"
        )
    if sweep is not None and name != "vl-base":
        text += "\n## The stage-2 sweep this recipe comes from\n\n" + dominance_table(sweep) + "\n"
    return text


def _map_page(sweep: pd.DataFrame) -> str:
    points = [dict(zip(SWEEP_GRID, v, strict=True)) for v in itertools.product(*SWEEP_GRID.values())]
    missing = [p for p in points if not any(all(r[k] == v for k, v in p.items()) for r in sweep.to_dict("records"))]
    text = (
        "# Dominance map of the organism's stage-2 recipes\n\n"
        "Each row: stage 2 trained from the same vision-language base with one setting of the knobs; measured on "
        "held-out clips whose sound is swapped for an unrelated class ('what do you hear?': does the answer follow "
        "the audio, the vision, or neither), beside audio-only and video-only accuracy. Written by "
        "`avlens organism sweep`.\n\n" + dominance_table(sweep) + "\n\n"
        "The rows audio+lm / 0.0 and audio+lm-full / 0.3 are the recipes of av-vision-heavy and av-balanced as the "
        "sweep trained them. The shipped checkpoints were trained again by scripts/train_organism.py in the timed "
        "job (the two stage-2 runs side by side, one thread each, so their floating-point rounding differs from "
        "the sweep's two-thread runs); their own evaluation is in their MODEL.md.\n"
    )
    if missing:
        text += "\nPoints of the grid not measured (the sweep was stopped for time; re-run it to add them):\n\n"
        text += "".join(f"- {json.dumps(p)}\n" for p in missing)
    return text


if __name__ == "__main__":
    main()
