"""Attention knockout (P1, P3): block attention from one token group to another in a sliding window of layers
and see how the answer's probabilities move.

Headline question: on clips whose sound was swapped for an unrelated one, does blocking the answer position's
attention to video in deep layers bring the audio answer back? P1 (Qwen2.5-Omni): blocking generated -> video in
layers 15-30 raises counterfactual audio fidelity by about 50%, close to the factual level; blocking
generated -> audio lowers it; on factual clips either block changes little. P3 slides a window of k layers over
the model, measures dp = (p_knockout - p_base) / p_base of the answer, and finds late-layer attention to video
to be a sink artefact (masking it changes nothing).

Every (edge, window) condition of a batch is one entry of a single :func:`~avlens.trace.run_conditions` call, so
the baseline's work below each window is shared. The answer is read at the last prompt position (the first
answer token), the position P1's released code forgot to block.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pandas as pd
from matplotlib.figure import Figure

from ..models.base import Adapter
from ..trace import Knockout, run_conditions
from .base import Analysis, Finding, num, verdict
from .common import Item, LabelTokens, Readout, batches
from .plotting import layer_axis, legend_outside
from .tables import object_frame

NAME = "knockout"
ANSWER = "answer"
"""The query group of the answer in edges and records. It is passed to the engine as ``last+generated``: the last
prompt position (which produces the first answer token) and, when generating, the generated tokens."""
ANSWER_GROUPS = "last+generated"
BASELINE = "baseline"
NAMES_AUDIO = ("audio", "both")
"""``follows`` values whose answer names the audio label: on a congruent clip it is also the visual label."""

DEFAULT_EDGES: tuple[tuple[str, str], ...] = (
    (ANSWER, "video"),
    (ANSWER, "audio"),
    ("audio", "video"),
    ("video", "audio"),
    ("question", "audio"),
    ("question", "video"),
)


@dataclass(frozen=True)
class Config:
    """What to block and where.

    Attributes:
        questions: question kind -> prompt.
        conditions: clip conditions to keep from the manifest.
        window: k, the number of consecutive layers blocked at once; windows [s, s + k) for every s in
            0..n_layers - k (P3 uses k = 7 on 28-36 layers; the 6-layer organism 2).
        edges: (query, key) group expressions; ``"answer"`` as query is the answer position(s).
        batch_size: items per forward.
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    window: int = 2
    edges: tuple[tuple[str, str], ...] = DEFAULT_EDGES
    batch_size: int = 8


def windows(n_layers: int, k: int) -> list[tuple[int, int]]:
    """Sliding windows [start, end) of k layers (k capped at the model's depth)."""
    if k < 1:
        raise ValueError(f"window must be >= 1, got {k}")
    k = min(k, n_layers)
    return [(s, s + k) for s in range(n_layers - k + 1)]


def edge_name(query: str, key: str) -> str:
    return f"{query}->{key}"


