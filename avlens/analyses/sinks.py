"""Sink tokens (P2): the few positions where the model's massive-activation dimensions fire, by modality, and
which sinks of one modality are mostly attended by the other (cross-modal sinks).

What is computed (P2 and its released code, made model-agnostic; nothing is hard-coded to one checkpoint):

1. The residual entering every decoder layer at prefill (the embedding output, then each layer's input),
   RMS-normalised in float32 with no weight: x / sqrt(mean(x^2) + 1e-6).
2. The threshold tau. ``threshold="absolute"``: tau = ``tau`` (25 as P2; 20 as the VAR paper). After RMS
   normalisation no value can exceed sqrt(hidden) (59.9 for a 7B's 3584, 16 for hidden 256), so
   ``threshold="relative"`` (the default) states tau as a share of that ceiling: tau = ``share`` x sqrt(hidden),
   the share 25 / sqrt(3584) = 0.418 by default, which is P2's 25 on Qwen2.5-Omni 7B (the value then holds at
   least 17% of the token's squared norm). The summary says which was used and its value.
3. Massive-activation dimensions, found on the items (P2 hard-codes two for its 7B): a dimension is one when
   its normalised |value| exceeds tau on at most ``max_share`` of all (token, layer) pairs (rare outliers, not
   a dimension that is large everywhere) and does so in at least ``min_items`` of the items (a fixed dimension
   of the model, not a chance outlier). Reported with their share and magnitude.
4. A token is a sink at a layer when its largest |value| over those dimensions exceeds tau; hits are counted
   over the layers, and per N in ``n`` the K = int(length / N) tokens with the most hits are kept (those with at
   least one). Each sink has its group: video, audio, text (anything else), and its interleaved chunk.
5. Attention a position receives (engine ``Capture.received`` on sdpa, never a full matrix): the mean over heads
   of the attention from strictly later queries, per layer; from all later queries ("received", the
   attention-sink score of StreamingLLM, averaged over layers), and from later video / audio queries (v, a).
   MDS = (v - a) / (v + a + 1e-9) per layer, averaged over the layers where later queries of both modalities
   exist. Within one item's sinks of a modality (N = 2), ranked by MDS toward their own modality (video sinks by
   MDS descending, audio sinks ascending): the first half are unimodal sinks, the rest cross-modal.
6. How the two sink definitions agree: per item, the share of the top-K tokens by hits that are also among the
   top-K by received attention (K as for N = 2).

A model with no massive activations gets "no sink dimensions found" with the largest normalised values it
showed (per layer, in ``peaks``), not an empty figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import pandas as pd
import torch
from matplotlib.figure import Figure

from ..models.base import Adapter
from ..trace import Capture, run
from .base import Analysis, Finding, num, pct
from .common import Item, batches
from .plotting import layer_axis, legend_outside

NAME = "sinks"
P2_SHARE = 25 / math.sqrt(3584)
"""P2's tau (25) as a share of sqrt(hidden) on Qwen2.5-Omni 7B (hidden 3584)."""
GROUPS = ("video", "audio", "text")


@dataclass(frozen=True)
class Config:
    """``threshold``: "relative" (tau = share x sqrt(hidden)) or "absolute" (tau = ``tau``); ``max_share``: the
    largest share of (token, layer) pairs a massive dimension may exceed tau on; ``min_items``: the least share of
    items it must exceed tau in; ``n``: the N of K = len / N."""

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual",)
    threshold: Literal["relative", "absolute"] = "relative"
    tau: float = 25.0
    share: float = P2_SHARE
    max_share: float = 0.05
    min_items: float = 0.5
    n: tuple[int, ...] = (2, 3, 4)
    batch_size: int = 8


def tau_of(config: Config, hidden: int) -> float:
    """The threshold on RMS-normalised |values| for a model of width ``hidden``."""
    return config.tau if config.threshold == "absolute" else config.share * math.sqrt(hidden)


def rms_normalise(h: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): x / sqrt(mean(x^2) + 1e-6) in float32, no weight."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def token_groups(layout, row: int) -> tuple[list[str], list[int | None]]:
    """Each position's group (video, audio, text) and interleaved chunk (None outside chunks) in one row."""
    length = layout.length
    group = ["text"] * length
    for g in ("video", "audio"):
        if g in layout.groups:
            for p in layout.groups[g][row].nonzero().flatten().tolist():
                group[p] = g
    chunk: list[int | None] = [None] * length
    for name in layout.groups:
        if name.startswith("chunk") and name[5:].isdigit():
            for p in layout.groups[name][row].nonzero().flatten().tolist():
                chunk[p] = int(name[5:])
    return group, chunk


