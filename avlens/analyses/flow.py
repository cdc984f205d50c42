"""Information flow (P3): which attention edges between token groups carry what the answer needs, layer by layer.

P3 knocks out attention from a target group to a source group (target <- source, on the causal mask) in a
sliding window of k layers and measures dp = (p_knockout - p_base) / p_base of the answer on the samples answered
correctly (k = 7 of 28-36 layers; ablated 1..11). It finds information flowing modalities -> question -> last
position, cross-modal and cross-frame mixing in early-to-middle layers, and late attention to video that carries
nothing.

Edges are written ``source->target``, the way information moves: ``video->last`` blocks the last position's
attention to the video tokens (the engine's ``Knockout("last", "video")``). ``@same`` / ``@earlier`` keep only the
token pairs of an interleaved clip's same 2-second chunk / the source's earlier chunks (empty without
interleaving; ``audio->video@same`` is empty by construction, as a chunk's video comes before its audio). Every
record says how many (query, key) token pairs its edge blocks (``pairs``); edges with none in a row are no-ops and
are left out of the summaries.

Every (edge, window) condition of a batch is one entry of a single :func:`~avlens.trace.run_conditions` call. The
answer is read at the last prompt position (the first answer token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import InputError
from ..layout import TokenLayout
from ..models.base import Adapter
from ..trace import Knockout, run_conditions
from .base import Analysis, Finding, num, verdict
from .causal_trace import mean_ci
from .common import Item, LabelTokens, Readout, batches, relative
from .knockout import windows
from .tables import object_frame

NAME = "flow"
BASELINE = "baseline"
SCOPES = ("same", "earlier")
EDGES: tuple[str, ...] = (
    "audio->question",
    "video->question",
    "audio->last",
    "video->last",
    "question->last",
    "system->last",
    "other->last",
    "video->other",
    "audio->other",
    "audio->video",
    "video->audio",
    "video->audio@same",
    "video->audio@earlier",
    "audio->video@earlier",
    "video->video@earlier",
)
"""P3's edges: modalities to the question and the last position, the question to the last position, the prompt's
system text and its other tokens (``other``: the chat template's and the media spans' markers) to the last
position, the modalities to those, and cross-modal (within and across chunks) and cross-frame mixing."""

NAMED = ("system", "question", "audio", "video", "image", "last", "generated")
"""The layout's groups; ``other`` is every valid position in none of them."""


