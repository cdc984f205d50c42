"""Why does the organism answer "which of N clips has the sound of X / shows X?" at chance?

On a checkpoint and a held-out world, builds which-of-N questions about congruent clips (exactly one clip has X,
its place drawn at random) and measures, at every layer, on the engine's public API:

- ``answer``: accuracy of the clip number with the highest logit (among "1".."N"), and how often each number is
  chosen (a model that ignores the clips picks by place);
- ``probe_index``: how well a linear probe (5-fold cross-validated logistic regression) reads a clip's number k
  from the residual at the clip's last token (its closing marker) and at the mean of its media tokens: whether
  a clip's tokens know which clip they are (needed to answer with its number);
- ``probe_class``: the same for the clip's class (its content is there);
- ``probe_target``: the same, at the last prompt position, for the number of the clip that has X (the answer is
  decodable there even if the head does not read it);
- ``attention``: attention mass from the last position to the clip that has X and to the others (mean over
  questions, max over heads): whether the question looks up the clip by its content.

Prints JSON; with --out, also writes it there.

    .venv/bin/python scripts/diagnose_which.py --model organism:av-balanced --clips 2 --n 160
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from avlens import load
from avlens.models.base import Clip, Sample
from avlens.organism.checkpoints import shipped_world
from avlens.organism.data import WHICH_HEAR, WHICH_SEE, article
from avlens.organism.recipes import V2_WORLD
from avlens.organism.world import WorldConfig, write_world
from avlens.trace import Capture, run


def questions(manifest: Path, n_clips: int, n: int, seed: int) -> list[dict]:
    """``n`` which-of-``n_clips`` questions (half about sounds, half about pictures) on congruent clips."""
    rows = [r for r in pd.read_json(manifest, lines=True).to_dict("records") if r["condition"] == "congruent"]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        hear = len(out) % 2 == 0
        key = "audio_label" if hear else "visual_label"
        chosen = rng.sample(rows, n_clips)
        if len({r[key] for r in chosen}) < n_clips:
            continue
        k = rng.randrange(n_clips)
        target = chosen[k][key]
        q = rng.choice(WHICH_HEAR if hear else WHICH_SEE).format(a=article(target), x=target)
        clips = [Clip(video=str(manifest.parent / r["video"]), audio=str(manifest.parent / r["audio"])) for r in chosen]
        out.append({"prompt": q, "clips": clips, "target": k, "classes": [r[key] for r in chosen], "hear": hear})
    return out


def measure(adapter, qs: list[dict]) -> dict:
    """Per question: the answer logits, per-layer residuals at each clip's end and mean, attention to clips."""
    n_clips = len(qs[0]["clips"])
    digits = [adapter.tokenizer.convert_tokens_to_ids(str(i + 1)) for i in range(n_clips)]
    ends, means, lasts, attn, chosen = [], [], [], [], []
    for i, q in enumerate(qs):
        inputs = adapter.prepare([Sample(q["prompt"], clips=q["clips"], id=f"q{i}")])
        clip_groups = [f"clip{k}" for k in range(n_clips)]
        trace = run(
            adapter,
            inputs,
            capture=[Capture.residual(), Capture.attention("last", clip_groups)],
            logits="last",
        )
        layout = inputs.layout
        spans = [layout.positions(g, 0) for g in clip_groups]
        res = trace.captures["residual"]  # layer -> (1, L, D)
        ends.append([[res[layer][0, s[-1]].float().numpy() for s in spans] for layer in sorted(res)])
        media = [layout.positions(f"clip{k}&audio+clip{k}&video", 0) for k in range(n_clips)]
        means.append([[res[layer][0, m].float().mean(0).numpy() for m in media] for layer in sorted(res)])
        lasts.append([res[layer][0, -1].float().numpy() for layer in sorted(res)])
        att = trace.captures["attention"]  # layer -> (1, H, N)
        attn.append(np.stack([att[layer][0].float().numpy() for layer in sorted(att)]))  # (layers, H, N)
        chosen.append(int(torch.argmax(trace.logits[0, digits])))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(qs)}", file=sys.stderr)
    return {
        "ends": np.array(ends),  # (Q, layers+1, N, D)
        "means": np.array(means),
        "lasts": np.array(lasts),  # (Q, layers+1, D)
        "attn": np.array(attn),  # (Q, layers, H, N)
        "chosen": np.array(chosen),
    }


