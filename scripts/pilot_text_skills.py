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

Resumable runs. With ``--ckpt DIR`` the whole training state (weights, optimizer, step, the sampler's and the
training loop's random states, the losses so far) is saved to ``DIR/state.pt`` every ``--save-every`` steps, at
the end, and when the run is stopped between two steps: by SIGTERM, by Ctrl-C (SIGINT), after ``--stop-after``
steps of this session or at the ``--stop-at`` time. The run's settings are saved in ``DIR/pilot.json``.
``--resume DIR`` continues that very run: the lr schedule, the curriculum and the example stream go on where they
stopped, so a run stopped and resumed draws the same batches and ends with the same weights as one run straight
through (tested). It takes the settings from ``DIR/pilot.json``; only the session's own flags (``--threads``,
``--log``, ``--save-every``, ``--stop-after``, ``--stop-at``, ``--report-every``) may be given.

    OMP_NUM_THREADS=1 python scripts/pilot_text_skills.py --steps 6000 ... --ckpt /work/pilots/p5 --stop-at 06:25
    OMP_NUM_THREADS=1 python scripts/pilot_text_skills.py --resume /work/pilots/p5 --log docs/pilots/p5.jsonl

``--export-weights OUT --resume DIR`` writes the weights alone in float16 (``OUT/weights.safetensors``, small
enough to commit) with ``OUT/pilot.json`` (settings, step), and trains nothing. ``--from-weights OUT --ckpt DIR``
starts again from such weights, **with a fresh optimizer**: the step, the lr schedule and the curriculum's clock
continue from the saved step, but AdamW's moments start at zero, the weights were rounded to float16, and the
examples come from a new stream (seeded from the seed and the step), so it is a continuation, not the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from avlens.organism.data import (
    LETTERS,
    LETTERS_V2,
    WORLD,
    Bank,
    Batcher,
    Example,
    ExampleSampler,
    Mixture,
    SkillMixture,
)
from avlens.organism.model import VOCABULARY_V2, VOCABULARY_V2_LETTERS, OrganismConfig, new_organism
from avlens.organism.train import Stage, _lr, train_stage
from avlens.organism.world import CLASSES

V2 = OrganismConfig(layers=8, hidden=192, heads=6, kv_heads=3, ffn=576)
"""The previous v2 attempt's sizes."""

BUCKETS = {"choice-4-7": (4, 7), "choice-8-13": (8, 13), "choice-14-20": (14, 20)}
"""Multiple-choice held-out kinds: option counts uniform within each bucket."""

LETTER_SETS = {"plain": (LETTERS, VOCABULARY_V2), "v2": (LETTERS_V2, VOCABULARY_V2_LETTERS)}
"""``--letters``: the option letters and the vocabulary that holds them. "plain" (a-t, pilots p0-p4) has "a" and
"i", which are also ordinary words of the data; "v2" has letters used nowhere else."""

SESSION_FLAGS = ("threads", "log", "save_every", "stop_after", "stop_at", "report_every", "out")
"""Flags of one session, which a resumed run may set anew; every other flag is a setting of the run."""

RUNTIME_FLAGS = (*SESSION_FLAGS, "ckpt", "resume", "export_weights", "from_weights")

LOOKUP_BUCKETS = {"choice-2-3": (2, 3), "lookup-2-3": (2, 3), "lookup-4-7": (4, 7), "lookup-8-20": (8, 20)}
"""Held-out kinds added with option lookup (drawn after the others, which stay the examples they were)."""


def text_bank() -> Bank:
    """A bank of one blank clip per class: the text stage draws no media, but the sampler and batcher want a
    bank (its classes, the patch grid of a clip)."""
    n = len(CLASSES)
    frames = np.zeros((n, 4, WORLD.height, WORLD.width, 3), dtype=np.uint8)
    return Bank(frames, np.zeros((n, 32000), dtype=np.float32), list(CLASSES), 2.0)


def held_out(bank: Bank, seed: int, n: int, letters: tuple[str, ...] = LETTERS) -> dict[str, list[Example]]:
    """``n`` held-out examples per kind, drawn from ``seed`` (not the training seed), with option ``letters``
    (which change the option words only: the examples are the same for either letter set)."""
    base = ExampleSampler(bank, Mixture(text=True), seed)
    kinds: dict[str, list[Example]] = {"see": [], "hear": [], "yes-no": []}
    names = {"text-see": "see", "text-hear": "hear", "text-see-yn": "yes-no", "text-hear-yn": "yes-no"}
    while min(len(v) for v in kinds.values()) < n:
        ex = base.draw()
        name = names.get(ex.kind)
        if name is not None and len(kinds[name]) < n:
            kinds[name].append(ex)
    skills = ExampleSampler(bank, SkillMixture(text=True, letters=letters), seed + 1)
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
            return 1 / len(re.findall(r"\b[a-v]\. ", ex.question))
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