def mds(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Modality dominance score (v - a) / (v + a + 1e-9) (elementwise)."""
    return (v - a) / (v + a + 1e-9)


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Tables ``positions`` (item x position: group, chunk, received attention, v, a, MDS), ``hits`` (item x
    position x layer x dimension where the normalised |value| exceeds tau) and ``peaks`` (item x layer: the
    largest normalised |value|, where it sits, the median |value|)."""
    n_layers, hidden = adapter.n_layers, adapter.hidden_size
    tau = tau_of(config, hidden)
    positions, hits, peaks, errors = [], [], [], []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        layout = inputs.layout
        caps = [Capture.residual(range(n_layers)), Capture.received("all", name="received_all")]
        present = [g for g in ("video", "audio") if g in layout.groups and bool(layout.groups[g].any())]
        caps += [Capture.received(g, name=f"received_{g}") for g in present]
        trace = run(adapter, inputs, capture=caps)
        counts = {c.name: c.count(layout) for c in caps[1:]}
        for b, it in enumerate(chunk):
            valid = layout.valid[b]
            where = valid.nonzero().flatten()  # the row's positions; recorded from its first (no padding)
            first, length = int(where[0]), len(where)
            group, chunk_of = token_groups(layout, b)
            per = {}
            for name in counts:  # mean over heads, then per later query: (layers, L)
                got = torch.stack([trace.captures[name][i][b].mean(0) for i in range(n_layers)])
                per[name] = got / counts[name][b].clamp(min=1)
            has = {g: counts[f"received_{g}"][b] > 0 for g in present}
            if len(present) == 2:
                both = has["video"] & has["audio"]
                score = mds(per["received_video"], per["received_audio"])  # (layers, L)
                mds_mean = torch.where(both, score.mean(0), torch.nan)
            else:
                mds_mean = torch.full((layout.length,), torch.nan)
            received = per["received_all"].mean(0)
            for p in where.tolist():
                positions.append(
                    it.record(
                        position=p - first,
                        group=group[p],
                        chunk=chunk_of[p],
                        length=length,
                        received=float(received[p]),
                        received_video=float(per["received_video"][:, p].mean()) if "video" in present else None,
                        received_audio=float(per["received_audio"][:, p].mean()) if "audio" in present else None,
                        mds=float(mds_mean[p]),
                    )
                )
            for layer in range(n_layers):
                a = rms_normalise(trace.captures["residual"][layer][b][valid]).abs()  # (n, D)
                top = int(a.argmax())
                p, d = divmod(top, a.shape[1])
                peaks.append(
                    it.record(
                        layer=layer,
                        largest=float(a.max()),
                        dim=d,
                        position=int(where[p]) - first,
                        group=group[int(where[p])],
                        median=float(a.median()),
                        length=length,
                        tau=tau,
                        ceiling=math.sqrt(hidden),
                    )
                )
                for p, d in (a > tau).nonzero().tolist():
                    pos = int(where[p])
                    hits.append(
                        it.record(position=pos - first, layer=layer, dim=d, value=float(a[p, d]), group=group[pos])
                    )
    return {"positions": positions, "hits": hits, "peaks": peaks, "errors": errors}


COLUMNS = {
    "positions": ["id", "position", "group", "chunk", "length", "received", "received_video", "received_audio", "mds"],
    "hits": ["id", "position", "layer", "dim", "value", "group"],
    "peaks": ["id", "layer", "largest", "dim", "position", "group", "median", "length", "tau", "ceiling"],
}


def _table(tables: dict[str, pd.DataFrame], name: str) -> pd.DataFrame:
    """A collected table; an empty one with its columns when no record was written (e.g. no hits at all)."""
    df = tables.get(name)
    return df if df is not None and len(df.columns) else pd.DataFrame(columns=COLUMNS[name])


def massive_dims(hits: pd.DataFrame, peaks: pd.DataFrame, max_share: float, min_items: float) -> pd.DataFrame:
    """The massive-activation dimensions: those exceeding tau on at most ``max_share`` of the (token, layer)
    pairs of the items, in at least ``min_items`` of the items. One row per dimension: dim, pairs (how many
    exceed), share, largest, items (how many items it fires in), layers (the layers it fires at)."""
    columns = ["dim", "pairs", "share", "largest", "items", "layers"]
    if hits.empty:
        return pd.DataFrame(columns=columns)
    total = int(peaks.length.sum())  # (token, layer) pairs: peaks has one row per item and layer
    n_items = peaks.id.nunique()
    out = []
    for d, sel in hits.groupby("dim"):
        pairs = len(sel)
        if pairs / total <= max_share and sel.id.nunique() >= min_items * n_items:
            layers = ",".join(str(v) for v in sorted(sel.layer.unique()))
            out.append([int(d), pairs, pairs / total, float(sel.value.max()), sel.id.nunique(), layers])
    return pd.DataFrame(out, columns=columns).sort_values("pairs", ascending=False).reset_index(drop=True)


def finalize(tables: dict[str, pd.DataFrame], config: Config) -> dict[str, pd.DataFrame]:
    """Adds ``dims`` (the massive dimensions) and ``sinks`` (item x position with at least one hit at them:
    hits, rank, top-K membership per N, received attention, MDS, and for N = 2 its kind within its modality:
    unimodal or cross-modal)."""
    positions, hits, peaks = (_table(tables, name) for name in ("positions", "hits", "peaks"))
    tables = {**tables, "positions": positions, "hits": hits, "peaks": peaks}
    dims = massive_dims(hits, peaks, config.max_share, config.min_items)
    tables["dims"] = dims
    if dims.empty:
        tables["sinks"] = pd.DataFrame(columns=[*positions.columns, "hits", "rank", "kind"])
        return tables
    at = hits[hits.dim.isin(dims.dim)]
    counts = at.groupby(["id", "position"]).layer.nunique().rename("hits").reset_index()
    sinks = positions.merge(counts, on=["id", "position"], how="inner")
    sinks["rank"] = sinks.groupby("id").hits.rank(ascending=False, method="first").astype(int)
    for n in config.n:
        sinks[f"top_n{n}"] = sinks["rank"] <= (sinks.length // n)
    sinks["kind"] = None
    first = f"top_n{config.n[0]}"
    for (_, g), sel in sinks[sinks[first]].groupby(["id", "group"]):
        if g not in ("video", "audio") or sel.mds.isna().all():
            continue
        order = sel.sort_values("mds", ascending=(g == "audio"))  # toward its own modality first
        half = math.ceil(len(order) / 2)
        sinks.loc[order.index[:half], "kind"] = "unimodal"
        sinks.loc[order.index[half:], "kind"] = "cross-modal"
    tables["sinks"] = sinks.sort_values(["id", "rank"]).reset_index(drop=True)
    return tables


@dataclass(frozen=True)
class Summary:
    """``dims``: the massive dimensions found (empty: none); ``threshold``: which tau was used and its value;
    ``largest``: the largest normalised |value| seen (and ``ceiling`` = sqrt(hidden), the most possible);
    ``sinks_per_item``: mean number of top-K sinks (N = first of Config.n) per item; ``share_*``: their split by
    group; ``mds_video_sinks`` / ``mds_audio_sinks``: mean MDS of video / audio sinks; ``overlap``: mean share of
    the top-K by hits that are also top-K by received attention; ``received_ratio``: mean received attention of
    sinks over that of all positions; ``by_received``: the groups of the top-K positions by received attention
    alone (the attention-sink definition, which needs no massive dimension), as shares."""

    dims_found: int | None
    dims: list[int] | None
    threshold: str | None
    largest: float | None
    ceiling: float | None
    sinks_per_item: float | None
    share_video: float | None
    share_audio: float | None
    share_text: float | None
    mds_video_sinks: float | None
    mds_audio_sinks: float | None
    overlap: float | None
    received_ratio: float | None
    by_received: dict[str, float] = field(default_factory=dict)
    n_items: int = 0


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    peaks, positions = _table(tables, "peaks"), _table(tables, "positions")
    dims, sinks = tables["dims"], tables["sinks"]
    if peaks.empty:
        return Summary(None, None, None, *[None] * 10)  # not measured
    tau = float(peaks.tau.iloc[0])
    ceiling = float(peaks.ceiling.iloc[0])
    first = next((c for c in sinks.columns if c.startswith("top_n")), "top_n2")  # the K of the first N
    base = Summary(
        dims_found=len(dims),
        dims=[int(d) for d in dims.dim],
        threshold=f"tau = {tau:.3g} on RMS-normalised values (ceiling sqrt(hidden) = {ceiling:.3g})",
        largest=num(peaks.largest.max(), 3),
        ceiling=num(ceiling, 3),
        sinks_per_item=None, share_video=None, share_audio=None, share_text=None, mds_video_sinks=None,
        mds_audio_sinks=None, overlap=None, received_ratio=None,
        by_received=_received_groups(positions, int(first[5:])),
        n_items=int(peaks.id.nunique()),
    )  # fmt: skip
    if dims.empty or sinks.empty:
        return base
    top = sinks[sinks[first]]
    shares = top.group.value_counts(normalize=True)
    overlap = []
    for item, sel in top.groupby("id"):
        k = len(sel)
        most_received = set(positions[positions.id == item].nlargest(k, "received").position)
        overlap.append(len(set(sel.position) & most_received) / k)
    mean_received = positions.groupby("id").received.mean()
    ratio = (top.groupby("id").received.mean() / mean_received.reindex(top.id.unique())).mean()
    return replace(
        base,
        sinks_per_item=num(top.groupby("id").size().reindex(peaks.id.unique(), fill_value=0).mean(), 2),
        share_video=num(shares.get("video", 0.0), 3),
        share_audio=num(shares.get("audio", 0.0), 3),
        share_text=num(shares.get("text", 0.0), 3),
        mds_video_sinks=num(top[top.group == "video"].mds.mean(), 3),
        mds_audio_sinks=num(top[top.group == "audio"].mds.mean(), 3),
        overlap=num(sum(overlap) / len(overlap), 3) if overlap else None,
        received_ratio=num(ratio, 2),
    )


def _received_groups(positions: pd.DataFrame, n: int) -> dict[str, float]:
    """Shares of video, audio and text among each item's K = int(length / n) positions receiving the most
    attention from later queries."""
    if positions.empty:
        return {}
    top = [sel.nlargest(int(sel.length.iloc[0]) // n, "received") for _, sel in positions.groupby("id")]
    shares = pd.concat(top).group.value_counts(normalize=True)
    return {g: round(float(shares.get(g, 0.0)), 3) for g in GROUPS}


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Per model: sinks per group and layer (hits at the massive dimensions), or, with none found, the largest
    normalised |value| per layer against tau and its ceiling."""
    fig = Figure(figsize=(5 * len(tables), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    colors = {"video": "#d95f02", "audio": "#1b9e77", "text": "#7570b3"}
    for ax, (model, t) in zip(axes, tables.items(), strict=True):
        dims, hits, peaks = t["dims"], _table(t, "hits"), _table(t, "peaks")
        if not dims.empty:
            at = hits[hits.dim.isin(dims.dim)]
            per = at.groupby(["layer", "group"]).position.count().unstack(fill_value=0) / peaks.id.nunique()
            for g in GROUPS:
                if g in per:
                    ax.plot(per.index, per[g], marker="o", color=colors[g], label=g)
            ax.set_ylabel("sink tokens per item")
            ax.set_title(f"{model}: dims {', '.join(map(str, dims.dim.tolist()[:4]))}")
        else:
            largest = peaks.groupby("layer").largest.max()
            ax.plot(largest.index, largest.values, marker="o", color="#444444", label="largest |value|")
            ax.axhline(float(peaks.tau.iloc[0]), color="#e7298a", linestyle="--", label="tau")
            ax.axhline(float(peaks.ceiling.iloc[0]), color="#999999", linestyle=":", label="sqrt(hidden)")
            ax.set_ylabel("RMS-normalised |value|")
            ax.set_title(f"{model}: no sink dimensions found")
        layer_axis(ax, "layer (residual entering it)")
    legend_outside(fig, axes)
    fig.suptitle("Sink tokens: where the massive-activation dimensions fire")
    return fig


CLAIM = "A few sink tokens carry massive activations at a few fixed dimensions"


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    measured = "; ".join(
        f"{m}: {s.dims_found} dims ({', '.join(map(str, (s.dims or [])[:4])) or 'none'}), largest {num(s.largest, 1)} "
        f"of {num(s.ceiling, 1)}, {s.sinks_per_item if s.sinks_per_item is not None else 0} sinks/item"
        for m, s in summaries.items()
    )
    calls = [None if s.n_items == 0 else s.dims_found > 0 for s in summaries.values()]
    known = [c for c in calls if c is not None]
    call = "not measured" if not known else "agrees" if all(known) else "partly" if any(known) else "disagrees"
    shares = "; ".join(
        f"{m}: video {pct(s.share_video)}, audio {pct(s.share_audio)}, overlap with received attention {pct(s.overlap)}"
        for m, s in summaries.items()
        if s.dims_found
    )
    return [
        Finding(
            CLAIM,
            "two massive dimensions in Qwen2.5-Omni 7B; sinks among audio and video tokens (tau = 25)",
            measured,
            call,
            (shares + ". " if shares else "") + "Dimensions found on the items, never hard-coded.",
        )
    ]


SPEC = Analysis(
    name=NAME,
    title="Sink tokens",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="dims_found",
    collect=collect,
    finalize=finalize,
    summarize=summarize,
    findings=findings,
    plot=plot,
    default_config=Config(),
    paper="P2",
    about=__doc__,
)
