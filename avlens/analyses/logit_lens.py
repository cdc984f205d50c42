"""Logit lens (P1): does the model decode what it hears at some layer, even when its answer says what it sees?

The residual at every layer 0..n_layers is read out through the model's own final norm and unembedding
(:meth:`Adapter.unembed`; ``norm=False`` skips the norm, as P1's code did) at two sites: the audio tokens and the
last prompt position (which produces the answer). For each item we follow the rank (1 = top) and probability of
three words' first tokens: the audio label (what is heard), the visual label (what is seen) and a control label
(a label of the task that is neither heard nor seen). The control is the false-positive floor: with a small
vocabulary, or the best of many audio positions, a word can reach the top k by chance.

P1 reports 61.4% "latent audio understanding" (the audio event decoded at some layer of the audio tokens)
against 23% audio fidelity of the answers on counterfactual clips (Qwen2.5-Omni).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from matplotlib.figure import Figure

from ..models.base import Adapter
from ..trace import Capture, run
from .base import Analysis, Finding, num, pct, verdict
from .common import Item, batches, first_token, follows
from .plotting import layer_axis, legend_outside, rank_axis
from .tables import object_frame

NAME = "logit_lens"
SITES = ("audio", "last")
TARGETS = ("audio", "visual", "control")
CHUNK = 256  # positions unembedded at once: CHUNK x vocabulary floats (about 150 MB for a 152k vocabulary)


@dataclass(frozen=True)
class Config:
    """What to read and how.

    Attributes:
        questions / conditions: the items (see :func:`avlens.analyses.common.items_from_manifest`).
        top_k: a label counts as decoded when its first token is among the top k.
        norm: apply the final norm before the unembedding (True, the model's own readout); False reproduces P1's
            code, which skipped it.
        labels: the labels control words are drawn from (None: the audio and visual labels of the unit's items).
        seed: of the control label choice.
        batch_size: items per forward. The full residual of every layer is kept for a batch: (n_layers + 1) x
            B x L x D values, so keep it small for large models.
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    top_k: int = 5
    norm: bool = True
    labels: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 8


@torch.no_grad()
def token_ranks(
    adapter: Adapter, hidden: torch.Tensor, tokens: torch.Tensor, *, norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank and probability of given tokens under the logit lens.

    Args:
        hidden: (N, D) residual-stream states.
        tokens: (N, K) token ids to look up at each state.
        norm: apply the final norm (see :meth:`Adapter.unembed`).

    Returns:
        ranks (N, K) long, 1 = the top token (1 + the number of tokens with a strictly higher logit), and
        probabilities (N, K) float under the softmax of the lens logits.
    """
    ranks, probs = [], []
    for s in range(0, len(hidden), CHUNK):
        logits = adapter.unembed(hidden[s : s + CHUNK], norm=norm)  # (n, V)
        tok = tokens[s : s + CHUNK]
        target = logits.gather(1, tok)  # (n, K)
        # One target column at a time: a (n, K, V) comparison would undo the chunking.
        ranks.append(torch.stack([(logits > target[:, [k]]).sum(1) + 1 for k in range(tok.shape[1])], 1))
        probs.append(logits.log_softmax(-1).gather(1, tok).exp())
    return torch.cat(ranks), torch.cat(probs)


def control_label(item: Item, candidates: Sequence[str], adapter: Adapter, seed: int) -> str | None:
    """A label that is neither heard nor seen in the item, and whose first token differs from theirs, chosen
    reproducibly from the item's id and the seed (None when no candidate qualifies)."""
    own = [x for x in (item.audio_label, item.visual_label) if x is not None]
    taken = {first_token(adapter, x) for x in own}
    pool = sorted(c for c in set(candidates) - set(own) if first_token(adapter, c) not in taken)
    return random.Random(f"{seed}/{item.id}").choice(pool) if pool else None


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """The lens on a unit of items.

    Table ``lens``: one row per item x layer x site x target with ``id``, ``condition``, ``question``, ``layer``
    (the residual at the input of that decoder layer; n_layers = the last layer's output), ``site`` ("audio" or
    "last"), ``target`` ("audio", "visual", "control"), ``label`` (the word), ``rank`` (1 = top), ``prob``,
    ``in_top_k``, ``answer`` (the model's own first answer token: the argmax of its final logits at the last
    position, decoded) and ``follows`` ("audio", "visual" or "neither", :func:`~avlens.analyses.common.follows`
    on that answer). At the audio site the rank is the best over the item's audio tokens, and ``prob`` the
    probability at the position that has it (the higher probability among tied ranks). Items without audio
    tokens have no audio-site rows; items with nothing heard no audio-target rows. Table ``errors`` as in
    :mod:`~avlens.analyses.counterfactual`.
    """
    candidates = config.labels or sorted({x for it in items for x in (it.audio_label, it.visual_label) if x})
    rows, errors = [], []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        trace = run(adapter, inputs, capture=[Capture.residual()])
        answers = [adapter.decode([int(i)]) for i in trace.logits.argmax(-1)]
        labels = [
            {
                "audio": it.audio_label,
                "visual": it.visual_label,
                "control": control_label(it, candidates, adapter, config.seed),
            }
            for it in chunk
        ]
        # (B, 3) first-token ids of the targets; -1 where an item has no such label
        tokens = torch.tensor([[first_token(adapter, w[t]) if w[t] else -1 for t in TARGETS] for w in labels])
        for layer, residual in trace.captures["residual"].items():  # residual: (B, L, D)
            for site in SITES:
                mask = trace.layout.mask(site)  # (B, L)
                row_of = mask.nonzero()[:, 0]  # (N,) the batch row of every position of the site
                ranks, probs = token_ranks(adapter, residual[mask], tokens[row_of].clamp(min=0), norm=config.norm)
                for b, it in enumerate(chunk):
                    at = row_of == b
                    if not at.any():
                        continue
                    for k, target in enumerate(TARGETS):
                        if tokens[b, k] < 0:
                            continue
                        r, p = ranks[at, k], probs[at, k]
                        best = int(torch.where(r == r.min(), p, -1.0).argmax())
                        rank = int(r[best])
                        rows.append(
                            it.record(
                                layer=layer,
                                site=site,
                                target=target,
                                label=labels[b][target],
                                rank=rank,
                                prob=float(p[best]),
                                in_top_k=rank <= config.top_k,
                                answer=answers[b],
                                follows=follows(answers[b], it),
                            )
                        )
    return {"lens": rows, "errors": errors}


def ever_decoded(lens: pd.DataFrame, target: str = "audio", sites: Sequence[str] = SITES) -> pd.Series:
    """Per item (index: id): whether the target's label is in the top k at some layer of some of the sites."""
    d = lens[(lens.target == target) & lens.site.isin(sites)]
    return d.groupby("id").in_top_k.any()


@dataclass(frozen=True)
class LensCondition:
    """The lens on one clip condition.

    Attributes:
        audio_decoded: share of items whose audio label reaches the top k at some layer, at either site (P1's
            latent audio understanding); control_decoded: the same for the control label (the floor).
        audio_decoded_at: site -> the same at one site.
        best_layer / best_layer_share: site -> the layer where most items have the audio label in the top k, and
            that share.
        n: the items these shares are of.
    """

    audio_decoded: float | None
    control_decoded: float | None
    n: int = 0
    audio_decoded_at: dict[str, float | None] = field(default_factory=dict)
    best_layer: dict[str, int] = field(default_factory=dict)
    best_layer_share: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """Attributes:
    conditions: clip condition -> :class:`LensCondition` (conditions where something is heard).
    audio_decoded_swapped: the headline, P1's latent audio understanding: the share of swapped items whose audio
        label reaches the top k at some layer (either site); control_decoded_swapped: the same for the control
        label (the chance floor).
    audio_decoded_while_answer_follows_vision: the share of swapped items whose audio label is decoded and whose
        answer follows the picture; audio_decoded_given_follows_vision: the share decoded among the items whose
        answer follows the picture (n_follows_vision of them).
    follows_vision_rate / follows_audio_rate: what the swapped answers follow; n_swapped: how many there are.
    (Figures are None without swapped clips, with n = 0.)
    """

    conditions: dict[str, LensCondition]
    audio_decoded_swapped: float | None = None
    control_decoded_swapped: float | None = None
    audio_decoded_while_answer_follows_vision: float | None = None
    audio_decoded_given_follows_vision: float | None = None
    follows_vision_rate: float | None = None
    follows_audio_rate: float | None = None
    n_swapped: int = 0
    n_follows_vision: int = 0


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    """Headline figures per condition and for the swapped clips (see :class:`Summary`)."""
    lens = tables["lens"]
    conditions: dict[str, LensCondition] = {}
    for cond, d in lens.groupby("condition"):
        if not (d.target == "audio").any():  # nothing heard (muted, video only)
            continue
        decoded = ever_decoded(d)
        c = LensCondition(num(decoded.mean(), 3), num(ever_decoded(d, "control").mean(), 3), n=len(decoded))
        for site in SITES:
            at = d[(d.target == "audio") & (d.site == site)]
            if at.empty:
                continue
            c.audio_decoded_at[site] = num(ever_decoded(d, sites=[site]).mean(), 3)
            by_layer = at.groupby("layer").in_top_k.mean()
            c.best_layer[site] = int(by_layer.idxmax())
            c.best_layer_share[site] = num(by_layer.max(), 3)
        conditions[cond] = c
    swapped = lens[lens.condition == "swapped"]
    if swapped.empty:
        return Summary(conditions)
    answer = swapped.groupby("id").follows.first()
    decoded = ever_decoded(swapped).reindex(answer.index, fill_value=False)
    vision = answer == "visual"
    control = ever_decoded(swapped, "control").reindex(answer.index, fill_value=False)
    return Summary(
        conditions,
        audio_decoded_swapped=num(decoded.mean(), 3),
        control_decoded_swapped=num(control.mean(), 3),
        audio_decoded_while_answer_follows_vision=num((decoded & vision).mean(), 3),
        audio_decoded_given_follows_vision=num(decoded[vision].mean(), 3) if vision.any() else None,
        follows_vision_rate=num(vision.mean(), 3),
        follows_audio_rate=num((answer == "audio").mean(), 3),
        n_swapped=len(answer),
        n_follows_vision=int(vision.sum()),
    )


def profile(lens: pd.DataFrame) -> pd.DataFrame:
    """Median rank and mean probability per condition, site, target and layer."""
    keys = ["condition", "site", "target", "layer"]
    return lens.groupby(keys).agg(median_rank=("rank", "median"), mean_prob=("prob", "mean")).reset_index()


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Median rank (log scale) and mean probability of the audio, visual and control labels vs layer; one column
    per site, two rows (rank, probability) per model; factual solid, swapped dashed; each label its own colour
    and marker (on factual clips the audio and visual labels coincide: the visual's wide line and open squares
    frame the audio's)."""
    fig = Figure(figsize=(4.5 * len(SITES), 2.8 * 2 * len(tables) + 0.6), layout="constrained")
    axes = fig.subplots(2 * len(tables), len(SITES), squeeze=False)
    colors = {"audio": "#1b9e77", "visual": "#d95f02", "control": "#999999"}
    # the visual label wide with open squares, the audio label thin with dots on top: where they coincide (factual
    # clips: one label) both stay visible
    markers = {
        "audio": dict(marker="o", ms=3, lw=1.2),
        "visual": dict(marker="s", ms=8, mfc="none", mew=1.2, lw=4, alpha=0.45),
        "control": dict(marker="^", ms=4, lw=1.2),
    }
    styles = {"factual": "-", "swapped": "--"}
    for m, (model, t) in enumerate(tables.items()):
        p = profile(t["lens"])
        for col, site in enumerate(SITES):
            for row, (stat, ylabel) in enumerate((("median_rank", "median rank"), ("mean_prob", "mean probability"))):
                ax = axes[2 * m + row, col]
                at = p[p.site == site]
                for target in ("control", "visual", "audio"):
                    for cond, d in at[at.target == target].groupby("condition"):
                        style = styles.get(cond, ":")
                        ax.plot(
                            d.layer,
                            d[stat],
                            style,
                            color=colors[target],
                            label=f"{target} label, {cond}",
                            **markers[target],
                        )
                if stat == "median_rank":
                    rank_axis(ax, "median rank (1 = top)")
                else:
                    ax.set_ylabel(ylabel)
                layer_axis(ax, "layer (residual at its input)")
                ax.set_title(f"{model}: {site} {'tokens (best)' if site == 'audio' else 'position'}", fontsize=9)
    legend_outside(fig, axes.flat, ncols=3)
    fig.suptitle("Logit lens: where each label's first token ranks, by layer")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """Latent audio understanding (the audio label decoded at some layer) vs what the answers follow, against
    P1's 61.4% vs 23%."""
    parts, verdicts = [], []
    for model, s in summaries.items():
        if s.audio_decoded_swapped is None:
            parts.append(f"{model}: no swapped clips (n = 0)")
            continue
        decoded, floor, heard = s.audio_decoded_swapped, s.control_decoded_swapped or 0.0, s.follows_audio_rate or 0.0
        parts.append(
            f"{model}: audio label decoded at some layer in {decoded:.0%} of {s.n_swapped} swapped clips (control "
            f"label {floor:.0%}); decoded while the answer follows vision "
            f"{pct(s.audio_decoded_while_answer_follows_vision)} of all, {pct(s.audio_decoded_given_follows_vision)} "
            f"of the {s.n_follows_vision} that follow vision; answers follow the audio in {heard:.0%}"
        )
        above_floor, above_answers = decoded > floor, decoded > heard
        verdicts.append("agrees" if above_floor and above_answers else "partly" if above_answers else "disagrees")
    return [
        Finding(
            CLAIM,
            "61.4% latent audio understanding vs 23% counterfactual audio fidelity (Qwen2.5-Omni)",
            "; ".join(parts),
            verdict(verdicts),
            "Decoded = the audio label's first token in the top k of the logit lens at some layer, at the audio "
            "tokens (best position) or the last position; agrees when that share exceeds both the control "
            "label's (the chance floor) and the share of answers that follow the audio. P1 scored fidelity with "
            "an LLM judge on descriptions; here the first answer token is matched to the labels.",
        )
    ]


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """The report's table: the swapped clips' lens figures per model, each with its n."""
    rows = {}
    for model, s in summaries.items():
        figures = {
            "audio label decoded at some layer": (s.audio_decoded_swapped, s.n_swapped),
            "control label decoded at some layer (chance floor)": (s.control_decoded_swapped, s.n_swapped),
            "audio decoded and the answer follows vision": (s.audio_decoded_while_answer_follows_vision, s.n_swapped),
            "audio decoded, among answers that follow vision": (
                s.audio_decoded_given_follows_vision,
                s.n_follows_vision,
            ),
            "answer follows vision": (s.follows_vision_rate, s.n_swapped),
            "answer follows the audio": (s.follows_audio_rate, s.n_swapped),
        }
        for name, (value, n) in figures.items():
            rows.setdefault(name, {})[(model, "share")] = value
            rows[name][(model, "n")] = n
    out = object_frame(rows)
    out.index.name = "swapped clips"
    out.attrs["caption"] = "Logit lens on swapped clips (share of clips; n: clips it is a share of)"
    return [out]


CLAIM = "The model decodes the sound at some layer far more often than its answer reports it"

SPEC = Analysis(
    name=NAME,
    title="Logit lens: latent audio understanding",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="audio_decoded_swapped",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(questions={"hear": "What do you hear?"}, conditions=("factual", "swapped")),
    about=__doc__,
)
