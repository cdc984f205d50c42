"""What P2's causal tracing and mitigation cost through avlens, against the papers' way. Prints one JSON object.

Model: a random Qwen2.5-Omni thinker with 8 decoder layers, hidden 512; one sample of about 500 audio-visual
tokens (6 s: 384 video, 150 audio). Figures are ratios of median wall times over rounds, measured in one
process, the variants taking turns round by round:

- trace_speedup: every restored run of one Table-1 row set, 6 token subsets x (the attention input of all
  layers + 8 single-layer residual windows) = 54 runs, the papers' way (one eager forward of the model per
  restored run, clean values written by forward hooks on its own modules) / avlens (one ``run_conditions``);
  both include the clean run that records the states, and avlens leaves out, as ``causal_trace`` does, the
  patches that write what the corrupted run already holds (``unchanged_inputs``): tokens before the first
  position the two runs differ (the first chunk's video, before any audio), and at layer 0 every video token,
  whose input embedding zeroing the audio leaves equal (so the 6 layer-0 residual windows run nothing);
- guided_decoding_cost: seconds per generated token of ``generate_guided`` (two branches, P2's schedule as the
  weight's source is not timed: a fixed weight) / plain ``generate``;
- steer_cost: the same for ``generate`` with a Steer toward a quarter of the video tokens in the upper half of the
  layers / plain ``generate``.

Usage: python benchmarks/causal_trace.py [--repeats N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trace_overhead import timed

from avlens.models import Sample
from avlens.models.tiny import tiny_model
from avlens.trace import (
    Capture,
    Knockout,
    Patch,
    Steer,
    generate,
    generate_guided,
    run,
    run_conditions,
    unchanged_inputs,
)

TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job holds a core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = tiny_model("qwen2.5-omni", layers=8, hidden=512, heads=8, kv_heads=4, encoder_hidden=64, seed=0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, 224, 224, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32)
    opts = {"interleave": True, "video_max_pixels": 224 * 224}
    clean_in = adapter.prepare([Sample("what do you hear?", video=frames, audio=audio)], **opts)
    corrupt_in = adapter.prepare([Sample("what do you hear?", video=frames, audio=np.zeros_like(audio))], **opts)
    n, layout = adapter.n_layers, clean_in.layout
    video = layout.groups["video"][0].nonzero().flatten()
    subsets = {"all": video}
    for k in range(5):  # five more subsets of the video tokens (sinks, random draws... of a real trace)
        subsets[f"subset{k}"] = video[torch.from_numpy(np.random.default_rng(k).permutation(len(video)))[: 40 + k]]
    masks = {}
    for name, pos in subsets.items():
        m = torch.zeros_like(layout.valid)
        m[0, pos] = True
        masks[name] = m

    def avlens_trace() -> None:
        # as causal_trace does: patches writing what the corrupted run already holds are no-ops, left out (tokens
        # before the first position the runs differ; at layer 0, tokens whose input embedding is equal)
        first_layer, since = unchanged_inputs(adapter, clean_in, corrupt_in)
        differing = torch.arange(clean_in.length)[None] >= since[:, None]
        grouped = corrupt_in.layout
        for name, m in masks.items():
            grouped = grouped.with_group(f"b_{name}", m & differing).with_group(f"b0_{name}", m & ~first_layer)
        corrupt_g = replace(corrupt_in, layout=grouped)
        clean = run(
            adapter,
            clean_in,
            capture=[Capture.residual(range(n)), Capture.residual(range(n), site="attn_in", name="attn_in")],
        )
        attn_in, residual = clean.captures["attn_in"], clean.captures["residual"]
        conditions = {}
        for name in masks:
            conditions[f"attn_in {name}"] = [
                Patch(f"b0_{name}", [0], attn_in, site="attn_in"),
                Patch(f"b_{name}", range(1, n), attn_in, site="attn_in"),
            ]
            conditions[f"res0 {name}"] = [Patch(f"b0_{name}", [0], residual)]
            for i in range(1, n):
                conditions[f"res{i} {name}"] = [Patch(f"b_{name}", [i], residual)]
        run_conditions(adapter, corrupt_g, conditions)

    model = adapter.model
    clean_kwargs, corrupt_kwargs = adapter.model_inputs(clean_in), adapter.model_inputs(corrupt_in)

    def papers_trace() -> None:
        before = adapter.text_attention
        adapter.set_text_attention("eager")
        try:
            with torch.no_grad():
                seen, handles = {}, []
                for i, layer in enumerate(adapter.layers):
                    handles.append(
                        layer.input_layernorm.register_forward_hook(
                            lambda _m, _a, out, i=i: seen.__setitem__(("attn_in", i), out.detach().clone())
                        )
                    )
                    handles.append(
                        layer.register_forward_pre_hook(
                            lambda _m, args, kw, i=i: seen.__setitem__(
                                ("residual", i), (args[0] if args else kw["hidden_states"]).detach().clone()
                            ),
                            with_kwargs=True,
                        )
                    )
                model(**clean_kwargs, use_cache=False)
                for h in handles:
                    h.remove()
                for m in masks.values():
                    for site, layers in [("attn_in", range(n)), *[("residual", [i]) for i in range(n)]]:
                        handles = [_writer(adapter, site, i, m, seen[(site, i)]) for i in layers]
                        model(**corrupt_kwargs, use_cache=False)
                        for h in handles:
                            h.remove()
        finally:
            adapter.set_text_attention(before)

    quarter = torch.zeros_like(layout.valid)
    quarter[0, video[: len(video) // 4]] = True
    steer_in = replace(clean_in, layout=clean_in.layout.with_group("steer", quarter))
    steer = [Steer("steer", layers=range(n // 2, n), alpha=0.5)]
    guided = [Knockout("last+generated", "video", layers=range(n))]
    counted: dict[str, int] = {}

    def gen(name: str, fn) -> callable:
        def call() -> None:
            trace = fn()
            counted[name] = int((trace.tokens >= 0).sum())

        return call

    fns = {
        "avlens_trace": avlens_trace,
        "papers_trace": papers_trace,
        "plain": gen("plain", lambda: generate(adapter, steer_in, max_new_tokens=TOKENS)),
        "steer": gen("steer", lambda: generate(adapter, steer_in, steer, max_new_tokens=TOKENS)),
        "guided": gen("guided", lambda: generate_guided(adapter, steer_in, guided, weight=0.5, max_new_tokens=TOKENS)),
    }
    rounds = timed(fns, args.repeats)
    t = {name: statistics.median(ts) for name, ts in rounds.items()}
    per_token = {k: t[k] / counted[k] for k in ("plain", "steer", "guided")}
    print(
        json.dumps(
            {
                "model": f"Qwen2.5-Omni thinker, {n} layers, hidden {adapter.hidden_size}, random weights",
                "prompt_tokens": clean_in.length,
                "layout": {k: v for k, v in clean_in.layout.counts(0).items() if k in ("video", "audio")},
                "restored_runs": len(masks) * (1 + n),
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "trace_speedup": round(t["papers_trace"] / t["avlens_trace"], 2),
                "guided_decoding_cost": round(per_token["guided"] / per_token["plain"], 3),
                "steer_cost": round(per_token["steer"] / per_token["plain"], 3),
                "generated_tokens": counted,
                "median_seconds": {name: round(v, 4) for name, v in t.items()},
            },
            indent=2,
        )
    )


def _writer(adapter, site: str, i: int, mask: torch.Tensor, values: torch.Tensor):
    """A hook on the model's own module writing ``values`` at ``mask`` (B, L) at ``site`` of layer i."""
    layer = adapter.layers[i]
    if site == "attn_in":

        def post(_m, _a, out):
            out = out.clone()
            out[mask] = values[mask].to(out.dtype)
            return out

        return layer.input_layernorm.register_forward_hook(post)

    def pre(_m, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[mask] = values[mask].to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    return layer.register_forward_pre_hook(pre, with_kwargs=True)


if __name__ == "__main__":
    main()
