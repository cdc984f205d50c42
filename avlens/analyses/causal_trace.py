"""Causal tracing under unimodal dominance (P2): which tokens of the modality a model does *not* answer by still
carry what it would answer from the one it does.

Per item (a clip and a question), as P2 and its released code do it, made model-agnostic:

1. Three forwards: ``joint`` (frames and waveform), ``audio_only`` (every frame zeroed), ``video_only`` (the
   waveform zeroed); the answer of each is the argmax at the last prompt position (over ``labels``' first tokens
   when given, else over the whole vocabulary). An item is audio-dominant when joint == audio_only != video_only,
   video-dominant the other way (the rule of :func:`avlens.analyses.dominance.dominance`, on the model's own
   answers, so every model gets its own sets); other items are recorded and not traced.
2. Clean run = joint; corrupted run = the dominant modality zeroed. ``correct`` is the clean answer, ``corrupt``
   the corrupted run's answer.
3. Restored runs: the corrupted run with the clean states patched in at a token subset of the *non-dominant*
   modality (video tokens of an audio-dominant item):

   - ``all``: every token of that modality;
   - ``sinks_n{N}``: the sinks among them, for each N of ``n`` (K = int(length / N) over the whole prompt, as P2);
   - ``random``: as many random tokens of that modality as ``sinks_n{first N}`` holds, ``draws`` draws (mean and
     spread over draws are reported);
   - ``most_attended``: as many of its tokens receiving the most attention from later queries;
   - ``unimodal`` / ``cross_modal``: the ``sinks_n{first N}`` ranked by MDS toward their own modality, first half
     / rest (see :mod:`avlens.analyses.sinks`).

   Sinks are the massive-activation definition of :mod:`avlens.analyses.sinks` (dims given in ``dims``, or found
   on the unit's dominant items), or, with ``definition="received"``, the positions receiving the most attention
   from later queries (the attention-sink score). ``"auto"`` (default) uses massive dims where some are found and
   the received definition otherwise; every record says which (``definition``). P2's segmentation-based
   "object tokens" set is left out: it needs an object segmenter.
4. Two patch sites: ``attn_in`` (the output of each layer's input norm, what attention reads) in all layers at
   once (P2), and ``residual`` (the layer input) in sliding windows of ``window`` layers (ROME).
5. IE_clean = P_restored[correct] - P_corrupt[correct], IE_corrupt = P_corrupt[corrupt] - P_restored[corrupt],
   x 100, P the softmax probability at the last prompt position of the answer's first token; means over items
   with 95% percentile bootstrap intervals.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..layout import TokenLayout
from ..media import VideoClip, load_audio, load_video
from ..models.base import Adapter, Inputs, Sample
from ..trace import Capture, Patch, run, run_conditions, unchanged_inputs
from . import sinks
from .base import Analysis, Finding, num, verdict
from .common import Item, first_token
from .dominance import VARIANTS, dominant_of, zeroed
from .plotting import layer_axis, legend_outside
from .tables import object_frame

NAME = "causal_trace"
N_BOOTSTRAP = 1000
SITES = ("attn_in", "residual")


@dataclass(frozen=True)
class SinkSettings:
    """How sinks are found (shared by causal_trace and mitigate): ``definition`` "auto", "massive" or "received";
    ``dims``: massive dimensions to use (empty: found on the unit); ``threshold`` ... ``min_items``: as
    :class:`avlens.analyses.sinks.Config`; ``n``: the N of K = len / N; ``draws``: random sets per item;
    ``seed``: of the random sets and the bootstrap."""

    definition: Literal["auto", "massive", "received"] = "auto"
    dims: tuple[int, ...] = ()
    threshold: Literal["relative", "absolute"] = "relative"
    tau: float = 25.0
    share: float = sinks.P2_SHARE
    max_share: float = 0.05
    min_items: float = 0.5
    n: tuple[int, ...] = (2, 3, 4)
    draws: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.definition not in ("auto", "massive", "received"):
            raise InputError(f"unknown sink definition '{self.definition}' (definitions: auto, massive, received)")
        if not self.n or min(self.n) < 1 or self.draws < 1:
            raise InputError("n needs at least one N >= 1, and draws must be >= 1")


@dataclass(frozen=True)
class Config(SinkSettings):
    """The sink settings (:class:`SinkSettings`), and: ``labels``: the answers to choose among (empty: any
    token); ``window``: layers per residual window (0: a quarter of the depth, at least 1); ``sites``: "attn_in"
    and/or "residual"."""

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    labels: tuple[str, ...] = ()
    window: int = 0
    sites: tuple[str, ...] = SITES
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [s for s in self.sites if s not in SITES]
        if unknown:
            raise InputError(f"unknown patch site '{unknown[0]}' (sites: {', '.join(SITES)})")
        if self.window < 0:
            raise InputError("window must be >= 0")


def window_of(config: Config, n_layers: int) -> int:
    """Layers per residual window: ``config.window``, or a quarter of the depth (at least 1)."""
    return min(n_layers, config.window or max(1, n_layers // 4))


# ---------------------------------------------------------------------------------------------------------
# Media and answers
# ---------------------------------------------------------------------------------------------------------
def media_of(sample: Sample, adapter: Adapter) -> tuple[VideoClip, np.ndarray]:
    """The sample's frames and waveform, decoded once (so they can be zeroed in memory)."""
    options = getattr(adapter, "options", None)
    fps, max_frames = getattr(options, "fps", 2.0), getattr(options, "max_frames", None)
    video, audio = sample.video, sample.audio
    if video is None or sample.clips is not None or sample.image is not None:
        raise InputError("causal tracing needs one video with sound", sample=sample.id)
    if isinstance(video, np.ndarray):
        video = VideoClip(frames=video, fps=fps, duration=len(video) / fps, source_fps=fps)
    elif not isinstance(video, VideoClip):
        path = video
        video = load_video(path, fps=fps, max_frames=max_frames)
        if audio is None and sample.video_audio:
            audio = path
    if audio is None:
        raise InputError(
            "causal tracing needs the clip's sound (a video with an audio track, or an audio file)", sample=sample.id
        )
    if not isinstance(audio, np.ndarray):
        audio = load_audio(audio, sampling_rate=16000)
    return video, audio


