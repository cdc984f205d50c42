"""How much tracing costs, and how much the engine saves over the papers' way. Prints one JSON object.

Model: a random Qwen2.5-Omni thinker with 8 decoder layers, hidden 512, and a prompt of about 500 tokens of
interleaved audio and video (6 s: 384 video tokens, 150 audio tokens). Every figure is a ratio of median
wall times over repeats on this machine, measured in the same process, all taking turns round by round:

- capture_ratio: residual capture at every layer (avlens) / a bare sdpa forward of the model;
- nnsight_capture_ratio: the same capture through nnsight / the bare forward; capture_over_nnsight_paired: avlens's
  capture / nnsight's, the median over rounds of the ratio within a round (below 1: avlens's costs less);
- knockout_ratio: one knockout window (last -> video, layers 4-5) / the bare forward;
- batched_speedup: 8 knockout conditions on one sample (4 windows of last -> video, 4 of video -> audio):
  8 separate eager forwards with the mask written by a pre-hook (the papers' code) / avlens run_conditions;
- sweep_speedup: single-layer windows last -> video and last -> audio over every layer (16 conditions): one full
  eager forward per condition / avlens run_conditions;
- sweep_over_plain_run: that sweep / avlens's own forward without interventions (the baseline any sweep needs:
  every condition reads all layers' keys/values), and sweep_speedup_if_conditions_were_free: the papers' sweep /
  that one forward (the ratio if the 16 conditions cost nothing beyond the baseline every condition needs).

Usage: python benchmarks/trace_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from avlens.models import Sample
from avlens.models.tiny import tiny_model
from avlens.trace import Capture, Knockout, run, run_conditions
from avlens.trace.reference import knockout_logits


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function, one per round. The functions take turns (one call each per round, after one
    warm-up round), so a slow spell of the machine falls on every figure alike instead of on whichever ran
    then. A function returning a float has timed itself (to leave out its set-up)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            if round_:
                times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b within the same round (less sensitive to the machine's drift between rounds)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapter = tiny_model("qwen2.5-omni", layers=8, hidden=512, heads=8, kv_heads=4, encoder_hidden=64, seed=0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, 224, 224, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32)
    inputs = adapter.prepare(
        [Sample("what do you hear?", video=frames, audio=audio)], interleave=True, video_max_pixels=224 * 224
    )
    model, kwargs = adapter.model, adapter.model_inputs(inputs)
    n = adapter.n_layers

    def on_sdpa(fn: Callable[[], object]) -> Callable[[], float]:
        """fn run with the decoder on transformers' own sdpa attention (whatever the model was set to); its
        time, without the switching."""

        def call() -> float:
            before = adapter.text_attention
            adapter.set_text_attention("sdpa")
            try:
                with torch.no_grad():
                    t = time.perf_counter()
                    fn()
                    return time.perf_counter() - t
            finally:
                adapter.set_text_attention(before)

        return call

    windows = [range(s, s + 2) for s in range(0, n, 2)]
    eight = {f"last->video {w[0]}": [Knockout("last", "video", layers=w)] for w in windows}
    eight |= {f"video->audio {w[0]}": [Knockout("video", "audio", layers=w)] for w in windows}
    sweep = {f"last->{g} {i}": [Knockout("last", g, layers=[i])] for g in ("video", "audio") for i in range(n)}
    fns = {
        "bare": on_sdpa(lambda: model(**kwargs)),
        "plain": lambda: run(adapter, inputs),
        "capture": lambda: run(adapter, inputs, capture=[Capture.residual()]),
        "knockout": lambda: run(adapter, inputs, [Knockout("last", "video", layers=[4, 5])]),
        "eight": lambda: run_conditions(adapter, inputs, eight),
        "eight_papers": lambda: [knockout_logits(adapter, inputs, c) for c in eight.values()],
        "sweep": lambda: run_conditions(adapter, inputs, sweep),
        "sweep_papers": lambda: [knockout_logits(adapter, inputs, c) for c in sweep.values()],
    }
    nnsight = nnsight_capture(adapter, kwargs)
    if nnsight is not None:
        fns["nnsight"] = on_sdpa(nnsight)
    rounds = timed(fns, args.repeats)
    t = {name: statistics.median(ts) for name, ts in rounds.items()}

    print(
        json.dumps(
            {
                "model": f"Qwen2.5-Omni thinker, {n} layers, hidden {adapter.hidden_size}, random weights",
                "prompt_tokens": inputs.length,
                "layout": inputs.layout.counts(0),
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "bare_forward_s": round(t["bare"], 4),
                "capture_ratio": round(t["capture"] / t["bare"], 3),
                "nnsight_capture_ratio": round(t["nnsight"] / t["bare"], 3) if nnsight else None,
                "capture_over_nnsight_paired": round(paired(rounds["capture"], rounds["nnsight"]), 3)
                if nnsight
                else None,
                "knockout_ratio": round(t["knockout"] / t["bare"], 3),
                "batched_speedup": round(t["eight_papers"] / t["eight"], 2),
                "sweep_speedup": round(t["sweep_papers"] / t["sweep"], 2),
                "sweep_conditions": len(sweep),
                "sweep_over_plain_run": round(t["sweep"] / t["plain"], 3),
                "sweep_speedup_if_conditions_were_free": round(t["sweep_papers"] / t["plain"], 2),
                "median_seconds": {name: round(v, 4) for name, v in t.items()},
            },
            indent=2,
        )
    )


def nnsight_capture(adapter, kwargs: dict) -> Callable[[], None] | None:
    """The bare forward traced by nnsight, saving every decoder layer's output (None if nnsight is missing)."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    traced = NNsight(adapter.model)
    layers = traced.model.language_model.layers

    def capture() -> None:
        saved = []  # nnsight runs the block's code in its own frame: append to an outer list
        with traced.trace(**kwargs):
            for layer in layers:
                saved.append(layer.output.save())
        assert len(saved) == adapter.n_layers and saved[0].shape[-1] == adapter.hidden_size

    return capture


if __name__ == "__main__":
    main()
