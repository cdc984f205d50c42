"""What discarding the audio-visual tokens after half the layers saves (P3's speed-up). Prints one JSON object.

Model: a random Qwen2.5-Omni thinker with 8 decoder layers, hidden 512. ``Discard("video+audio", 4)`` removes the
clip's tokens from the sequence and from the KV cache from layer 4 on, so layers 4-7 run on the text alone and
decoding reads a short cache there. Figures are ratios of median wall times over rounds, measured in one process,
the variants taking turns round by round:

- prefill_speedup: one prompt of about 1,000 audio-visual tokens (12 s: 24 frames at 224 x 224, 12 s of audio),
  ``avlens.run`` without discarding / with it (both include the encoders, which discarding cannot save);
  prefill_speedup_vs_transformers: transformers' own forward of the model (sdpa) / avlens with discarding;
- decode_speedup: seconds per decoding step with a prompt of about 4,000 audio-visual tokens (24 s at
  336 x 336), ``avlens.generate`` (N tokens forced with ``min_new_tokens``) without discarding / with it, from the
  engine's own timing of the steps after the prefill (``Trace.seconds``);
  decode_speedup_vs_transformers: transformers' ``generate`` (greedy, N tokens forced; its prefill subtracted by
  timing a 1-token generation too: per token = (t(N) - t(1)) / (N - 1)) / avlens with discarding.

Goals (issue 13): prefill_speedup >= 1.5 (the ideal for half the layers is just under 2), decode_speedup >= 1.3.

Usage: python benchmarks/discard_speed.py [--repeats N] [--threads T] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trace_overhead import timed

from avlens.models import Sample
from avlens.models.tiny import tiny_model
from avlens.trace import Discard, generate, run


def _inputs(adapter, seconds: int, side: int):
    rng = np.random.default_rng(seconds)
    frames = rng.integers(0, 255, (2 * seconds, side, side, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32)
    sample = Sample("what do you hear?", video=frames, audio=audio)
    return adapter.prepare([sample], interleave=True, video_max_pixels=side * side)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job holds a core)")
    parser.add_argument("--tokens", type=int, default=65, help="tokens generated per decoding run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = tiny_model("qwen2.5-omni", layers=8, hidden=512, heads=8, kv_heads=4, encoder_hidden=64, seed=0)
    n = adapter.n_layers
    drop = [Discard("video+audio", n // 2)]
    short, long = _inputs(adapter, 12, 224), _inputs(adapter, 24, 336)
    model = adapter.model
    short_kwargs, long_kwargs = adapter.model_inputs(short), adapter.model_inputs(long)
    counted: dict[str, int] = {}

    def gen(name: str, inputs, ivs, tokens: int):
        def call() -> float:  # its own time: seconds per decoding step, as the engine timed them
            trace = generate(adapter, inputs, ivs, max_new_tokens=tokens, min_new_tokens=tokens)
            counted[name] = int((trace.tokens >= 0).sum())
            return trace.seconds["decode"] / trace.seconds["steps"]

        return call

    def hf_gen(tokens: int):
        def call() -> None:
            with torch.no_grad():
                model.generate(**long_kwargs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        return call

    def hf_forward() -> None:
        with torch.no_grad():
            model(**short_kwargs, use_cache=False)

    k = args.tokens
    fns = {
        "prefill_full": lambda: run(adapter, short),
        "prefill_discard": lambda: run(adapter, short, drop),
        "prefill_transformers": hf_forward,
        "decode_full": gen("decode_full", long, [], k),
        "decode_discard": gen("decode_discard", long, drop, k),
        "decode_transformers_1": hf_gen(1),
        "decode_transformers": hf_gen(k),
    }
    rounds = timed(fns, args.repeats)
    t = {name: statistics.median(ts) for name, ts in rounds.items()}

    full, discard = t["decode_full"], t["decode_discard"]
    hf = (t["decode_transformers"] - t["decode_transformers_1"]) / (k - 1)
    av = {
        name: {g: c for g, c in x.layout.counts(0).items() if g in ("video", "audio")}
        for name, x in (("prefill", short), ("decode", long))
    }
    print(
        json.dumps(
            {
                "model": f"Qwen2.5-Omni thinker, {n} layers, hidden {adapter.hidden_size}, random weights",
                "discard": f"video+audio from layer {n // 2}",
                "prompt_tokens": {"prefill": short.length, "decode": long.length},
                "av_tokens": av,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "prefill_speedup": round(t["prefill_full"] / t["prefill_discard"], 3),
                "prefill_speedup_vs_transformers": round(t["prefill_transformers"] / t["prefill_discard"], 3),
                "decode_speedup": round(full / discard, 3),
                "decode_speedup_vs_transformers": round(hf / discard, 3),
                "seconds_per_token": {
                    "full": round(full, 4),
                    "discard": round(discard, 4),
                    "transformers": round(hf, 4),
                },
                "generated_tokens": counted,
                "median_seconds": {name: round(v, 4) for name, v in t.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
