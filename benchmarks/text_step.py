"""What splitting a training step's prompts by length saves on the organism-v2 text stage. Prints one JSON object.

Model: the v2 pilot's size (8 decoder layers, hidden 192, the v2 vocabulary), random weights. Examples: the p5
pilot's text mixture (see, hear, describe, which of 2-3 clips, lettered multiple choice and option lookup with
2-20 options) past its curriculum, where prompts are longest. One training step (forward, backward, AdamW) on 48
examples, as ``train_stage`` runs it, with every example in one padded forward (``PIECE`` above the batch) and
split by length (the default ``PIECE``, 16: three forwards). The two take turns on the same batches, round by
round; figures are medians over rounds:

- seconds_per_step: {one_forward, split};
- speedup: one_forward / split;
- fill: the share of the padded positions that hold a prompt or answer token, {one_forward, split};
- first_step_loss_difference: |loss(one) - loss(split)| of the first (warm-up) round, when both variants still have
  the same weights: float rounding only.

Usage: python benchmarks/text_step.py [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import pilot_text_skills as pilot

from avlens.organism import train as train_module
from avlens.organism.data import Batcher, ExampleSampler
from avlens.organism.model import new_organism

BATCH = 48


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = json.loads((Path(__file__).resolve().parent.parent / "docs/pilots/p5/pilot.json").read_text())
    run = pilot.parser().parse_args(["--out", "unused"])
    vars(run).update(settings["settings"])
    stage = pilot.stage_of(run)
    vocabulary = pilot.LETTER_SETS[run.letters][1]
    bank = pilot.text_bank()
    sampler = ExampleSampler(bank, stage.mixture, 0)
    sampler.draws = stage.mixture.curriculum  # past the curriculum: every option count up to 20
    base = new_organism(pilot.V2, vocabulary=vocabulary)
    batcher = Batcher(base, bank)
    default = train_module.PIECE
    variants = {"one_forward": 10 * BATCH, "split": default}
    models = {}
    for name in variants:
        adapter = copy.deepcopy(base)
        adapter.model.train()
        params = train_module.parameters(adapter.model, "lm")
        for p in params:
            p.requires_grad_(True)
        models[name] = (adapter.model, torch.optim.AdamW(params, lr=1e-4))

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    fills: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 1):  # the first round warms up and is not counted
        examples = [sampler.draw() for _ in range(BATCH)]
        losses = {}
        for name, piece in variants.items():
            train_module.PIECE = piece
            model, optim = models[name]
            pieces = train_module._pieces(batcher, examples, False)
            lengths = [[len(batcher.prompt_ids(e, False)) + 2 for e in p] for p in pieces]
            fills[name].append(sum(map(sum, lengths)) / sum(len(n) * max(n) for n in lengths))
            start = time.perf_counter()
            optim.zero_grad(set_to_none=True)
            losses[name] = float(train_module._lm_step(model, batcher, examples, random.Random(r)))
            optim.step()
            if r:
                seconds[name].append(time.perf_counter() - start)
        if r == 0:  # same weights: the losses differ by rounding only
            first_difference = abs(losses["one_forward"] - losses["split"])
    train_module.PIECE = default
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(
        json.dumps(
            {
                "rounds": args.rounds,
                "threads": args.threads,
                "batch": BATCH,
                "piece": default,
                "seconds_per_step": {k: round(v, 3) for k, v in median.items()},
                "speedup": round(median["one_forward"] / median["split"], 3),
                "fill": {k: round(float(np.mean(v)), 3) for k, v in fills.items()},
                "first_step_loss_difference": first_difference,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