def _candidates(adapter: Adapter, labels: tuple[str, ...]) -> torch.Tensor | None:
    return torch.tensor([first_token(adapter, w) for w in labels]) if labels else None


def _answers(logits: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """(B, V) -> (B,) the answer token of each row: the argmax over the candidates (or the vocabulary)."""
    if candidates is None:
        return logits.argmax(-1)
    return candidates[logits[:, candidates].argmax(-1)]


def _prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, V), (B,) -> (B,) softmax probability of each row's token."""
    return logits.float().softmax(-1).gather(1, tokens[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------------------
# Token sets
# ---------------------------------------------------------------------------------------------------------
def _top(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """bool (L,): the ``k`` allowed positions with the highest score (ties: the earlier position)."""
    out = torch.zeros_like(allowed)
    idx = allowed.nonzero().flatten()
    if k <= 0 or len(idx) == 0:
        return out
    order = torch.argsort(-score[idx].double(), stable=True)[:k]
    out[idx[order]] = True
    return out


def _sink_hits(residual: dict[int, torch.Tensor], valid: torch.Tensor, dims: list[int], tau: float) -> torch.Tensor:
    """(L,) per position of one row: the number of layers at which its largest |normalised value| over ``dims``
    exceeds tau (0 on padding)."""
    hits = torch.zeros(valid.shape[0])
    if not dims:
        return hits
    for h in residual.values():
        a = sinks.rms_normalise(h)[:, dims].abs().amax(-1)  # (L,)
        hits += ((a > tau) & valid).float()
    return hits


def _find_dims(
    clean_residual: dict[int, torch.Tensor], valid: torch.Tensor, ids: list[str], tau: float, config: SinkSettings
) -> list[int]:
    """Massive dimensions on the rows of one batch (:func:`avlens.analyses.sinks.massive_dims`)."""
    hits, peaks = [], []
    for b, item in enumerate(ids):
        for layer, h in clean_residual.items():
            a = sinks.rms_normalise(h[b][valid[b]]).abs()
            peaks.append({"id": item, "layer": layer, "length": int(valid[b].sum())})
            for p, d in (a > tau).nonzero().tolist():
                hits.append({"id": item, "position": p, "layer": layer, "dim": d, "value": float(a[p, d])})
    hits_df = pd.DataFrame(hits, columns=["id", "position", "layer", "dim", "value"])
    found = sinks.massive_dims(hits_df, pd.DataFrame(peaks), config.max_share, config.min_items)
    return [int(d) for d in found.dim]


def sink_captures(layout: TokenLayout, n_layers: int) -> list:
    """What :func:`sink_scores` needs from a clean run: the residual entering every layer and the attention each
    position receives from all later queries and from later video / audio queries."""
    present = [g for g in ("video", "audio") if g in layout.groups]
    return [
        Capture.residual(range(n_layers)),
        Capture.received("all", name="received_all"),
        *(Capture.received(g, name=f"received_{g}") for g in present),
    ]


def sink_scores(
    adapter: Adapter, clean, layout: TokenLayout, ids: list[str], config: SinkSettings
) -> tuple[str, list[int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The sink definition used, the massive dims, and per row (hits (L,), received (L,), MDS (L,)) from a clean
    run with :func:`sink_captures`: hits = layers hit at the massive dims (massive definition) or the received
    attention (received definition); received = mean attention from later queries (over heads and layers); MDS
    averaged over layers where later queries of both modalities exist (NaN elsewhere)."""
    n_layers = adapter.n_layers
    present = [g for g in ("video", "audio") if f"received_{g}" in clean.captures]
    counts = {c.name: c.count(layout) for c in sink_captures(layout, n_layers)[1:]}

    def per_query(name: str, b: int) -> torch.Tensor:  # (layers, L): mean over heads, per later query
        got = torch.stack([clean.captures[name][i][b].mean(0) for i in range(n_layers)])
        return got / counts[name][b].clamp(min=1)

    tau = sinks.tau_of(
        sinks.Config(threshold=config.threshold, tau=config.tau, share=config.share), adapter.hidden_size
    )
    dims = list(config.dims)
    if not dims and config.definition != "received":
        dims = _find_dims(clean.captures["residual"], layout.valid, ids, tau, config)
    definition = "massive" if dims and config.definition != "received" else "received"
    if config.definition == "massive" and not dims:
        definition = "massive (no dims found)"
    out = []
    for b in range(len(ids)):
        valid = layout.valid[b]
        received = per_query("received_all", b).mean(0)
        if len(present) == 2:
            v, a = per_query("received_video", b), per_query("received_audio", b)
            both = (counts["received_video"][b] > 0) & (counts["received_audio"][b] > 0)
            score = torch.where(both, sinks.mds(v, a).mean(0), torch.nan)
        else:
            score = torch.full((layout.length,), torch.nan)
        if definition == "massive":
            hits = _sink_hits({i: h[b] for i, h in clean.captures["residual"].items()}, valid, dims, tau)
        elif definition == "received":
            hits = torch.where(valid, received + 1e-12, 0.0)
        else:
            hits = torch.zeros(layout.length)
        out.append((hits, received, score))
    return definition, dims, out


def token_sets(
    own: torch.Tensor,
    valid: torch.Tensor,
    hits: torch.Tensor,
    received: torch.Tensor,
    mds: torch.Tensor,
    modality: str,
    config: SinkSettings,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """The traced token subsets of one row, as bool (L,) masks.

    Args:
        own: bool (L,), the non-dominant modality's tokens.
        valid: bool (L,), the row's positions (no padding).
        hits: (L,) the sink score (layers hit at massive dims, or received attention for that definition).
        received: (L,) mean attention received from later queries.
        mds: (L,) modality dominance score (NaN where undefined).
        modality: "video" or "audio", the modality of ``own``.
    """
    length = int(valid.sum())
    out = {"all": own.clone()}
    for n in config.n:
        k = length // n
        is_sink = _top(hits, valid & (hits > 0), k)
        out[f"sinks_n{n}"] = is_sink & own
    first = out[f"sinks_n{config.n[0]}"]
    count = int(first.sum())
    out["most_attended"] = _top(received, own, count)
    pool = own.nonzero().flatten().numpy()
    for d in range(config.draws):
        pick = torch.zeros_like(own)
        if count:
            pick[torch.from_numpy(rng.choice(pool, size=count, replace=False))] = True
        out[f"random:{d}"] = pick
    toward = torch.nan_to_num(mds if modality == "video" else -mds, nan=-math.inf)  # own modality first
    uni = _top(toward, first, math.ceil(count / 2))
    out["unimodal"] = uni
    out["cross_modal"] = first & ~uni
    return out


# ---------------------------------------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------------------------------------
def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Tables ``items`` (one row per item: its three answers, dominance, the clean and corrupted probabilities,
    the sink definition and dims used, the size of every token set) and ``effects`` (item x site x layers x set x
    draw: the restored probabilities and IE_clean / IE_corrupt)."""
    errors: list[dict] = []
    built: list[tuple[Item, dict[str, Sample]]] = []
    for it in items:
        if it.problem is not None:
            errors.append({"id": it.id, "condition": it.condition, "file": None, "reason": it.problem})
            continue
        try:
            video, audio = media_of(it.sample, adapter)
        except InputError as e:
            errors.append({"id": it.id, "condition": it.condition, "file": e.path, "reason": e.problem})
            continue
        variants = {
            v: Sample(it.sample.prompt, video=m[0], audio=m[1], system=it.sample.system, id=f"{it.id}:{v}")
            for v, m in zeroed(video, audio).items()
        }
        built.append((it, variants))
    out: dict[str, list[dict]] = {"items": [], "effects": [], "errors": errors}
    for s in range(0, len(built), config.batch_size):
        _trace_batch(adapter, built[s : s + config.batch_size], config, out)
    return out


def _item_record(it: Item, dominant: str | None, answers: dict, config: Config, **values: object) -> dict:
    """A row of ``items``: every column present (None where an item was not traced)."""
    sets = ["all", *(f"sinks_n{n}" for n in config.n), "most_attended", "unimodal", "cross_modal"]
    keys = [
        "p_clean",
        "p_corrupt_correct",
        "p_corrupt_corrupt",
        "definition",
        "dims",
        "length",
        "precedes",
        "unchanged",
    ]
    keys += [f"n_{name}" for name in sets]
    unknown = set(values) - set(keys)
    if unknown:
        raise KeyError(f"not a column of causal_trace.items: {sorted(unknown)}")
    return it.record(dominant=dominant, **answers, **{k: values.get(k) for k in keys})


def _prepare(adapter: Adapter, samples: list[Sample]) -> Inputs:
    return adapter.prepare(samples, interleave=True)


def _trace_batch(adapter: Adapter, chunk: list[tuple[Item, dict[str, Sample]]], config: Config, out: dict) -> None:
    candidates = _candidates(adapter, config.labels)
    try:
        inputs = _prepare(adapter, [s for _, vs in chunk for s in vs.values()])
    except InputError as e:
        out["errors"] += [
            {"id": it.id, "condition": it.condition, "file": e.path, "reason": e.problem} for it, _ in chunk
        ]
        return
    failed = {e.sample.rpartition(":")[0]: e for e in inputs.errors}
    for it, _ in chunk:
        if it.id in failed:
            e = failed[it.id]
            out["errors"].append({"id": it.id, "condition": it.condition, "file": e.path, "reason": e.problem})
    chunk = [(it, vs) for it, vs in chunk if it.id not in failed]
    if not chunk:
        return
    logits = run(adapter, inputs).logits
    row = {s.id: b for b, s in enumerate(inputs.samples)}
    answers = _answers(logits, candidates)
    traced: list[tuple[Item, dict[str, Sample], str, dict]] = []
    for it, vs in chunk:
        tok = {v: int(answers[row[f"{it.id}:{v}"]]) for v in VARIANTS}
        dom = dominant_of(tok)
        rec = {f"answer_{v}": adapter.decode([tok[v]]) for v in VARIANTS}
        info = {"dominant": dom, "tokens": tok, "record": rec}
        if dom is None:
            out["items"].append(_item_record(it, None, rec, config))
        else:
            traced.append((it, vs, dom, info))
    if traced:
        _restore(adapter, traced, config, out)


def _restore(adapter: Adapter, traced: list, config: Config, out: dict) -> None:
    """Clean, corrupted and restored runs of the dominant items of one batch."""
    n_layers = adapter.n_layers
    clean_in = _prepare(adapter, [vs["joint"] for _, vs, _, _ in traced])
    corrupt_in = _prepare(adapter, [vs["video_only" if dom == "audio" else "audio_only"] for _, vs, dom, _ in traced])
    if not torch.equal(clean_in.input_ids, corrupt_in.input_ids):
        raise RuntimeError("zeroing a modality changed the prompt's tokens; causal tracing needs them equal")
    layout = clean_in.layout
    caps = [
        Capture.residual(range(n_layers), site="attn_in", name="attn_in"),
        *sink_captures(layout, n_layers),
    ]
    clean = run(adapter, clean_in, capture=caps)
    definition, dims, scores = sink_scores(adapter, clean, layout, [t[0].id for t in traced], config)

    correct = torch.tensor([info["tokens"]["joint"] for *_, info in traced])
    corrupt = torch.tensor(
        [info["tokens"]["video_only" if dom == "audio" else "audio_only"] for _, _, dom, info in traced]
    )
    sets_by_row, precedes = [], []
    for b, (it, _, dom, _) in enumerate(traced):
        modality = "video" if dom == "audio" else "audio"
        valid = layout.valid[b]
        hits, received, score = scores[b]
        rng = np.random.default_rng([config.seed, zlib.crc32(it.id.encode())])
        own = layout.groups[modality][b] & valid
        dominant_at = (layout.groups[dom][b] & valid).nonzero()
        # every patched token before the first dominant-modality token: its clean and corrupted states are equal
        precedes.append(bool(own.any()) and len(dominant_at) > 0 and int(own.nonzero().max()) < int(dominant_at.min()))
        sets_by_row.append(token_sets(own, valid, hits, received, score, modality, config, rng))
    names = list(sets_by_row[0])
    # Patches that write what the corrupted run already holds are no-ops, left out so the restored runs share
    # its work: tokens before the first position the two runs feed the decoder differently (equal in every layer),
    # and at layer 0 every token whose input embedding is equal (the non-dominant modality's own tokens, since only
    # the dominant one's input was zeroed). The sets, their sizes and the effects are unchanged.
    first_layer, unchanged = unchanged_inputs(adapter, clean_in, corrupt_in)
    differing = torch.arange(layout.length)[None] >= unchanged[:, None]
    grouped = corrupt_in.layout
    for name in names:
        tokens = torch.stack([s[name] for s in sets_by_row])
        grouped = grouped.with_group(f"trace_{name}", tokens & differing)
        grouped = grouped.with_group(f"trace0_{name}", tokens & ~first_layer)
    corrupt_in = replace(corrupt_in, layout=grouped)

    def patch(name: str, layers: range, site: str) -> list[Patch]:
        """The clean states of set ``name`` written at ``site`` of ``layers``, without the no-ops."""
        values = clean.captures[site]
        out = [Patch(f"trace0_{name}", [0], values, site=site)] if 0 in layers else []
        if len(rest := [i for i in layers if i > 0]):
            out.append(Patch(f"trace_{name}", rest, values, site=site))
        return out

    conditions: dict[str, list] = {"corrupt": []}
    if "attn_in" in config.sites:
        for name in names:
            conditions[f"attn_in|all|{name}"] = patch(name, range(n_layers), "attn_in")
    w = window_of(config, n_layers)
    if "residual" in config.sites:
        for start in range(n_layers - w + 1):
            for name in names:
                conditions[f"residual|{start}|{name}"] = patch(name, range(start, start + w), "residual")
    traces = run_conditions(adapter, corrupt_in, conditions)
    p_clean = _prob(clean.logits, correct)
    base = traces.pop("corrupt").logits
    p_corrupt_correct, p_corrupt_corrupt = _prob(base, correct), _prob(base, corrupt)
    for b, (it, _, dom, info) in enumerate(traced):
        sizes = {f"n_{k}": int(v.sum()) for k, v in sets_by_row[b].items() if not k.startswith("random:")}
        out["items"].append(
            _item_record(
                it,
                dom,
                info["record"],
                config,
                p_clean=float(p_clean[b]),
                p_corrupt_correct=float(p_corrupt_correct[b]),
                p_corrupt_corrupt=float(p_corrupt_corrupt[b]),
                definition=definition,
                dims=",".join(map(str, dims)),
                length=int(layout.valid[b].sum()),
                precedes=precedes[b],
                unchanged=int(unchanged[b]),
                **sizes,
            )
        )
    for cname, trace in traces.items():
        site, layers, name = cname.split("|")
        set_name, _, draw = name.partition(":")
        pc, pw = _prob(trace.logits, correct), _prob(trace.logits, corrupt)
        for b, (it, _, dom, _) in enumerate(traced):
            n_tokens = int(sets_by_row[b][name].sum())
            if n_tokens == 0:
                continue  # nothing patched: no effect to measure (the row's count is in ``items``)
            out["effects"].append(
                it.record(
                    dominant=dom,
                    site=site,
                    start=-1 if layers == "all" else int(layers),
                    window=n_layers if layers == "all" else w,
                    set=set_name,
                    draw=int(draw) if draw else None,
                    n_tokens=n_tokens,
                    p_correct=float(pc[b]),
                    p_corrupt=float(pw[b]),
                    ie_clean=100 * float(pc[b] - p_corrupt_correct[b]),
                    ie_corrupt=100 * float(p_corrupt_corrupt[b] - pw[b]),
                    definition=definition,
                )
            )


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
SETS = ("all", "sinks_n2", "sinks_n3", "sinks_n4", "random", "most_attended", "unimodal", "cross_modal")
"""The sets in reading order (with the default N = 2, 3, 4; other N's sets follow them)."""


def _ordered(names: object) -> list[str]:
    names = set(names)
    return [n for n in SETS if n in names] + sorted(names - set(SETS))


def mean_ci(x: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``x`` (n,) and its 95% percentile bootstrap interval (NaNs for an empty ``x``)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    means = x[np.random.default_rng(seed).integers(0, len(x), (N_BOOTSTRAP, len(x)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(x.mean()), float(low), float(high)


def per_item(effects: pd.DataFrame) -> pd.DataFrame:
    """One row per item, site, window start and set: IE means over the random draws (other sets have one)."""
    keys = ["id", "dominant", "site", "start", "set"]
    return effects.groupby(keys, dropna=False)[["ie_clean", "ie_corrupt", "n_tokens"]].mean().reset_index()


@dataclass(frozen=True)
class Summary:
    """``table``: dominant kind ("audio" / "video") -> set -> figures at the attn_in site in all layers (P2's
    Table 1): ie_clean, ie_clean_low, ie_clean_high, ie_corrupt (and its bounds), n (items), tokens (mean count);
    random adds spread (the standard deviation of IE_clean over draws). ``ie_clean_all``: IE_clean of the ``all``
    set over every dominant item; ``sinks_minus_random`` / ``cross_minus_unimodal``: paired differences of
    IE_clean (mean and 95% interval; None when not measured); ``best_window``: dominant kind -> the
    residual window start with the largest IE_clean of ``all``; ``precedes``: dominant kind -> the share of its
    items whose patched tokens all come before the dominant modality's first token (causal attention cannot carry
    the dominant modality into them, so their IE is 0 by construction); ``definition``: the sink definitions
    used."""

    n_items: int
    n_audio_dominant: int
    n_video_dominant: int
    ie_clean_all: float | None
    ie_clean_all_low: float | None
    ie_clean_all_high: float | None
    sinks_minus_random: list[float | None] | None = None
    cross_minus_unimodal: list[float | None] | None = None
    table: dict[str, dict[str, dict[str, float | int | None]]] = field(default_factory=dict)
    best_window: dict[str, int | None] = field(default_factory=dict)
    precedes: dict[str, float] = field(default_factory=dict)
    definition: str | None = None


def _paired(pi: pd.DataFrame, a: str, b: str) -> list[float | None]:
    wide = pi.pivot_table(index="id", columns="set", values="ie_clean")
    if a not in wide or b not in wide:
        return [None, None, None]
    d = (wide[a] - wide[b]).dropna().to_numpy()
    return [num(v, 3) for v in mean_ci(d)] if len(d) else [None, None, None]


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    items = tables.get("items", pd.DataFrame())
    effects = tables.get("effects", pd.DataFrame())
    if items.empty or "dominant" not in items:
        return Summary(0, 0, 0, None, None, None)
    dom_items = items[items.dominant.notna()]
    counts = dom_items.dominant.value_counts()
    base = Summary(
        n_items=len(items),
        n_audio_dominant=int(counts.get("audio", 0)),
        n_video_dominant=int(counts.get("video", 0)),
        ie_clean_all=None,
        ie_clean_all_low=None,
        ie_clean_all_high=None,
        definition=", ".join(sorted(dom_items.definition.dropna().unique())) or None,
    )
    if effects.empty:
        return base
    pi = per_item(effects)
    at = pi[pi.site == "attn_in"]
    table: dict[str, dict[str, dict]] = {}
    for dom, sel in at.groupby("dominant"):
        table[dom] = {}
        for name in _ordered(sel.set.unique()):
            s = sel[sel.set == name]
            if s.empty:
                continue
            c, cl, ch = mean_ci(s.ie_clean.to_numpy())
            w, wl, wh = mean_ci(s.ie_corrupt.to_numpy())
            row = {
                "ie_clean": c,
                "ie_clean_low": cl,
                "ie_clean_high": ch,
                "ie_corrupt": w,
                "ie_corrupt_low": wl,
                "ie_corrupt_high": wh,
                "n": len(s),
                "tokens": float(s.n_tokens.mean()),
            }
            if name == "random":
                draws = effects[(effects.site == "attn_in") & (effects.set == "random") & (effects.dominant == dom)]
                row["spread"] = float(draws.groupby("draw").ie_clean.mean().std(ddof=0))
            table[dom][name] = {k: (num(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
    every = at[at.set == "all"].ie_clean.to_numpy()
    mean, low, high = mean_ci(every)
    best = {}
    res = pi[(pi.site == "residual") & (pi.set == "all")]
    for dom, sel in res.groupby("dominant"):
        by = sel.groupby("start").ie_clean.mean()
        best[dom] = int(by.idxmax()) if len(by) else None
    first_sinks = next((f"sinks_n{n}" for n in (2, 3, 4) if (at.set == f"sinks_n{n}").any()), "sinks_n2")
    precede = dom_items.groupby("dominant").precedes.mean() if "precedes" in dom_items else pd.Series()
    return replace(
        base,
        precedes={k: num(v, 3) for k, v in precede.items()},
        ie_clean_all=num(mean, 3),
        ie_clean_all_low=num(low, 3),
        ie_clean_all_high=num(high, 3),
        sinks_minus_random=_paired(at, first_sinks, "random"),
        cross_minus_unimodal=_paired(at, "cross_modal", "unimodal"),
        table=table,
        best_window=best,
    )


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """P2's Table 1 laid out for each model: per dominant kind and token set, IE_clean and IE_corrupt (x100) with
    their 95% intervals, n items and the mean number of tokens patched (attention input, all layers)."""
    rows = {}
    for model, s in summaries.items():
        for dom, by_set in s.table.items():
            for name, r in by_set.items():
                rows[(model, f"{dom}-dominant", name)] = {
                    "IE_clean": r["ie_clean"],
                    "IE_clean 95% CI": f"{r['ie_clean_low']:.2f} to {r['ie_clean_high']:.2f}",
                    "IE_corrupt": r["ie_corrupt"],
                    "IE_corrupt 95% CI": f"{r['ie_corrupt_low']:.2f} to {r['ie_corrupt_high']:.2f}",
                    "n": r["n"],
                    "tokens": r["tokens"],
                    "spread over draws": r.get("spread"),
                }
    out = object_frame(rows)
    out.attrs["caption"] = (
        "Causal tracing (x100): clean attention inputs of the non-dominant modality's tokens patched into the "
        "run with the dominant modality zeroed, all layers at once. P2, Qwen2.5-Omni 7B, audio-dominant: all "
        "9.61 / 5.28, sinks (N = 2) 6.24 / 2.94, random 4.24 / 2.37."
    )
    return [out]


def plot(tables_by_model: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Per model and dominant kind: IE_clean of each token set when the residual is restored in a window of
    layers starting at the x value."""
    panels = []
    for model, t in tables_by_model.items():
        effects = t.get("effects", pd.DataFrame())
        res = per_item(effects[effects.site == "residual"]) if not effects.empty else pd.DataFrame()
        doms = sorted(res.dominant.dropna().unique()) if not res.empty else []
        panels += [(model, d, res[res.dominant == d]) for d in doms] or [(model, None, None)]
    fig = Figure(figsize=(4.6 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = dict(
        zip(SETS, ("#333333", "#d95f02", "#e6ab02", "#a6761d", "#999999", "#7570b3", "#1b9e77", "#e7298a"), strict=True)
    )
    for ax, (model, dom, sel) in zip(axes, panels, strict=True):
        if sel is None or sel.empty:
            ax.set_title(f"{model}: no dominant items traced")
            ax.set_axis_off()
            continue
        for name in _ordered(sel.set.unique()):
            s = sel[sel.set == name]
            if not s.empty:
                by = s.groupby("start").ie_clean.mean()
                ax.plot(by.index, by.values, marker="o", color=colors.get(name), label=name)
        ax.axhline(0, color="#cccccc", linewidth=0.8)
        ax.set_title(f"{model}: {dom}-dominant (n = {sel.id.nunique()})")
        ax.set_ylabel("IE_clean (x100)")
        layer_axis(ax, "first layer of the restored window")
    legend_outside(fig, axes)
    fig.suptitle("Causal tracing: restoring the non-dominant modality's residual in a window of layers")
    return fig


MEANINGFUL = 1.0
"""The least mean effect (x100: one percentage point of probability) called a restoration; fixed beforehand, not
fitted to any model."""
DIFFERENCE_RULE = (
    "agrees: the 95% interval of the difference above 0; partly: a positive mean whose interval includes 0; "
    "disagrees: a mean <= 0"
)


def _restore_call(s: Summary) -> str | None:
    """agrees: the interval above 0 and the mean at least :data:`MEANINGFUL`; partly: above 0 but smaller;
    disagrees: an interval that includes 0 or lies below it."""
    if s.ie_clean_all is None:
        return None
    if s.ie_clean_all_low > 0:
        return "agrees" if s.ie_clean_all >= MEANINGFUL else "partly"
    return "disagrees"


def difference_call(d: list[float | None]) -> str | None:
    """See :data:`DIFFERENCE_RULE`."""
    if not d or d[0] is None:
        return None
    return "agrees" if d[1] > 0 else "partly" if d[0] > 0 else "disagrees"


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    def fig(s: Summary) -> str:
        if s.ie_clean_all is None:
            return "not measured"
        return f"{s.ie_clean_all:.2f} (95% CI {s.ie_clean_all_low:.2f} to {s.ie_clean_all_high:.2f})"

    def diff(d: list[float | None]) -> str:
        return "not measured" if not d or d[0] is None else f"{d[0]:+.2f} (95% CI {d[1]:+.2f} to {d[2]:+.2f})"

    def before(s: Summary) -> str:
        kinds = [f"{v:.0%} of {k}-dominant" for k, v in s.precedes.items() if v]
        return (
            f"; patched tokens all before the dominant modality (IE 0 by causality) in {', '.join(kinds)}"
            if kinds
            else ""
        )

    counts = "; ".join(
        f"{m}: {s.n_audio_dominant} audio-dominant, {s.n_video_dominant} video-dominant of {s.n_items} "
        f"(sinks: {s.definition or 'none'}{before(s)})"
        for m, s in summaries.items()
    )
    restore = Finding(
        "Restoring the non-dominant modality's clean states brings the dominant answer back",
        "IE_clean / IE_corrupt 9.61 / 5.28 for all non-dominant tokens (audio-dominant, Qwen2.5-Omni 7B)",
        "; ".join(f"{m}: IE_clean of all non-dominant tokens {fig(s)}" for m, s in summaries.items()),
        verdict([_restore_call(s) for s in summaries.values()]),
        f"{counts}. Attention inputs patched in all layers at once; agrees: the 95% interval above 0 and the mean "
        f"at least {MEANINGFUL:g} (partly: above 0 but smaller).",
    )
    sink = Finding(
        "Sink tokens carry more of it than random tokens of the same count",
        "sinks (N = 2) 6.24 against random 4.24 IE_clean",
        "; ".join(f"{m}: sinks - random {diff(s.sinks_minus_random)}" for m, s in summaries.items()),
        verdict([difference_call(s.sinks_minus_random) for s in summaries.values()]),
        f"Paired per item; random is the mean of its draws. {DIFFERENCE_RULE}.",
    )
    cross = Finding(
        "Cross-modal sinks carry more of it than unimodal sinks",
        "cross-modal sinks beat unimodal sinks in IE_clean and IE_corrupt",
        "; ".join(f"{m}: cross-modal - unimodal {diff(s.cross_minus_unimodal)}" for m, s in summaries.items()),
        verdict([difference_call(s.cross_minus_unimodal) for s in summaries.values()]),
        f"Paired per item, within the first N's sinks of the non-dominant modality split at the median of MDS. "
        f"{DIFFERENCE_RULE}.",
    )
    return [restore, sink, cross]


CLAIM = "Under unimodal dominance, the other modality's tokens (and their sinks) still carry the dominant answer"

SPEC = Analysis(
    name=NAME,
    title="Causal tracing under unimodal dominance",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="ie_clean_all",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(),
    paper="P2",
    about=__doc__,
)
