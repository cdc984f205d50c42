"""Pilot: can the organism-v2 language model learn which-of-N clips and lettered multiple choice from text?

Trains only the text stage (stage 0 text: media written as words) of an 8-layer organism on a
:class:`~avlens.organism.data.SkillMixture`, then measures greedy answer-token accuracy on held-out text
examples drawn from another seed, per kind (see, hear, yes/no, which of 2, which of 3, multiple choice and
option lookup by option-count bucket). Prints (and optionally writes) one JSON record.

With ``--eval-every N`` it also measures a smaller held-out set (``--eval-n-during`` per kind) before training
and every N steps, and appends one JSON line per measurement to ``--log`` (flushed as written), so a long run
leaves a learning curve even when it is stopped before the end.

    OMP_NUM_THREADS=1 python scripts/pilot_text_skills.py --steps 1000 --lr 5e-4 --batch 48 --curriculum
    OMP_NUM_THREADS=1 python scripts/pilot_text_skills.py --steps 6000 --curriculum --options-min 2 \
        --lookup-share 0.2 --eval-every 250 --log docs/pilots/run.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from avlens.organism.data import WORLD, Bank, Batcher, Example, ExampleSampler, Mixture, SkillMixture
from avlens.organism.model import VOCABULARY_V2, OrganismConfig, new_organism
from avlens.organism.train import Stage, _lr, train_stage
from avlens.organism.world import CLASSES

V2 = OrganismConfig(layers=8, hidden=192, heads=6, kv_heads=3, ffn=576)
"""The previous v2 attempt's sizes."""

BUCKETS = {"choice-4-7": (4, 7), "choice-8-13": (8, 13), "choice-14-20": (14, 20)}
"""Multiple-choice held-out kinds: option counts uniform within each bucket."""

LOOKUP_BUCKETS = {"choice-2-3": (2, 3), "lookup-2-3": (2, 3), "lookup-4-7": (4, 7), "lookup-8-20": (8, 20)}
"""Held-out kinds added with option lookup (drawn after the others, which stay the examples they were)."""


def text_bank() -> Bank:
    """A bank of one blank clip per class: the text stage draws no media, but the sampler and batcher want a
    bank (its classes, the patch grid of a clip)."""
    n = len(CLASSES)
    frames = np.zeros((n, 4, WORLD.height, WORLD.width, 3), dtype=np.uint8)
    return Bank(frames, np.zeros((n, 32000), dtype=np.float32), list(CLASSES), 2.0)


def held_out(bank: Bank, seed: int, n: int) -> dict[str, list[Example]]:
    """``n`` held-out examples per kind, drawn from ``seed`` (not the training seed)."""
    base = ExampleSampler(bank, Mixture(text=True), seed)
    kinds: dict[str, list[Example]] = {"see": [], "hear": [], "yes-no": []}
    names = {"text-see": "see", "text-hear": "hear", "text-see-yn": "yes-no", "text-hear-yn": "yes-no"}
    while min(len(v) for v in kinds.values()) < n:
        ex = base.draw()
        name = names.get(ex.kind)
        if name is not None and len(kinds[name]) < n:
            kinds[name].append(ex)
    skills = ExampleSampler(bank, SkillMixture(text=True), seed + 1)
    kinds["which-2"] = [skills.text_which(2) for _ in range(n)]
    kinds["which-3"] = [skills.text_which(3) for _ in range(n)]
    rng = random.Random(seed + 2)
    for name, (lo, hi) in BUCKETS.items():
        kinds[name] = [skills.text_choice(rng.randint(lo, hi)) for _ in range(n)]
    for name, (lo, hi) in LOOKUP_BUCKETS.items():
        draw = skills.text_lookup if name.startswith("lookup") else skills.text_choice
        kinds[name] = [draw(rng.randint(lo, hi)) for _ in range(n)]
    return kinds


def chance(examples: list[Example]) -> float:
    """The accuracy of a uniform guess among an example's possible answers, averaged over the examples: 1/n of
    n letters or clips, 1/2 for yes/no, 1/13 for a see/hear answer (a class or "nothing")."""

    def one(ex: Example) -> float:
        if ex.answer in ("yes", "no"):
            return 0.5
        if ex.answer.isdigit():
            return 1 / len(re.findall(r"clip \d :", ex.question))
        if ex.kind.startswith(("text-choice", "text-lookup")):
            return 1 / len(re.findall(r"\b[a-t]\. ", ex.question))
        return 1 / (len(CLASSES) + 1)

    return sum(map(one, examples)) / len(examples)


@torch.no_grad()
def accuracy(batcher: Batcher, examples: list[Example], batch: int = 64) -> float:
    """Share of examples whose greedy first answer token is the answer's (every answer here is one token).

    Runs the model in eval mode and puts it back in the mode it was in (so it may run in the middle of
    training)."""
    tok = batcher.adapter.tokenizer
    model = batcher.adapter.model
    was_training = model.training
    model.eval()
    right = 0
    for s in range(0, len(examples), batch):
        group = examples[s : s + batch]
        inputs = batcher.batch(group, with_answers=False)
        predicted = model(**inputs, use_cache=False).logits[:, -1].argmax(-1)
        expected = torch.tensor([tok.encode(ex.answer, add_special_tokens=False)[0] for ex in group])
        right += int(predicted.eq(expected).sum())
    model.train(was_training)
    return right / len(examples)


