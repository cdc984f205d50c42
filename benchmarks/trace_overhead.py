"""How much tracing costs, and how much the engine saves over the papers' way. Prints one JSON object.

Model: a random Qwen2.5-Omni thinker with 8 decoder layers, hidden 512, and a prompt of about 500 tokens of
interleaved audio and video (6 s: 384 video tokens, 150 audio tokens). Every figure is a ratio of median
wall times over repeats on this machine, measured in the same process:

- capture_ratio: residual capture at every layer (avlens) / a bare sdpa forward of the model;
- nnsight_capture_ratio: the same capture through nnsight / the bare forward;
- knockout_ratio: one knockout window (last -> video, layers 4-5) / the bare forward;
- batched_speedup: 8 knockout conditions on one sample (4 windows of last -> video, 4 of video -> audio):
  8 separate eager forwards with the mask written by a pre-hook (the papers' code) / avlens run_conditions;
- sweep_speedup: single-layer windows last -> video and last -> audio over every layer (16 conditions): one full
  eager forward per condition / avlens run_conditions.

Usage: python benchmarks/trace_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from avlens.models import Sample
from avlens.models.tiny import tiny_model
from avlens.trace import Capture, Knockout, run, run_conditions
from avlens.trace.reference import knockout_logits


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
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

    def bare() -> None:
        with torch.no_grad():
            model(**kwargs)

    model.set_attn_implementation({"text_config": "sdpa"})
    t_bare = timed(bare, args.repeats)
    model.set_attn_implementation({"text_config": "avlens"})

    t_capture = timed(lambda: run(adapter, inputs, capture=[Capture.residual()]), args.repeats)
    t_knockout = timed(lambda: run(adapter, inputs, [Knockout("last", "video", layers=[4, 5])]), args.repeats)

    windows = [range(s, s + 2) for s in range(0, n, 2)]
    eight = {f"last->video {w[0]}": [Knockout("last", "video", layers=w)] for w in windows}
    eight |= {f"video->audio {w[0]}": [Knockout("video", "audio", layers=w)] for w in windows}
    t_eight = timed(lambda: run_conditions(adapter, inputs, eight), args.repeats)
    t_eight_papers = timed(
        lambda: [knockout_logits(adapter, inputs, c) for c in eight.values()], max(1, args.repeats // 3)
    )

    sweep = {f"last->{g} {i}": [Knockout("last", g, layers=[i])] for g in ("video", "audio") for i in range(n)}
    t_sweep = timed(lambda: run_conditions(adapter, inputs, sweep), args.repeats)
    t_sweep_papers = timed(
        lambda: [knockout_logits(adapter, inputs, c) for c in sweep.values()], max(1, args.repeats // 3)
    )

    t_nnsight = nnsight_capture(adapter, kwargs, args.repeats)

    print(
        json.dumps(
            {
                "model": f"Qwen2.5-Omni thinker, {n} layers, hidden {adapter.hidden_size}, random weights",
                "prompt_tokens": inputs.length,
                "layout": inputs.layout.counts(0),
                "threads": torch.get_num_threads(),
                "bare_forward_s": round(t_bare, 4),
                "capture_ratio": round(t_capture / t_bare, 3),
                "nnsight_capture_ratio": round(t_nnsight / t_bare, 3) if t_nnsight else None,
                "knockout_ratio": round(t_knockout / t_bare, 3),
                "batched_speedup": round(t_eight_papers / t_eight, 2),
                "sweep_speedup": round(t_sweep_papers / t_sweep, 2),
                "sweep_conditions": len(sweep),
            },
            indent=2,
        )
    )


def nnsight_capture(adapter, kwargs: dict, repeats: int) -> float | None:
    """The bare forward traced by nnsight, saving every decoder layer's output (None if nnsight is missing)."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    adapter.model.set_attn_implementation({"text_config": "sdpa"})
    traced = NNsight(adapter.model)
    layers = traced.model.language_model.layers

    def capture() -> None:
        saved = []  # nnsight runs the block's code in its own frame: append to an outer list
        with torch.no_grad(), traced.trace(**kwargs):
            for layer in layers:
                saved.append(layer.output.save())
        assert len(saved) == adapter.n_layers and saved[0].shape[-1] == adapter.hidden_size

    try:
        return timed(capture, repeats)
    finally:
        adapter.model.set_attn_implementation({"text_config": "avlens"})


if __name__ == "__main__":
    main()