def _condition(query: str, key: str, start: int) -> str:
    return f"{edge_name(query, key)}@{start}"


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Probabilities of the audio and visual labels under every (edge, window) knockout, for a unit of items.

    Table ``knockout``, one row per item x edge x window:

    - id, condition, question, audio_label, visual_label, expected: the item;
    - edge ("query->key"), query_group, key_group, window_start, window_end (exclusive): the knockout;
    - p_audio, p_visual: softmax probability of the label's first token at the last prompt position (NaN without
      a label); p_audio_base, p_visual_base: the same without knockout;
    - delta_audio, delta_visual: p - p_base; dp_audio, dp_visual: (p - p_base) / p_base (P3's dp); dp_expected:
      the same for the expected answer;
    - answer, answer_base: the argmax token; correct, correct_base: it is the expected answer's first token (None
      without one); follows, follows_base: "audio", "visual", "both" or "neither" (see :func:`_follows`).

    Table ``errors``: items whose inputs could not be built.
    """
    spans = windows(adapter.n_layers, config.window)
    conditions: dict[str, list[Knockout]] = {BASELINE: []}
    for query, key in config.edges:
        engine_query = ANSWER_GROUPS if query == ANSWER else query
        for s, e in spans:
            conditions[_condition(query, key, s)] = [Knockout(engine_query, key, range(s, e))]
    token = LabelTokens(adapter)
    rows: list[dict] = []
    errors: list[dict] = []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        traces = run_conditions(adapter, inputs, conditions)
        base = Readout(traces[BASELINE].logits, chunk, token)
        for query, key in config.edges:
            for s, e in spans:
                now = Readout(traces[_condition(query, key, s)].logits, chunk, token)
                for b, it in enumerate(chunk):
                    rows.append(
                        it.record(
                            edge=edge_name(query, key),
                            query_group=query,
                            key_group=key,
                            window_start=s,
                            window_end=e,
                            **now.row(b, base),
                        )
                    )
    return {"knockout": rows, "errors": errors}


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
def profile(knockout: pd.DataFrame) -> pd.DataFrame:
    """Means per clip condition, edge and window start: delta_audio, delta_visual, dp_expected, and the shares
    of answers that follow the audio (name the audio label: follows "audio" or "both") / are correct after the
    knockout."""
    df = knockout.assign(
        follows_audio=knockout.follows.isin(NAMES_AUDIO).astype(float),
        correct=knockout.correct.astype(float),
    )
    cols = ["delta_audio", "delta_visual", "dp_expected", "follows_audio", "correct"]
    return df.groupby(["condition", "edge", "window_start"])[cols].mean()


def _baseline(knockout: pd.DataFrame, condition: str) -> pd.DataFrame:
    """One row per item of a clip condition with its baseline columns."""
    return knockout[knockout.condition == condition].drop_duplicates("id")


@dataclass(frozen=True)
class Summary:
    """One model's knockout figures ("hear" questions only when there are any; None: not measured).

    Per clip condition (``factual_*``, ``swapped_*``):

    - ``follows_audio_base`` / ``accuracy_base``: without knockout (follows audio: the answer names the audio
      label, alone or, on a congruent clip, as the one label of sound and picture);
    - ``follows_audio_after_video_knockout``: the share of answers that follow the audio after blocking
      answer -> video in the best deep window (deep: starting in the second half of the layers; best: the most
      audio answers), ``best_video_window_start`` that window, ``accuracy_after_video_knockout`` the accuracy
      there, ``follows_audio_deepest_video_window`` the same share in the deepest window;
    - ``delta_audio_video_knockout_deep``: mean change of p(audio label) over the deep answer -> video windows;
      ``delta_audio_audio_knockout_min``: the largest drop blocking answer -> audio; ``max_abs_delta_audio``:
      the largest change of any knockout.

    ``late_video_dp_correct``: P3's mean dp of the expected answer, on items answered correctly, when
    answer -> video is blocked in the last window; ``max_abs_video_dp_correct``: the largest over windows.
    ``n_layers``, ``window``: the sweep; ``n_factual``, ``n_swapped``: items of each condition (0: none, and
    their figures None).
    """

    factual_follows_audio_base: float | None = None
    factual_accuracy_base: float | None = None
    factual_follows_audio_after_video_knockout: float | None = None
    factual_best_video_window_start: int | None = None
    factual_accuracy_after_video_knockout: float | None = None
    factual_follows_audio_deepest_video_window: float | None = None
    factual_delta_audio_video_knockout_deep: float | None = None
    factual_delta_audio_audio_knockout_min: float | None = None
    factual_max_abs_delta_audio: float | None = None
    swapped_follows_audio_base: float | None = None
    swapped_accuracy_base: float | None = None
    swapped_follows_audio_after_video_knockout: float | None = None
    swapped_best_video_window_start: int | None = None
    swapped_accuracy_after_video_knockout: float | None = None
    swapped_follows_audio_deepest_video_window: float | None = None
    swapped_delta_audio_video_knockout_deep: float | None = None
    swapped_delta_audio_audio_knockout_min: float | None = None
    swapped_max_abs_delta_audio: float | None = None
    late_video_dp_correct: float | None = None
    max_abs_video_dp_correct: float | None = None
    n_layers: int | None = None
    window: int | None = None
    n_factual: int = 0
    n_swapped: int = 0


_INTS = {f.name for f in fields(Summary) if f.type in ("int | None", "int")}


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    """Headline figures (see :class:`Summary`)."""
    ko = tables["knockout"]
    if "question" in ko and (ko.question == "hear").any():
        ko = ko[ko.question == "hear"]
    nan = float("nan")
    out: dict[str, float] = {}
    if ko.empty:
        return Summary()
    prof = profile(ko)
    starts = sorted(ko.window_start.unique())
    n_layers = int(ko.window_end.max())
    deep = [s for s in starts if s >= n_layers // 2] or starts[-1:]
    video, audio = edge_name(ANSWER, "video"), edge_name(ANSWER, "audio")

    def series(cond: str, edge: str, col: str) -> pd.Series:
        """Means by window start (an empty series when the condition or edge was not run)."""
        try:
            return prof.loc[(cond, edge), col]
        except KeyError:
            return pd.Series(dtype=float)

    for cond in ("factual", "swapped"):
        base = _baseline(ko, cond)
        out[f"n_{cond}"] = len(base)
        if base.empty:
            continue
        out[f"{cond}_follows_audio_base"] = float(base.follows_base.isin(NAMES_AUDIO).mean())
        out[f"{cond}_accuracy_base"] = float(base.correct_base.astype(float).mean())
        follows = series(cond, video, "follows_audio").reindex(deep)
        if follows.notna().any():
            best = int(follows.idxmax())
            out[f"{cond}_follows_audio_after_video_knockout"] = float(follows[best])
            out[f"{cond}_best_video_window_start"] = float(best)
            out[f"{cond}_accuracy_after_video_knockout"] = float(series(cond, video, "correct")[best])
            out[f"{cond}_follows_audio_deepest_video_window"] = float(follows.iloc[-1])
        out[f"{cond}_delta_audio_video_knockout_deep"] = float(series(cond, video, "delta_audio").reindex(deep).mean())
        out[f"{cond}_delta_audio_audio_knockout_min"] = float(series(cond, audio, "delta_audio").min())
        out[f"{cond}_max_abs_delta_audio"] = float(
            prof.loc[cond, "delta_audio"].abs().max() if cond in prof.index.get_level_values(0) else nan
        )
    # P3: dp on correctly answered items only
    correct = ko[(ko.edge == video) & (ko.correct_base == True)]  # noqa: E712 (object column with None)
    if len(correct):
        by_window = correct.groupby("window_start").dp_expected.mean()
        out["late_video_dp_correct"] = float(by_window.iloc[-1])
        out["max_abs_video_dp_correct"] = float(by_window.abs().max())
    out["n_layers"] = float(n_layers)
    out["window"] = float(ko.window_end.iloc[0] - ko.window_start.iloc[0])
    figures = {k: num(v, 3) for k, v in out.items()}
    return Summary(**{k: int(v) if k in _INTS and v is not None else v for k, v in figures.items()})


# ---------------------------------------------------------------------------------------------------------
# Figure and comparison with the papers
# ---------------------------------------------------------------------------------------------------------
def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Mean change of p(audio label) and p(visual label) by window start, one line per edge; a row per model,
    a column per clip condition and quantity."""
    panels = [(c, q) for c in ("factual", "swapped") for q in ("delta_audio", "delta_visual")]
    fig = Figure(figsize=(3.6 * len(panels), 2.9 * len(tables) + 1.0), layout="constrained")
    axes = fig.subplots(len(tables), len(panels), squeeze=False, sharey="row")
    for r, (model, t) in enumerate(tables.items()):
        ko = t["knockout"]
        prof = profile(ko) if not ko.empty else None
        for c, (cond, col) in enumerate(panels):
            ax = axes[r, c]
            ax.axhline(0, color="#999999", lw=0.8)
            if prof is not None and cond in prof.index.get_level_values(0):
                for edge, g in prof.loc[cond].groupby(level=0):
                    g = g.droplevel(0)
                    ax.plot(g.index, g[col], marker="o", ms=3, label=edge)
            what = "p(audio label)" if col == "delta_audio" else "p(visual label)"
            ax.set_title(f"{model}: {cond}, Δ {what}", fontsize=9)
            layer_axis(ax, "window start (layer)")
            ax.set_ylabel("mean change vs baseline")
    legend_outside(fig, axes.flat, title="blocked attention (query -> key)", ncols=6)
    fig.suptitle("Sliding-window attention knockout")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """The knockout figures beside P1's and P3's."""
    nan = float("nan")

    def get(v: float | None) -> float:
        """A figure for arithmetic and formatting: NaN when not measured."""
        return nan if v is None else v

    # P1: blocking vision in deep layers brings the audio answer back on swapped clips
    parts, calls = [], []
    for m, s in summaries.items():
        before, after = get(s.swapped_follows_audio_base), get(s.swapped_follows_audio_after_video_knockout)
        factual = get(s.factual_follows_audio_base)
        parts.append(
            f"{m}: swapped clips answered with the sound {before:.0%} -> {after:.0%} after blocking answer -> video "
            f"(window from layer {get(s.swapped_best_video_window_start):.0f}; factual level {factual:.0%}); "
            f"mean Δp(audio) in deep windows {get(s.swapped_delta_audio_video_knockout_deep):+.3f}"
        )
        gain = after - before
        calls.append(None if gain != gain else "agrees" if gain >= 0.25 else "partly" if gain > 0.05 else "disagrees")
    restore = Finding(
        "Blocking the answer's attention to video in deep layers brings the audio answer back on swapped clips",
        "blocking generated -> video in layers 15-30 raises counterfactual audio fidelity by about 50%, close to "
        "the factual level (Qwen2.5-Omni)",
        "; ".join(parts),
        verdict(calls),
        "The organism answers in one token: the share of answers naming the sound, read at the last prompt position, "
        "stands in for P1's judged audio fidelity. The best of the deep windows is reported (a selection).",
    )
    # P1: blocking audio lowers the audio answer
    parts, calls = [], []
    for m, s in summaries.items():
        f, w = get(s.factual_delta_audio_audio_knockout_min), get(s.swapped_delta_audio_audio_knockout_min)
        parts.append(
            f"{m}: largest drop of p(audio label) blocking answer -> audio: factual {f:+.3f}, swapped {w:+.3f}"
        )
        calls.append(None if f != f else "agrees" if f < -0.05 else "partly" if f < 0 else "disagrees")
    lower = Finding(
        "Blocking the answer's attention to audio lowers the audio answer",
        "blocking generated -> audio lowers audio fidelity",
        "; ".join(parts),
        verdict(calls),
        "Change of the probability of the audio label's first token, best window.",
    )
    # P1: on factual clips either block changes little
    parts, calls = [], []
    for m, s in summaries.items():
        a, b = get(s.factual_accuracy_base), get(s.factual_accuracy_after_video_knockout)
        parts.append(f"{m}: factual accuracy {a:.0%} -> {b:.0%} with answer -> video blocked")
        drop = abs(b - a)
        calls.append(None if drop != drop else "agrees" if drop <= 0.1 else "partly" if drop <= 0.25 else "disagrees")
    factual = Finding(
        "On factual clips, blocking attention to video changes little",
        "on factual clips either block changes little",
        "; ".join(parts),
        verdict(calls),
        "Same window as the swapped-clip figure.",
    )
    # P3: late-layer attention to video is a sink artefact
    parts, calls = [], []
    for m, s in summaries.items():
        late, peak = get(s.late_video_dp_correct), get(s.max_abs_video_dp_correct)
        parts.append(
            f"{m}: dp of the right answer blocking answer -> video in the last window {late:+.1%} (largest {peak:.1%})"
        )
        ratio = abs(late) / peak if peak > 0 else nan
        calls.append(
            None if ratio != ratio else "agrees" if ratio <= 0.2 else "partly" if ratio <= 0.5 else "disagrees"
        )
    sink = Finding(
        "Late-layer attention to video carries little (a sink artefact)",
        "P3: masking late-layer attention to video changes nothing; dp measured on correctly answered samples",
        "; ".join(parts),
        verdict(calls),
        "Agrees when the last window's |dp| is at most a fifth of the largest window's.",
    )
    return [restore, lower, factual, sink]


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """The report's table: each figure for factual and swapped clips (columns), per model, with n."""
    names = {
        "follows_audio_base": "answers name the sound, no knockout",
        "follows_audio_after_video_knockout": "answers name the sound, answer -> video blocked (best deep window)",
        "best_video_window_start": "that window's first layer",
        "follows_audio_deepest_video_window": "answers name the sound, answer -> video blocked (deepest window)",
        "accuracy_base": "accuracy, no knockout",
        "accuracy_after_video_knockout": "accuracy, answer -> video blocked (best deep window)",
        "delta_audio_video_knockout_deep": "mean Δp(audio label), answer -> video blocked (deep windows)",
        "delta_audio_audio_knockout_min": "largest drop of p(audio label), answer -> audio blocked",
        "max_abs_delta_audio": "largest |Δp(audio label)| of any knockout",
    }
    rows: dict[str, dict] = {}
    for model, s in summaries.items():
        for cond in ("factual", "swapped"):
            for key, name in names.items():
                rows.setdefault(name, {})[(model, cond)] = getattr(s, f"{cond}_{key}")
            rows.setdefault("n (items)", {})[(model, cond)] = getattr(s, f"n_{cond}")
    out = object_frame(rows)
    out.index.name = "figure (shares of items; Δ: change of probability)"
    out.attrs["caption"] = "Attention knockout by clip condition"
    return [out]


SPEC = Analysis(
    name=NAME,
    title="Attention knockout: does blocking vision bring the audio answer back?",
    claim="Blocking the answer's attention to video in deep layers brings the audio answer back on swapped clips",
    Config=Config,
    Summary=Summary,
    headline="swapped_follows_audio_after_video_knockout",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(questions={"hear": "What do you hear?"}, conditions=("factual", "swapped"), window=2),
    paper="P1",
    about=__doc__,
)