def scores(batcher: Batcher, kinds: dict[str, list[Example]]) -> dict[str, float]:
    """Held-out accuracy per kind."""
    return {name: round(accuracy(batcher, exs), 3) for name, exs in kinds.items()}


class CurveLog:
    """Appends one JSON line per record to a file (None: nowhere), flushed as written."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict:
    """Train the text stage with the pilot's settings and evaluate it; the JSON record.

    With ``args.eval_every`` > 0 the held-out accuracy per kind is also measured (on ``args.eval_n_during``
    examples per kind) before training and every ``eval_every`` steps, one line of ``args.log`` each."""
    torch.set_num_threads(args.threads)
    bank = text_bank()
    adapter = new_organism(V2, seed=args.seed, vocabulary=VOCABULARY_V2)
    batcher = Batcher(adapter, bank)
    span = int(args.steps * args.batch * args.curriculum_share) if args.curriculum else 0
    mixture = SkillMixture(
        text=True,
        text_which=args.which_share,
        text_choice=args.choice_share,
        text_lookup=args.lookup_share,
        which_clips=(2, 3),
        options=(args.options_min, 20),
        curriculum=span,
    )
    stage = Stage(
        "pilot-text",
        args.steps,
        {"lm": 1.0},
        mixture,
        lr=args.lr,
        batch=args.batch,
        warmup=args.warmup,
        seed=args.seed,
    )
    settings = {
        "config": V2.__dict__,
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "warmup": args.warmup,
        "curriculum": args.curriculum,
        "curriculum_draws": span,
        "which_share": args.which_share,
        "choice_share": args.choice_share,
        "lookup_share": args.lookup_share,
        "options": [args.options_min, 20],
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "eval_n": args.eval_n,
        "threads": args.threads,
    }
    curve = CurveLog(args.log)
    during = held_out(bank, args.eval_seed, args.eval_n_during) if args.eval_every > 0 else {}
    losses: list[float] = []
    last = {"step": 0, "eval_seconds": 0.0}

    def measure(step: int) -> None:
        e0 = time.perf_counter()
        acc = scores(batcher, during)
        spent = time.perf_counter() - e0
        last["eval_seconds"] += spent
        recent = losses[last["step"] : step]
        record = {
            "step": step,
            "loss": round(float(np.mean(recent)), 4) if recent else None,
            "seconds": round(time.perf_counter() - t0, 1),
            "train_seconds": round(time.perf_counter() - t0 - last["eval_seconds"], 1),
            "eval_seconds": round(spent, 1),
            "lr": round(args.lr * _lr(stage, max(step - 1, 0)), 7),
            "accuracy": acc,
        }
        last["step"] = step
        curve.write(record)
        say(f"eval step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))

    def progress(done: int, total: int, loss: float) -> None:
        losses.append(loss)
        if done % args.report_every == 0 or done == total:
            say(f"step {done}/{total} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
        if args.eval_every > 0 and (done % args.eval_every == 0 or done == total):
            measure(done)

    t0 = time.perf_counter()
    if during:
        chances = {name: round(chance(exs), 3) for name, exs in during.items()}
        curve.write({"settings": settings, "eval_n_during": args.eval_n_during, "chance": chances})
        measure(0)
    log = train_stage(adapter, bank, stage, batcher=batcher, progress=progress)
    seconds = time.perf_counter() - t0 - last["eval_seconds"]
    kinds = held_out(bank, args.eval_seed, args.eval_n)
    record = {
        "settings": settings,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 3),
        "final_loss": round(float(np.mean(log["loss"][-50:])), 4),
        "accuracy": scores(batcher, kinds),
        "chance": {name: round(chance(exs), 3) for name, exs in kinds.items()},
    }
    curve.write({"final": record})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--curriculum", action="store_true", help="grow option and clip counts over training")
    parser.add_argument("--curriculum-share", type=float, default=0.5, help="share of training they grow over")
    parser.add_argument("--which-share", type=float, default=0.25)
    parser.add_argument("--choice-share", type=float, default=0.35)
    parser.add_argument("--lookup-share", type=float, default=0.0, help="share of option lookup (no context)")
    parser.add_argument("--options-min", type=int, default=4, help="fewest options of MC and lookup (2..20)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps before the cosine decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="measure held-out accuracy every N steps (0: off)")
    parser.add_argument("--eval-n-during", type=int, default=100, help="held-out examples per kind during training")
    parser.add_argument("--log", type=Path, default=None, help="append one JSON line per measurement here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args()
    record = run(args, say=lambda s: print(s, flush=True))
    text = json.dumps(record, indent=2)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
