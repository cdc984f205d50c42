"""Attention share (P1): per layer, how the answer-producing positions split their attention between audio,
video, question and everything else.

The query group is the last prompt position (which produces the first answer token), and with generation the
generated positions too. Computed by the engine inside the attention function on sdpa, for the query rows
only. P1 reports audio 40-50% in layers 0-5 then near 0, video 20-40% in layers 15-30 (Qwen2.5-Omni 7B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from ..models.base import Adapter
from ..trace import Capture, generate, run
from .base import Analysis, Finding, num, pct, verdict
from .common import Item, batches
from .plotting import layer_axis, legend_outside

NAME = "attention_share"
KEYS = ("audio", "video", "question")


@dataclass(frozen=True)
class Config:
    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    generate_tokens: int = 0  # >0: also the generated positions (query group "last+generated")
    batch_size: int = 32


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Table ``shares``: one row per item x layer x key group (audio, video, question, other), head-averaged."""
    query = "last+generated" if config.generate_tokens else "last"
    cap = Capture.attention(query, KEYS, name="share")
    rows, errors = [], []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        if config.generate_tokens:
            trace = generate(adapter, inputs, max_new_tokens=config.generate_tokens, capture=[cap])
        else:
            trace = run(adapter, inputs, capture=[cap])
        for layer, mass in trace.captures["share"].items():
            per_group = mass.mean(1)  # (B, K), averaged over heads
            for b, it in enumerate(chunk):
                values = per_group[b].tolist()
                for key, v in zip((*KEYS, "other"), (*values, 1.0 - sum(values)), strict=True):
                    rows.append(it.record(layer=layer, key=key, share=v))
    return {"shares": rows, "errors": errors}


def profile(shares: pd.DataFrame) -> pd.DataFrame:
    """Mean share per layer (rows) and key group (columns)."""
    return shares.pivot_table(index="layer", columns="key", values="share", aggfunc="mean")


@dataclass(frozen=True)
class Summary:
    """Mean head-averaged share of the query's attention per key group, over the first (early) and the last
    (late) third of the layers; ``n_items``: the items averaged over (0: no data, and every share None)."""

    audio_share_early: float | None
    audio_share_late: float | None
    video_share_early: float | None
    video_share_late: float | None
    question_share_late: float | None
    n_items: int = 0


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    shares = tables["shares"]
    if shares.empty:
        return Summary(None, None, None, None, None, 0)
    p = profile(shares)
    n = len(p)
    early, late = p.iloc[: max(1, n // 3)], p.iloc[-max(1, n // 3) :]

    def mean(frame: pd.DataFrame, key: str) -> float | None:
        return num(frame[key].mean(), 3) if key in frame else None

    return Summary(
        audio_share_early=mean(early, "audio"),
        audio_share_late=mean(late, "audio"),
        video_share_early=mean(early, "video"),
        video_share_late=mean(late, "video"),
        question_share_late=mean(late, "question"),
        n_items=int(shares.id.nunique()),
    )


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    fig = Figure(figsize=(5 * len(tables), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    colors = {"audio": "#1b9e77", "video": "#d95f02", "question": "#7570b3", "other": "#999999"}
    for ax, (model, t) in zip(axes, tables.items(), strict=True):
        p = profile(t["shares"])
        for key in ("audio", "video", "question", "other"):
            ax.plot(p.index, p[key], marker="o", color=colors[key], label=key)
        layer_axis(ax, "layer")
        ax.set_ylabel("share of the last position's attention")
        ax.set_ylim(0, 1)
        ax.set_title(model)
    legend_outside(fig, axes, title="key tokens")
    fig.suptitle("Where the answer position attends, by layer")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    measured = "; ".join(
        f"{m}: audio {pct(s.audio_share_early)} early / {pct(s.audio_share_late)} late, "
        f"video {pct(s.video_share_early)} early / {pct(s.video_share_late)} late"
        for m, s in summaries.items()
    )
    calls = []
    for s in summaries.values():
        figures = (s.audio_share_early, s.audio_share_late, s.video_share_late)
        if any(x is None for x in figures):
            calls.append(None)
            continue
        calls.append(s.audio_share_early > s.audio_share_late and s.video_share_late > s.audio_share_late)
    known = [c for c in calls if c is not None]
    call = verdict([]) if not known else "agrees" if all(known) else "partly" if any(known) else "disagrees"
    return [
        Finding(
            CLAIM,
            "audio 40-50% in layers 0-5 then near 0; video 20-40% in layers 15-30 (Qwen2.5-Omni 7B)",
            measured,
            call,
            "early/late = first/last third of the layers; head-averaged, the last prompt position as query.",
        )
    ]


CLAIM = "Audio gets attention in early layers and little later; video keeps it in deep layers"

SPEC = Analysis(
    name=NAME,
    title="Attention share of the answer position",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="video_share_late",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    default_config=Config(questions={"hear": "What do you hear?"}, conditions=("factual", "swapped")),
    about=__doc__,
)