@dataclass(frozen=True)
class Config:
    """What to block and where.

    Attributes:
        questions: question kind -> prompt.
        conditions: clip conditions to keep from the manifest.
        window: k, the layers blocked at once, in windows [s, s + k) for s in 0..n_layers - k; None: a quarter of
            the model's depth (at least 1).
        edges: ``source->target[@same|@earlier]`` (see the module docstring).
        batch_size: items per forward.
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?", "see": "What do you see?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    window: int | None = None
    edges: tuple[str, ...] = EDGES
    batch_size: int = 8

    def __post_init__(self) -> None:
        for edge in self.edges:
            parse_edge(edge)


def window_of(config: Config, n_layers: int) -> int:
    """The knockout window: the config's, or a quarter of the depth (at least 1)."""
    return config.window if config.window is not None else max(1, n_layers // 4)


def parse_edge(edge: str) -> tuple[str, str, str | None]:
    """(source, target, scope) of ``source->target[@same|@earlier]``.

    Raises:
        InputError: another form, or an unknown scope.
    """
    name, _, scope = edge.partition("@")
    source, sep, target = name.partition("->")
    if not sep or not source.strip() or not target.strip() or (scope and scope not in SCOPES):
        raise InputError(f"edge {edge!r}: write source->target, optionally followed by @same or @earlier")
    return source.strip(), target.strip(), scope or None


def with_other(layout: TokenLayout) -> TokenLayout:
    """The layout with the group ``other``: valid positions in none of :data:`NAMED` (template and media markers:
    ``<|im_start|>``, ``assistant``, the vision / audio start and end tokens...)."""
    named = torch.stack([layout.groups[g] for g in NAMED if g in layout.groups]).any(0)
    return layout.with_group("other", layout.valid & ~named)


def chunks_of(layout: TokenLayout) -> list[str]:
    """The interleaved chunk groups of a layout, in time order ([] without interleaving)."""
    names = [g for g in layout.names if g.startswith("chunk") and g[len("chunk") :].isdigit()]
    return sorted(names, key=lambda g: int(g[len("chunk") :]))


def edge_knockouts(edge: str, layout: TokenLayout, layers: Sequence[int]) -> list[Knockout]:
    """The knockouts that block ``edge`` in ``layers``: one for a plain edge, one per chunk for a scoped one."""
    source, target, scope = parse_edge(edge)
    if scope is None:
        return [Knockout(target, source, layers)]
    chunks, out = chunks_of(layout), []
    for j, c in enumerate(chunks):
        if scope == "same":
            keys = f"{source}&{c}"
        elif j == 0:
            continue
        else:
            keys = "+".join(f"{source}&{d}" for d in chunks[:j])
        out.append(Knockout(f"{target}&{c}", keys, layers))
    return out


def blocked_pairs(knockouts: Sequence[Knockout], layout: TokenLayout) -> torch.Tensor:
    """(B,) how many causal (query, key) token pairs the knockouts block in each row, a position's edge to itself
    not counted (the engine never blocks it)."""
    total = torch.zeros(layout.valid.shape[0], dtype=torch.long)
    for ko in knockouts:
        q = layout.mask(ko.query) & layout.valid
        k = (layout.mask(ko.key) & layout.valid).long()
        before = torch.cumsum(k, 1) - k  # key tokens strictly before each position
        total += (before * q).sum(1).cpu()
    return total


def _condition(edge: str, start: int) -> str:
    return f"{edge}|{start}"


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Probabilities of the answers under every (edge, window) knockout, for a unit of items.

    Table ``flow``, one row per item x edge x window (rows whose edge blocks no pair are kept, with pairs 0):

    - id, clip, condition, question, audio_label, visual_label, expected: the item;
    - edge, source, target, scope (same / earlier / None), window_start, window_end (exclusive), pairs;
    - the knockout table's readout columns (p_audio, p_visual, their _base, delta_*, dp_audio, dp_visual,
      dp_expected, answer, answer_base, correct, correct_base, follows, follows_base);
    - dp_answer: dp of the token the model answers without the knockout (defined for every item).

    Table ``errors``: items whose inputs could not be built.
    """
    n = adapter.n_layers
    spans = windows(n, window_of(config, n))
    token = LabelTokens(adapter)
    rows: list[dict] = []
    errors: list[dict] = []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        layout = with_other(inputs.layout)
        inputs = replace(inputs, layout=layout)
        conditions: dict[str, list[Knockout]] = {BASELINE: []}
        pairs: dict[str, torch.Tensor] = {}
        for edge in config.edges:
            for s, e in spans:
                kos = edge_knockouts(edge, layout, range(s, e))
                conditions[_condition(edge, s)] = kos
            pairs[edge] = blocked_pairs(edge_knockouts(edge, layout, [0]), layout)
        traces = run_conditions(adapter, inputs, conditions)
        base_logits = traces[BASELINE].logits.float()
        base = Readout(base_logits, chunk, token)
        answer = base_logits.argmax(-1)
        p_answer_base = torch.softmax(base_logits, -1).gather(1, answer[:, None])[:, 0]
        for edge in config.edges:
            source, target, scope = parse_edge(edge)
            for s, e in spans:
                logits = traces[_condition(edge, s)].logits.float()
                now = Readout(logits, chunk, token)
                p_answer = torch.softmax(logits, -1).gather(1, answer[:, None])[:, 0]
                for b, it in enumerate(chunk):
                    rows.append(
                        it.record(
                            edge=edge,
                            source=source,
                            target=target,
                            scope=scope,
                            window_start=s,
                            window_end=e,
                            pairs=int(pairs[edge][b]),
                            **now.row(b, base),
                            dp_answer=relative(float(p_answer[b]), float(p_answer_base[b])),
                        )
                    )
    return {"flow": rows, "errors": errors}


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
def profile(flow: pd.DataFrame, value: str = "dp_expected", correct_only: bool = True) -> pd.DataFrame:
    """Mean ``value`` per question kind, clip condition, edge and window start, over the rows whose edge blocks
    something (and, with ``correct_only``, whose item was answered correctly without knockout, as P3)."""
    df = flow[flow.pairs > 0]
    if correct_only:
        df = df[df.correct_base == True]  # noqa: E712 (object column with None)
    return df.groupby(["question", "condition", "edge", "window_start"])[value].mean()


def _strongest(rows: pd.DataFrame, value: str) -> dict[str, float | int | None]:
    """The window whose mean ``value`` is lowest (the knockout that lowers the answer most) with its 95% interval
    over items, and n items."""
    by = rows.groupby("window_start")[value].mean()
    if by.dropna().empty:
        return {"dp": None, "low": None, "high": None, "start": None, "n": 0}
    start = int(by.idxmin())
    x = rows[rows.window_start == start][value].dropna().to_numpy()
    mean, low, high = mean_ci(x)
    return {"dp": num(mean, 3), "low": num(low, 3), "high": num(high, 3), "start": start, "n": len(x)}


@dataclass(frozen=True)
class Summary:
    """``edges``: question kind -> clip condition -> edge -> the window where blocking the edge lowers the right
    answer most (P3's dp on items answered correctly): dp (mean), low / high (95% bootstrap interval), start
    (the window's first layer), n (items); ``answer_edges``: the same for dp_answer, the model's own answer, over
    every item (so swapped clips answered with the picture have a figure too). ``question_last_dp``: the headline,
    dp of question->last on factual clips pooled over question kinds (its strongest window), with
    ``question_last_start``. ``n_layers``, ``window``: the sweep; ``n_items``: items."""

    question_last_dp: float | None = None
    question_last_start: int | None = None
    edges: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    answer_edges: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    n_layers: int | None = None
    window: int | None = None
    n_items: int = 0


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    flow = tables.get("flow", pd.DataFrame())
    if flow.empty:
        return Summary()
    acting = flow[flow.pairs > 0]
    correct = acting[acting.correct_base == True]  # noqa: E712
    edges: dict = {}
    answer_edges: dict = {}
    for (kind, cond, edge), g in acting.groupby(["question", "condition", "edge"]):
        answer_edges.setdefault(kind, {}).setdefault(cond, {})[edge] = _strongest(g, "dp_answer")
    for (kind, cond, edge), g in correct.groupby(["question", "condition", "edge"]):
        edges.setdefault(kind, {}).setdefault(cond, {})[edge] = _strongest(g, "dp_expected")
    ql = correct[(correct.edge == "question->last") & (correct.condition == "factual")]
    head = _strongest(ql, "dp_expected") if not ql.empty else {"dp": None, "start": None}
    return Summary(
        question_last_dp=head["dp"],
        question_last_start=head["start"],
        edges=edges,
        answer_edges=answer_edges,
        n_layers=int(flow.window_end.max()),
        window=int((flow.window_end - flow.window_start).iloc[0]),
        n_items=int(flow.id.nunique()),
    )


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """Per model, question kind and clip condition: each edge's strongest window, for the right answer on items
    answered correctly (P3's dp) and for the model's own answer on every item, each with its n."""
    rows: dict = {}
    for model, s in summaries.items():
        for kind, by_cond in s.answer_edges.items():
            for cond, by_edge in by_cond.items():
                for edge, own in by_edge.items():
                    r = _peak(s, kind, edge, cond)
                    rows[(model, kind, cond, edge)] = {
                        "dp": r.get("dp"),
                        "95% CI": None if r.get("low") is None else f"{r['low']:.3f} to {r['high']:.3f}",
                        "window start": r.get("start"),
                        "n (correct items)": r.get("n", 0),
                        "dp of own answer": own.get("dp"),
                        "its window start": own.get("start"),
                        "n (all items)": own.get("n", 0),
                    }
    out = object_frame(rows)
    out.attrs["caption"] = (
        "Information flow: for each edge (source -> target), the window of layers whose knockout lowers the answer "
        "most: dp = (p_knockout - p_base) / p_base of the right answer on items answered correctly (P3's metric), "
        "and of the model's own answer on every item"
    )
    return [out]


NODES = {
    "system": (0.1, 0.9),
    "audio": (0.1, 0.5),
    "video": (0.1, 0.1),
    "question": (0.5, 0.7),
    "other": (0.5, 0.3),
    "last": (0.92, 0.5),
}
"""Where the graph draws each group."""


def _bands(n_layers: int) -> list[tuple[str, int, int]]:
    """Early / middle / late thirds of the layers as (name, first, end) on window starts."""
    cut = [0, max(1, n_layers // 3), max(2, 2 * n_layers // 3), n_layers]
    return [(name, cut[i], cut[i + 1]) for i, name in enumerate(("early", "middle", "late")) if cut[i] < cut[i + 1]]


def plot(tables_by_model: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Top: a layer x edge map of mean dp per model, question kind and clip condition: of the right answer on
    items answered correctly (P3's metric), or, where no item was, of the model's own answer on every item (the
    panel's title says which). Bottom: the flow on factual clips drawn as a graph per layer band (early / middle /
    late window starts), the groups as nodes and each plain edge's width its mean |dp| there."""
    maps, graphs = [], []
    for model, t in tables_by_model.items():
        flow = t.get("flow", pd.DataFrame())
        prof = profile(flow) if not flow.empty else pd.Series(dtype=float)
        own = profile(flow, "dp_answer", correct_only=False) if not flow.empty else pd.Series(dtype=float)
        keys = sorted({k[:2] for k in own.index}) if len(own) else []
        for kind, cond in keys:
            right = prof.loc[(kind, cond)] if (kind, cond) in {k[:2] for k in prof.index} else None
            if right is not None and right.notna().any():
                maps.append((model, f"{kind}, {cond}: right answer, correct items", right))
            else:
                maps.append((model, f"{kind}, {cond}: own answer, all items", own.loc[(kind, cond)]))
        if not keys:
            maps.append((model, None, None))
        graphs.append((model, prof, int(flow.window_end.max()) if not flow.empty else 0))
    cols = max(len(maps), 3)
    fig = Figure(figsize=(4.2 * cols, 3.6 + 2.8 * len(graphs)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 2.8 * len(graphs)])
    axes = top.subplots(1, len(maps), squeeze=False)[0]
    image = None
    for ax, (model, what, p) in zip(axes, maps, strict=True):
        if p is None or p.empty:
            ax.set_title(f"{model}: no flow records")
            ax.set_axis_off()
            continue
        grid = p.unstack("window_start")
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=7)
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_xlabel("window start (layer)")
        ax.set_ylabel("edge (source -> target)")
        ax.set_title(f"{model}: {what}", fontsize=8)
    if image is not None:
        bar = top.colorbar(image, ax=list(axes), label="mean dp (see each panel's title)", shrink=0.8)
        bar.ax.set_xlabel("dp")
    rows = bottom.subplots(len(graphs), 3, squeeze=False)
    for r, (model, prof, n_layers) in enumerate(graphs):
        bands = _bands(n_layers) if n_layers else []
        for c in range(3):
            ax = rows[r, c]
            ax.set_axis_off()
            if c >= len(bands) or not len(prof):
                continue
            name, lo, hi = bands[c]
            _graph(ax, prof, lo, hi)
            ax.set_title(f"{model}: {name} windows (start {lo}-{hi - 1}), factual", fontsize=9)
    fig.suptitle("Information flow: attention knockout of each edge in sliding windows")
    return fig


def _graph(ax: Axes, prof: pd.Series, lo: int, hi: int) -> None:
    """Nodes and arrows for the plain edges; width and label = mean |dp| over the band's windows and kinds."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    factual = prof[prof.index.get_level_values("condition") == "factual"]
    for node, (x, y) in NODES.items():
        ax.annotate(node, (x, y), ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": "#eeeeee"})
    for edge in sorted(set(factual.index.get_level_values("edge"))):
        source, target, scope = parse_edge(edge)
        if scope is not None or source not in NODES or target not in NODES or source == target:
            continue
        e = factual[factual.index.get_level_values("edge") == edge]
        starts = e.index.get_level_values("window_start")
        band = np.abs(e[(starts >= lo) & (starts < hi)].to_numpy(dtype=float))
        value = float(np.nanmean(band)) if np.isfinite(band).any() else float("nan")
        if value != value:
            continue
        (x0, y0), (x1, y1) = NODES[source], NODES[target]
        ax.annotate(
            "",
            (x1, y1),
            (x0, y0),
            arrowprops={"arrowstyle": "->", "lw": 0.5 + 8 * min(value, 1.0), "color": "#1f77b4", "alpha": 0.8},
        )
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.03, f"{value:.2f}", fontsize=7, ha="center")


def _peak(s: Summary, kind: str, edge: str, cond: str = "factual", own: bool = False) -> dict:
    """An edge's strongest window ({} when not measured): dp of the right answer, or of the model's own."""
    return (s.answer_edges if own else s.edges).get(kind, {}).get(cond, {}).get(edge, {})


MEANINGFUL_DP = 0.05
"""The least drop of the right answer's probability (dp <= -0.05: 5% of it) called an effect; fixed beforehand,
not fitted to any model."""


def _lowers(r: dict) -> bool:
    """The edge's knockout lowers the right answer: in its strongest window by at least :data:`MEANINGFUL_DP`,
    with the 95% interval below 0."""
    return r.get("high") is not None and r["high"] < 0 and r["dp"] <= -MEANINGFUL_DP


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """The flow beside P3's findings."""
    parts, calls = [], []
    for m, s in summaries.items():
        for kind in sorted(s.edges):
            ql = _peak(s, kind, "question->last")
            to_q = [_peak(s, kind, f"{mod}->question") for mod in ("audio", "video")]
            to_q = [r for r in to_q if r.get("start") is not None]
            direct = [_peak(s, kind, f"{mod}->last") for mod in ("audio", "video")]
            first = min((r["start"] for r in to_q if _lowers(r)), default=None)
            parts.append(
                f"{m}, {kind}: question->last dp {_fmt(ql)}; "
                + ", ".join(f"{mod}->question {_fmt(r)}" for mod, r in zip(("audio", "video"), to_q, strict=False))
                + "; "
                + ", ".join(f"{mod}->last {_fmt(r)}" for mod, r in zip(("audio", "video"), direct, strict=True))
            )
            if ql.get("start") is None:
                calls.append(None)
            elif _lowers(ql) and first is not None and first <= ql["start"]:
                calls.append("agrees")
            elif _lowers(ql) or first is not None:
                calls.append("partly")
            else:
                calls.append("disagrees")
    order = Finding(
        "Information flows modalities -> question -> last position",
        "P3: blocking modality -> question (early layers) and question -> last (middle layers) lowers the answer",
        "; ".join(parts) or "not measured",
        verdict(calls),
        "Per question kind, factual clips, items answered correctly. Agrees when blocking question->last lowers the "
        "answer (dp <= -0.05, 95% interval below 0) and a modality->question edge does so in a window starting no "
        "later; partly when one of the two holds. dp is shown as mean [interval] @ the window's first layer.",
    )
    parts, calls = [], []
    for m, s in summaries.items():
        for kind in sorted(s.edges):
            mixing = [_peak(s, kind, e) for e in ("audio->video", "video->audio")]
            n = s.n_layers or 0
            parts.append(f"{m}, {kind}: audio->video {_fmt(mixing[0])}, video->audio {_fmt(mixing[1])} (of {n} layers)")
            acting = [r for r in mixing if _lowers(r)]
            if all(r.get("start") is None for r in mixing):
                calls.append(None)
            elif not acting:
                calls.append("disagrees")
            else:
                early = all(r["start"] < 2 * n / 3 for r in acting)
                calls.append("agrees" if early else "partly")
    mixing = Finding(
        "Cross-modal mixing happens in early-to-middle layers",
        "P3: audio <-> video knockouts matter in early-to-middle layers",
        "; ".join(parts) or "not measured",
        verdict(calls),
        "Agrees when every cross-modal edge whose knockout lowers the answer (dp <= -0.05, interval below 0) does "
        "so most in a window starting in the first two thirds of the layers; disagrees when none lowers it.",
    )
    return [order, mixing]


def _fmt(r: dict) -> str:
    if not r or r.get("dp") is None:
        return "n/a"
    return f"{r['dp']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] @{r['start']} (n={r['n']})"


SPEC = Analysis(
    name=NAME,
    title="Information flow: which attention edges carry the answer, layer by layer",
    claim="Information flows modalities -> question -> last position",
    Config=Config,
    Summary=Summary,
    headline="question_last_dp",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(),
    paper="P3",
    about=__doc__,
)