def config_of(args: argparse.Namespace) -> OrganismConfig:
    """The organism's sizes from the flags (the v2 sizes by default)."""
    return OrganismConfig(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn
    )


def settings_of(args: argparse.Namespace) -> dict:
    """The flags that define a run (everything but the runtime flags), as saved in ``pilot.json``."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}


def stage_of(args: argparse.Namespace) -> Stage:
    """The pilot's text stage from its settings."""
    span = int(args.steps * args.batch * args.curriculum_share) if args.curriculum else 0
    mixture = SkillMixture(
        text=True,
        text_which=args.which_share,
        text_choice=args.choice_share,
        text_lookup=args.lookup_share,
        which_clips=(2, 3),
        options=(args.options_min, 20),
        curriculum=span,
        letters=LETTER_SETS[args.letters][0],
    )
    return Stage(
        "pilot-text",
        args.steps,
        {"lm": 1.0},
        mixture,
        lr=args.lr,
        batch=args.batch,
        warmup=args.warmup,
        seed=args.seed,
    )


def stop_time(text: str | None) -> float | None:
    """``--stop-at``: an ISO date-time, or HH:MM (UTC, today), as a Unix time (None: no stop time)."""
    if not text:
        return None
    if re.fullmatch(r"\d{1,2}:\d{2}", text):
        hour, minute = map(int, text.split(":"))
        now = dt.datetime.now(dt.UTC)
        return now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
    when = dt.datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


class Stopper:
    """Asked between two steps whether to stop: after SIGTERM or SIGINT, after ``after`` steps of this session,
    or once the clock passes ``at`` (a Unix time). Installs its signal handlers on entry, restores them on exit."""

    def __init__(self, after: int = 0, at: float | None = None) -> None:
        self.after, self.at, self.steps, self.reason = after, at, 0, ""
        self._previous: dict = {}

    def _signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        self.steps += 1
        if not self.reason and self.after and self.steps >= self.after:
            self.reason = f"stop-after {self.after}"
        if not self.reason and self.at is not None and time.time() >= self.at:
            self.reason = "stop-at"
        return bool(self.reason)


def export_weights(state_path: Path, out: Path, args: argparse.Namespace) -> Path:
    """Write a saved state's weights alone in float16 (``out/weights.safetensors``) and ``out/pilot.json``: the
    run's settings and organism config, the step, and the commands that continue the run (exactly, from the
    full state; or from these weights with a fresh optimizer)."""
    from safetensors.torch import save_file

    saved = torch.load(state_path, weights_only=False)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in saved["model"].items()}
    save_file(tensors, str(out / "weights.safetensors"), metadata={"step": str(saved["step"])})
    script = "OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_text_skills.py"
    info = {
        "step": saved["step"],
        "of_steps": args.steps,
        "settings": settings_of(args),
        "config": config_of(args).__dict__,
        "letters": list(LETTER_SETS[args.letters][0]),
        "dtype": "float16",
        "resume_exact": f"{script} --resume {state_path.parent} --threads 1 --log LOG",
        "resume_from_weights": f"{script} --from-weights {out} --ckpt NEW_DIR --threads 1 --log LOG",
        "note": "the exact resume needs the full state (state.pt, kept outside git); these weights alone (float16,"
        " no optimizer or sampler state) continue with a fresh AdamW, the same lr schedule and curriculum clock"
        " from this step, and a new example stream: a continuation, not the same run",
    }
    (out / "pilot.json").write_text(json.dumps(info, indent=2) + "\n")
    return out / "weights.safetensors"


