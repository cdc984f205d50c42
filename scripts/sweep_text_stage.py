"""Sweep: which text-stage recipe of the 8-layer organism reaches the lettered skills soonest in wall time?

Issue 11 needs the text stage to fit about 15 minutes of the 45-minute training budget on 2 cores; p5 (hidden
192, batch 48, lr 5e-4) needed about 5000 steps for lettered multiple choice. This sweep trains the p5 text
mixture at every point of a grid of model width x batch size x learning rate, each point given about the same
wall time of one thread (its step count is set from its measured seconds per step, below), two points at a time
side by side (one thread each, as the shipping script trains). Each point logs its held-out accuracy per kind
eight times during training and at the end (``scripts/pilot_text_skills.py``'s JSON lines, eval seed 1000, 100
examples per kind during training and 200 at the end) into ``docs/pilots/sweep-text/``.

Each point's final training state goes to ``/work/pilots/sweep-text/<point>/state.pt`` (outside git), so the
point chosen from this map can be measured on another split (eval seed 2000) without training it again.

    python scripts/sweep_text_stage.py [--only NAME ...] [--dry-run]
    python scripts/sweep_text_stage.py --table    # the map, as Markdown
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "pilots" / "sweep-text"
STATES = Path("/work/pilots/sweep-text")  # each point's final training state (weights for another split's check)


def _words(text: str) -> list[str]:
    return text.split()


# Sizes: (hidden, heads, kv_heads, ffn), all with head dim 32 and 8 layers.
SIZES = {128: (128, 4, 2, 384), 192: (192, 6, 3, 576)}
BATCHES = (16, 48)
LRS = (5e-4, 1e-3)
# Seconds per step past the curriculum, one thread, idle machine (60-step timing runs, 2026-12-03):
# h128/b16 0.175, h128/b48 0.40, h192/b16 0.35, h192/b48 0.75. Steps give each point about 19 minutes.
STEPS = {(128, 16): 6000, (128, 48): 2800, (192, 16): 3200, (192, 48): 1500}
# p5's data and schedule shape (docs/pilots/p5/pilot.json), scaled to each point's step count.
COMMON = _words(
    "--letters v2 --options-min 2 --curriculum --curriculum-share 0.25"
    " --warmup 100 --eval-n-during 100 --eval-n 200 --eval-seed 1000 --threads 1"
)
# The second axis, run at the first grid's best point (h128, batch 48, lr 5e-4): the shares of which-clip,
# lettered multiple choice and option lookup (the rest are the old text kinds: see, hear, yes/no, describe).
# "p5" is p5's mixture, the first grid's; the others give the lettered kinds more of each step, since see, hear
# and yes/no reach 1.00 by step 2100 on p5's mixture.
MIXES = {"p5": (0.2, 0.2, 0.2), "mc40": (0.25, 0.4, 0.15), "mc50": (0.3, 0.5, 0.0)}
BEST = (128, 48, 5e-4)
# Third: at the best point, a lower lr (the skills rose as q1's lr decayed) and another training seed (is the best
# point's escape from the plateau its settings' or its seed's? a 4500-step text stage of that recipe, seed 0, in the
# first whole v2 job stayed on it).
MORE = [(128, 48, 3e-4, "p5", 0), (128, 48, 5e-4, "p5", 1)]


def points() -> list[tuple[str, list[str]]]:
    """Every grid point: (name, the pilot's flags)."""
    out = []
    grid = [(*hb, lr, "p5", 0) for hb, lr in itertools.product(itertools.product(SIZES, BATCHES), LRS)]
    grid += [(*BEST, mix, 0) for mix in MIXES if mix != "p5"] + MORE
    for hidden, batch, lr, mix, seed in grid:
        h, heads, kv, ffn = SIZES[hidden]
        steps = STEPS[(hidden, batch)]
        name = f"h{hidden}-b{batch}-lr{lr:g}" + ("" if mix == "p5" else f"-{mix}") + (f"-s{seed}" if seed else "")
        which, choice, lookup = MIXES[mix]
        flags = _words(
            f"--hidden {h} --heads {heads} --kv-heads {kv} --ffn {ffn} --batch {batch} --lr {lr} --steps {steps}"
            f" --eval-every {steps // 8} --report-every 250 --save-every 1000"
            f" --which-share {which} --choice-share {choice} --lookup-share {lookup} --seed {seed}"
        )
        files = ["--log", str(OUT / f"{name}.jsonl"), "--out", str(OUT / f"{name}.json"), "--ckpt", str(STATES / name)]
        out.append((name, [*COMMON, *flags, *files]))
    return out


KINDS = (
    "see", "hear", "yes-no", "which-2", "which-3", "lookup-2-3", "lookup-4-7", "lookup-8-20",
    "choice-2-3", "choice-4-7", "choice-8-13", "choice-14-20",
)  # fmt: skip
LETTERED = ("choice-4-7", "choice-8-13", "choice-14-20")


def table() -> str:
    """The map as Markdown: per point, its time, its final held-out accuracy per kind (200 per kind) and the
    training minutes at which the lettered multiple choice first reached 0.9 in every bucket (100 per kind)."""
    head = "| point | steps | s/step | train min | " + " | ".join(KINDS) + " | MC 4-20 all >= 0.9 at min |"
    lines = [head, "|---" * (len(KINDS) + 5) + "|"]
    for name, _ in points():
        path = OUT / f"{name}.jsonl"
        if not path.exists():
            lines.append(f"| {name} | not run |" + " |" * (len(KINDS) + 3))
            continue
        records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        curve = [r for r in records if "accuracy" in r]
        final = next((r["final"] for r in records if "final" in r), None)
        reached = next((r["train_seconds"] / 60 for r in curve if all(r["accuracy"][k] >= 0.9 for k in LETTERED)), None)
        steps = final["steps_done"] if final else curve[-1]["step"]
        seconds = final["seconds"] if final else curve[-1]["train_seconds"]
        acc = final["accuracy"] if final else curve[-1]["accuracy"]
        cells = " | ".join(f"{acc[k]:.2f}" for k in KINDS)
        state = "" if final else " (unfinished)"
        lines.append(
            f"| {name}{state} | {steps} | {seconds / max(steps, 1):.3f} | {seconds / 60:.1f} | {cells} | "
            + (f"{reached:.1f}" if reached is not None else "never")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="run only these points (names as h128-b16-lr0.0005)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the map (Markdown) of the points run, and exit")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    OUT.mkdir(parents=True, exist_ok=True)
    todo = [(n, f) for n, f in points() if not args.only or n in args.only]
    todo = [(n, f) for n, f in todo if not (OUT / f"{n}.json").exists()]  # finished points are kept

    def one(item: tuple[str, list[str]]) -> int:
        name, flags = item
        cmd = [sys.executable, str(ROOT / "scripts" / "pilot_text_skills.py"), *flags]
        if args.dry_run:
            print(" ".join(cmd))
            return 0
        (OUT / f"{name}.jsonl").unlink(missing_ok=True)  # an unfinished point starts again
        shutil.rmtree(STATES / name, ignore_errors=True)
        with open(OUT / f"{name}.txt", "w") as log:
            return subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
            ).returncode

    with ThreadPoolExecutor(2) as pool:
        for (name, _), rc in zip(todo, pool.map(one, todo), strict=True):
            print(name, "rc", rc, flush=True)


if __name__ == "__main__":
    main()