def probe(x: np.ndarray, y: np.ndarray) -> float:
    """5-fold cross-validated accuracy of a logistic-regression probe."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    return float(cross_val_score(clf, x, y, cv=5).mean())


def report(qs: list[dict], m: dict) -> dict:
    target = np.array([q["target"] for q in qs])
    n_q, n_layers1, n_clips, _ = m["ends"].shape
    classes = np.array([q["classes"] for q in qs])  # (Q, N) the asked modality's class of each clip
    out: dict = {
        "questions": n_q,
        "clips": n_clips,
        "answer": {
            "accuracy": float((m["chosen"] == target).mean()),
            "chance": 1 / n_clips,
            "chosen_share": {str(k + 1): float((m["chosen"] == k).mean()) for k in range(n_clips)},
        },
        "probe_index": {"clip_end": [], "clip_mean": []},
        "probe_class": {"clip_end": [], "clip_mean": []},
        "probe_target": [],
        "attention": {"to_target": [], "to_others": []},
    }
    index = np.tile(np.arange(n_clips), n_q)
    for layer in range(n_layers1):
        for where, feats in (("clip_end", m["ends"]), ("clip_mean", m["means"])):
            x = feats[:, layer].reshape(n_q * n_clips, -1)
            out["probe_index"][where].append(round(probe(x, index), 3))
            out["probe_class"][where].append(round(probe(x, classes.reshape(-1)), 3))
        out["probe_target"].append(round(probe(m["lasts"][:, layer], target), 3))
    to_target, to_others = target_attention(m["attn"], target)  # (Q, layers, H) each
    for layer in range(m["attn"].shape[1]):
        out["attention"]["to_target"].append([round(float(v), 4) for v in to_target[:, layer].mean(0)])
        out["attention"]["to_others"].append([round(float(v), 4) for v in to_others[:, layer].mean(0)])
    return out


def target_attention(attn: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From ``attn`` (Q, layers, H, N), the attention mass of the last position to clips, and ``target`` (Q,), the
    index of the clip with X: its mass to that clip and its mean mass to each other clip, both (Q, layers, H)."""
    onehot = np.eye(attn.shape[-1])[target].astype(bool)  # (Q, N)
    to_target = np.where(onehot[:, None, None, :], attn, 0).sum(-1)
    to_others = (attn.sum(-1) - to_target) / (attn.shape[-1] - 1)
    return to_target, to_others


def world_config(v2: bool) -> WorldConfig:
    """The world of the checkpoint studied: v2's (3 s clips, late sounds) or the shipped checkpoints'."""
    return V2_WORLD if v2 else shipped_world()


def held_out(directory: Path, clips: int, seed: int, world: WorldConfig) -> Path:
    """A held-out world of ``clips`` clips written under ``directory``; its manifest."""
    return write_world(directory / "world", clips, seed=seed, cfg=world, workers=1)


def emit(record: dict, out: Path | None) -> None:
    """Print ``record`` as one JSON line, and write it to ``out`` if given."""
    text = json.dumps(record)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism:av-balanced")
    ap.add_argument("--clips", type=int, default=2, help="clips per question (2 or 3)")
    ap.add_argument("--n", type=int, default=160, help="questions")
    ap.add_argument("--world-clips", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4343, help="the held-out world's seed (never used in training)")
    ap.add_argument("--v2", action="store_true", help="the v2 world (3 s clips, late sounds), for a v2 checkpoint")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = held_out(Path(tmp), args.world_clips, args.seed, world_config(args.v2))
        qs = questions(manifest, args.clips, args.n, args.seed)
        result = {"model": args.model, "world_seed": args.seed, **report(qs, measure(adapter, qs))}
    emit(result, args.out)


if __name__ == "__main__":
    main()