def state_from_weights(directory: Path, state_path: Path, args: argparse.Namespace) -> int:
    """A training state (``train_stage``'s format) from exported float16 weights: the weights in float32, no
    optimizer state (a fresh AdamW), the saved step (lr schedule and curriculum clock go on from it), and random
    states seeded from the seed and the step (a new example stream). Returns the step."""
    from safetensors.torch import load_file

    info = json.loads((directory / "pilot.json").read_text())
    step = int(info["step"])
    weights = {k: v.to(torch.float32) for k, v in load_file(str(directory / "weights.safetensors")).items()}
    torch.manual_seed(args.seed * 1_000_003 + step)
    state = {
        "model": weights,
        "optim": None,
        "head": None,
        "sampler": random.Random(args.seed * 1_000_003 + step).getstate(),
        "draws": step * args.batch,
        "rng": random.Random(args.seed * 1_000_003 + step + 1).getstate(),
        "torch": torch.get_rng_state(),
        "step": step,
        "log": {"stage": "pilot-text", "loss": [], "seconds": 0.0, "loss_from": step},
    }
    state_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, state_path)
    return step


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict:
    """Train the text stage with the pilot's settings and evaluate it; the JSON record.

    With ``args.eval_every`` > 0 the held-out accuracy per kind is also measured (on ``args.eval_n_during``
    examples per kind) before training and every ``eval_every`` steps, one line of ``args.log`` each. With
    ``args.ckpt`` the run is resumable (see the module's docstring); a run stopped before its last step skips
    the final evaluation and its record has ``"stopped"``."""
    torch.set_num_threads(args.threads)
    letters, vocabulary = LETTER_SETS[args.letters]
    config = config_of(args)
    bank = text_bank()
    adapter = new_organism(config, seed=args.seed, vocabulary=vocabulary)
    batcher = Batcher(adapter, bank)
    stage = stage_of(args)
    settings = {**settings_of(args), "config": config.__dict__, "curriculum_draws": stage.mixture.curriculum}
    ckpt = Path(args.ckpt) if args.ckpt else None
    state_path = ckpt / "state.pt" if ckpt is not None else None
    start, first, eval_total, offset = 0, 0, 0.0, 0.0
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        if args.from_weights and not state_path.exists():
            state_from_weights(Path(args.from_weights), state_path, args)
        if state_path.exists():
            saved = torch.load(state_path, weights_only=False)
            start, first = saved["step"], saved["log"].get("loss_from", 0)
            offset = saved["log"].get("seconds", 0.0)
            losses = list(saved["log"]["loss"])
            meta = ckpt / "pilot.json"
            eval_total = json.loads(meta.read_text()).get("eval_seconds", 0.0) if meta.exists() else 0.0
            del saved
        (ckpt / "pilot.json").write_text(json.dumps({"args": settings_of(args), "eval_seconds": eval_total}))
    if start == 0:
        losses = []
    curve = CurveLog(args.log)
    during = held_out(bank, args.eval_seed, args.eval_n_during, letters) if args.eval_every > 0 else {}
    last = {"step": start - start % args.eval_every if args.eval_every > 0 else start, "eval_seconds": eval_total}

    def measure(step: int) -> None:
        e0 = time.perf_counter()
        acc = scores(batcher, during)
        spent = time.perf_counter() - e0
        last["eval_seconds"] += spent
        recent = losses[max(last["step"] - first, 0) : step - first]
        seconds = time.perf_counter() - t0
        record = {
            "step": step,
            "loss": round(float(np.mean(recent)), 4) if recent else None,
            "seconds": round(seconds, 1),
            "train_seconds": round(seconds - last["eval_seconds"], 1),
            "eval_seconds": round(spent, 1),
            "lr": round(args.lr * _lr(stage, max(step - 1, 0)), 7),
            "accuracy": acc,
        }
        last["step"] = step
        curve.write(record)
        if ckpt is not None:
            (ckpt / "pilot.json").write_text(
                json.dumps({"args": settings_of(args), "eval_seconds": last["eval_seconds"]})
            )
        say(f"eval step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))

    def progress(done: int, total: int, loss: float) -> None:
        losses.append(loss)
        if done % args.report_every == 0 or done == total:
            say(f"step {done}/{total} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
        if args.eval_every > 0 and (done % args.eval_every == 0 or done == total):
            measure(done)

    if start > 0:
        how = "from float16 weights, fresh optimizer" if args.from_weights else "resumed"
        curve.write({"resumed": start, "how": how, "settings": settings, "threads": args.threads})
        say(f"{how} at step {start}")
    t0 = time.perf_counter() - offset
    if during and start == 0:
        chances = {name: round(chance(exs), 3) for name, exs in during.items()}
        curve.write({"settings": settings, "eval_n_during": args.eval_n_during, "chance": chances})
        measure(0)
    with Stopper(args.stop_after, stop_time(args.stop_at)) as stopper:
        log = train_stage(
            adapter,
            bank,
            stage,
            batcher=batcher,
            progress=progress,
            state_path=state_path,
            save_every=args.save_every,
            stop=stopper,
        )
    seconds = time.perf_counter() - t0 - last["eval_seconds"]
    done = log.get("stopped", args.steps)
    record = {
        "settings": settings,
        "steps_done": done,
        "seconds": round(seconds, 1),
        "final_loss": round(float(np.mean(log["loss"][-50:])), 4) if log["loss"] else None,
        "loss": log["loss"],
    }
    if "stopped" in log:
        record["stopped"] = {"step": done, "reason": stopper.reason}
        curve.write({"stopped": done, "reason": stopper.reason, "checkpoint": str(state_path) if ckpt else None})
        say(f"stopped at step {done} ({stopper.reason}); state saved: {state_path}")
        return record
    kinds = held_out(bank, args.eval_seed, args.eval_n, letters)
    record["accuracy"] = scores(batcher, kinds)
    record["chance"] = {name: round(chance(exs), 3) for name, exs in kinds.items()}
    curve.write({"final": {k: v for k, v in record.items() if k != "loss"}})
    return record


def parser() -> argparse.ArgumentParser:
    """The pilot's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--curriculum", action="store_true", help="grow option and clip counts over training")
    p.add_argument("--curriculum-share", type=float, default=0.5, help="share of training they grow over")
    p.add_argument("--which-share", type=float, default=0.25)
    p.add_argument("--choice-share", type=float, default=0.35)
    p.add_argument("--lookup-share", type=float, default=0.0, help="share of option lookup (no context)")
    p.add_argument("--options-min", type=int, default=4, help="fewest options of MC and lookup (2..20)")
    p.add_argument("--letters", choices=sorted(LETTER_SETS), default="plain", help="option letters (see LETTER_SETS)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps before the cosine decay")
    p.add_argument("--layers", type=int, default=V2.layers)
    p.add_argument("--hidden", type=int, default=V2.hidden)
    p.add_argument("--heads", type=int, default=V2.heads)
    p.add_argument("--kv-heads", type=int, default=V2.kv_heads)
    p.add_argument("--ffn", type=int, default=V2.ffn)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=0, help="measure held-out accuracy every N steps (0: off)")
    p.add_argument("--eval-n-during", type=int, default=100, help="held-out examples per kind during training")
    p.add_argument("--log", type=Path, default=None, help="append one JSON line per measurement here")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    p.add_argument("--ckpt", type=Path, default=None, help="save the training state here (resumable)")
    p.add_argument("--save-every", type=int, default=250, help="save the state every N steps (with --ckpt)")
    p.add_argument("--resume", type=Path, default=None, help="continue the run saved in this --ckpt directory")
    p.add_argument("--stop-after", type=int, default=0, help="stop cleanly after N steps of this session (0: never)")
    p.add_argument("--stop-at", default=None, help="stop cleanly at this time (HH:MM UTC today, or ISO date-time)")
    p.add_argument("--export-weights", type=Path, default=None, help="with --resume: write float16 weights, exit")
    p.add_argument("--from-weights", type=Path, default=None, help="start from exported weights (fresh optimizer)")
    return p


def resolve(args: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """The flags of a ``--resume``/``--from-weights`` run: the saved run's settings, with this session's flags.

    A setting given on the command line that differs from the saved one is refused (it would not be the same
    run)."""
    source = args.resume or args.from_weights
    if source is None:
        return args
    saved = json.loads((Path(source) / "pilot.json").read_text())
    settings = saved.get("args") or {
        k: v for k, v in saved["settings"].items() if k not in ("config", "curriculum_draws")
    }
    merged = vars(args).copy()
    for k, v in settings.items():
        given = merged.get(k)
        if given != p.get_default(k) and given != v:
            raise SystemExit(f"--{k.replace('_', '-')} {given} differs from the saved run's {v}")
        merged[k] = v
    if args.resume is not None:
        merged["ckpt"] = args.resume
    elif args.ckpt is None:
        raise SystemExit("--from-weights needs --ckpt (where the continued run's state goes)")
    return argparse.Namespace(**merged)


def main() -> None:
    p = parser()
    args = resolve(p.parse_args(), p)
    if args.export_weights is not None:
        if args.resume is None:
            raise SystemExit("--export-weights needs --resume DIR (the run to export)")
        path = export_weights(Path(args.resume) / "state.pt", args.export_weights, args)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    record = run(args, say=lambda s: print(s, flush=True))
    text = json.dumps({k: v for k, v in record.items() if k != "loss"}, indent=2)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
