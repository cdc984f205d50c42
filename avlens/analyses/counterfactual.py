"""Counterfactual evaluation (P1): does the model hear the sound, or say what it sees?

For every condition (factual, swapped audio, muted, blank video, audio only, video only) and question: the
answer, whether it is right, and on swapped clips which modality it follows. Headline: the follows-vision
rate, the share of swapped clips whose hearing answer is the visual label.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..models.base import Adapter
from ..trace import generate
from .base import Analysis, Finding, Needs, num, pct
from .common import Item, Scorer, batches, follows, label_match, words
from .plotting import legend_outside
from .tables import object_frame

NAME = "counterfactual"


@dataclass(frozen=True)
class Config:
    """Questions asked of every clip, and how answers are scored.

    ``scorer``: "labels" (label words in the answer) or "judge" (an :class:`~avlens.analyses.common.LLMJudge`
    given to :func:`collect`; its rubric is recorded in the run's config).
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?", "see": "What do you see?"})
    max_new_tokens: int = 8
    batch_size: int = 32
    scorer: str = "labels"


def collect(adapter: Adapter, items: list[Item], config: Config, scorer: Scorer | None = None) -> dict[str, list[dict]]:
    """Answers and scores for a unit of items; table ``answers`` (one row per item), ``errors``."""
    scorer = scorer or label_match
    rows, errors = [], []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        texts = generate(adapter, inputs, max_new_tokens=config.max_new_tokens).text
        for it, text in zip(chunk, texts, strict=True):
            audio_fid, video_fid = scorer(text, it)
            answer_words = words(text)
            correct = None if it.expected is None else (it.expected in answer_words)
            rows.append(
                it.record(
                    answer=text,
                    correct=correct,
                    follows=follows(text, it),
                    audio_fidelity=audio_fid,
                    video_fidelity=video_fid,
                )
            )
    return {"answers": rows, "errors": errors}


def accuracy(answers: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per condition (rows) and question (columns)."""
    return answers.pivot_table(index="condition", columns="question", values="correct", aggfunc="mean")


@dataclass(frozen=True)
class Summary:
    """One model's counterfactual figures (None: no data, with its n = 0 beside it).

    Attributes:
        accuracy: question -> clip condition -> share of right answers (None for free-form questions or
            without scored answers); n: question -> clip condition -> answers scored.
        follows_vision_rate / follows_audio_rate / follows_both_rate: on swapped clips, the share of "hear"
            answers naming only the visual label / only the audio label / both; n_swapped_hear: how many.
        hear_accuracy_drop_swapped: "hear" accuracy on factual clips minus on swapped ones.
    """

    accuracy: dict[str, dict[str, float | None]]
    n: dict[str, dict[str, int]] = field(default_factory=dict)
    follows_vision_rate: float | None = None
    follows_audio_rate: float | None = None
    follows_both_rate: float | None = None
    n_swapped_hear: int = 0
    hear_accuracy_drop_swapped: float | None = None

    def hear(self, condition: str) -> float | None:
        """The accuracy of "hear" questions on one clip condition (None if not asked)."""
        return self.accuracy.get("hear", {}).get(condition)


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    a = tables["answers"]
    acc: dict[str, dict[str, float | None]] = {}
    n: dict[str, dict[str, int]] = {}
    for (cond, q), g in a.groupby(["condition", "question"]):
        scored = g.correct.dropna().astype(float)
        acc.setdefault(q, {})[cond] = num(scored.mean(), 3) if len(scored) else None
        n.setdefault(q, {})[cond] = len(scored)
    out = Summary(acc, n)
    swapped = a[(a.condition == "swapped") & (a.question == "hear")]
    if len(swapped):
        out = replace(
            out,
            follows_vision_rate=num((swapped.follows == "visual").mean(), 3),
            follows_audio_rate=num((swapped.follows == "audio").mean(), 3),
            follows_both_rate=num((swapped.follows == "both").mean(), 3),
            n_swapped_hear=len(swapped),
        )
    factual, swapped_acc = out.hear("factual"), out.hear("swapped")
    if factual is not None and swapped_acc is not None:
        out = replace(out, hear_accuracy_drop_swapped=num(factual - swapped_acc, 3))
    return out


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Accuracy by condition for each question, one panel per model; and what swapped answers follow."""
    fig = Figure(figsize=(5 * len(tables) + 3, 4.2), layout="constrained")
    axes = fig.subplots(1, len(tables) + 1, squeeze=False)[0]
    order = ["factual", "swapped", "muted", "blank_video", "audio_only", "video_only"]
    for ax, (model, t) in zip(axes, tables.items(), strict=False):
        acc = accuracy(t["answers"]).reindex([c for c in order if c in set(t["answers"].condition)])
        x = np.arange(len(acc))
        width = 0.8 / max(1, len(acc.columns))
        for j, q in enumerate(acc.columns):
            ax.bar(x + width * (j - (len(acc.columns) - 1) / 2), acc[q].values, width=width, label=f"'{q}' questions")
        ax.set_xticks(x, acc.index, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{model}: accuracy", fontsize=10)
        ax.set_xlabel("clip condition")
        ax.set_ylabel("share of right answers")
    ax = axes[-1]
    names = list(tables)
    kinds = (("audio", "audio only", "#1b9e77"), ("both", "both", "#7570b3"))
    kinds += (("visual", "vision only", "#d95f02"), ("neither", "neither", "#999999"))
    shares, counts = [], []
    for m in names:
        a = tables[m]["answers"]
        sw = a[(a.condition == "swapped") & (a.question == "hear")]
        shares.append([(sw.follows == f).mean() if len(sw) else np.nan for f, _, _ in kinds])
        counts.append(len(sw))
    shares = np.array(shares, dtype=float).reshape(len(names), len(kinds))
    bottom = np.zeros(len(names))
    labels = [f"{m}\n(n={n})" for m, n in zip(names, counts, strict=True)]
    for j, (_, lab, col) in enumerate(kinds):
        ax.bar(labels, np.nan_to_num(shares[:, j]), bottom=bottom, color=col, label=f"follows {lab}")
        bottom += np.nan_to_num(shares[:, j])
    ax.set_ylim(0, 1.05)
    ax.set_title("swapped clips, 'what do you hear?'", fontsize=10)
    ax.set_xlabel("model")
    ax.set_ylabel("share of answers")
    legend_outside(fig, axes)
    fig.suptitle("Counterfactual evaluation")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """The organism's counterfactual figures beside P1's."""
    parts = [
        f"{m}: follows vision {pct(s.follows_vision_rate)}, "
        f"hear accuracy factual {pct(s.hear('factual'))} vs swapped {pct(s.hear('swapped'))}"
        for m, s in summaries.items()
    ]
    drops = [s.hear_accuracy_drop_swapped for s in summaries.values()]
    dominated = [(s.follows_vision_rate or 0) > (s.follows_audio_rate or 0) for s in summaries.values()]
    verdict = "agrees" if all(dominated) else "partly" if any(dominated) else "disagrees"
    return [
        Finding(
            CLAIM,
            "counterfactual clips cut audio performance by up to 56%; 23% counterfactual audio fidelity",
            "; ".join(parts) + f" (drops: {', '.join(f'{d:.0%}' for d in drops if d is not None)})",
            verdict,
            "The organism answers in one word, scored by label; P1 scored free descriptions with an LLM judge.",
        )
    ]


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """The report's tables: accuracy by question and clip condition, with n, per model; what the swapped clips'
    hearing answers name, with n."""
    rows = {}
    for model, s in summaries.items():
        for q, by in s.accuracy.items():
            for cond, acc in by.items():
                rows.setdefault((q, cond), {})[(model, "accuracy")] = acc
                rows[(q, cond)][(model, "n")] = s.n.get(q, {}).get(cond, 0)
    acc = object_frame(rows)
    acc.index.names = ["question", "clip condition"]
    acc.attrs["caption"] = "Share of right answers (n: answers scored)"
    follows = object_frame(
        {
            "names the visual label only": {m: s.follows_vision_rate for m, s in summaries.items()},
            "names the audio label only": {m: s.follows_audio_rate for m, s in summaries.items()},
            "names both": {m: s.follows_both_rate for m, s in summaries.items()},
            "n (swapped clips, 'hear')": {m: s.n_swapped_hear for m, s in summaries.items()},
        }
    )
    follows.index.name = "swapped clips: the answer"
    follows.attrs["caption"] = "What the hearing answers on swapped clips name (share of answers)"
    return [acc, follows]


CLAIM = "When sound and sight disagree, the answer about the sound follows the picture"

SPEC = Analysis(
    name=NAME,
    title="Counterfactual evaluation: hearing when sound and sight disagree",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="follows_vision_rate",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(questions={"hear": "What do you hear?", "see": "What do you see?"}, max_new_tokens=4),
    needs=Needs(generation=True),
    about=__doc__,
)
