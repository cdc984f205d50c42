"""Token-distribution shift (P1, after URIAL): is the audio-visual model's answer inherited from its
vision-language base?

The audio-visual (AV) model generates a description. The base model is then run on the same context (the same
prompt and media, minus the audio it cannot take) followed by the AV model's tokens, teacher-forced, and each
generated token is ranked under the base's distribution at its position: unshifted = rank 1, marginal = rank 2-3,
shifted = rank > 3. KL(AV || base) is measured at every position. P1 (Qwen2.5-Omni vs Qwen2.5-VL): KL 0.4;
66% of audio-event tokens unshifted, 85% within the base's top 3, so the AV model's audio behaviour is mostly
inherited from its vision-language base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..layout import TokenLayout
from ..models.base import Adapter, Inputs, Sample
from ..trace import generate, run
from .base import Analysis, Finding, Needs, num, pct, verdict
from .common import Item, batches, words
from .plotting import legend_outside

NAME = "token_shift"
SHIFTS = ("unshifted", "marginal", "shifted")


@dataclass(frozen=True)
class Config:
    """What the AV model is asked and how its tokens are classed.

    Attributes:
        question: the prompt (P1: "Describe what you see and hear.").
        conditions: clip conditions to keep from the manifest.
        max_new_tokens: longest description generated.
        audio_words: words counted as audio-event words besides the item's own audio label (e.g. every sound
            class of the data set); None: the item's audio label only.
        base_sees_audio: give the base the audio too. False (default) for a vision-language base, and for an
            Omni-architecture base that was never trained with audio; a base without an audio tower never gets it.
        batch_size: items per forward.
        template_share: a token found at the same answer position in at least this share of a model's answers
            is a fixed word of the answer template ("I see a ... and hear a ..."), marked ``template`` and
            summarised apart from the content tokens (None: mark nothing).
    """

    question: str = "Describe what you see and hear."
    conditions: tuple[str, ...] = ("factual", "swapped")
    max_new_tokens: int = 10
    audio_words: tuple[str, ...] | None = None
    base_sees_audio: bool = False
    batch_size: int = 8
    template_share: float | None = 0.9


def shift_class(rank: int) -> str:
    """URIAL's classes: unshifted (rank 1), marginal (rank 2-3), shifted (rank > 3)."""
    return "unshifted" if rank == 1 else "marginal" if rank <= 3 else "shifted"


def base_sample(sample: Sample, sees_audio: bool) -> Sample:
    """The sample as the base model gets it: unchanged, or with every audio (separate or the video's own track)
    removed."""
    if sees_audio:
        return sample
    if sample.clips is not None:
        clips = [replace(c, audio=None, video_audio=False) for c in sample.clips]
        return replace(sample, clips=clips)
    return replace(sample, audio=None, video_audio=False)


def collect(adapter: Adapter, items: list[Item], config: Config, base: Adapter | None = None) -> dict[str, list[dict]]:
    """Rank and KL of every generated token under the base model, for a unit of items.

    Table ``tokens``, one row per generated token: id, condition, question, position (0 = first answer token),
    token_id, token (its text), word (the word of the answer it belongs to, lower case; "" for none), eos (an
    end-of-turn token), rank (under the base, 1 = top), shift (unshifted / marginal / shifted), kl
    (KL(AV || base) at that position, nats), p_av, p_base (the token's probability under each), audio_word (the
    word is the item's audio label or one of ``config.audio_words``). Table ``errors``: items that could not be
    built, and answers cut before a generated media token (which cannot be teacher-forced).

    Args:
        base: the vision-language base (e.g. ``avlens.load("organism:vl-base")``, or Qwen2.5-VL for
            Qwen2.5-Omni); it must share the AV model's token ids.
    """
    if base is None:
        raise InputError("token_shift needs a base model (the vision-language model the AV model was built from)")
    sees_audio = config.base_sees_audio and base.has_audio
    extra = {w.lower() for w in config.audio_words or ()}
    rows: list[dict] = []
    errors: list[dict] = []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        trace = generate(adapter, inputs, max_new_tokens=config.max_new_tokens)
        try:
            base_inputs = base.prepare([base_sample(it.sample, sees_audio) for it in chunk])
        except InputError as e:
            errors += [{"id": it.id, "condition": it.condition, "reason": f"base: {e}"} for it in chunk]
            continue
        failed = {e.sample: e for e in base_inputs.errors}
        errors += [
            {"id": it.id, "condition": it.condition, "reason": f"base: {failed[it.id]}"}
            for it in chunk
            if it.id in failed
        ]
        keep = [b for b, it in enumerate(chunk) if it.id not in failed]
        tokens, av_logits = trace.tokens[keep], trace.step_logits[keep]
        tokens, cuts = cut_at_media(tokens, adapter.special_ids.media_ids() | base.special_ids.media_ids())
        errors += [
            {"id": chunk[keep[j]].id, "condition": chunk[keep[j]].condition, "reason": f"answer cut at {t}: {why}"}
            for j, (t, why) in cuts.items()
        ]
        _check_vocabulary(adapter, base, tokens)
        base_logits = teacher_forced(base, base_inputs, tokens)
        for j, b in enumerate(keep):
            it = chunk[b]
            audio = set(words(it.audio_label or "")) | extra
            rows += _token_rows(adapter, it, tokens[j], av_logits[j], base_logits[j], audio)
    return {"tokens": rows, "errors": errors}


def _token_rows(
    adapter: Adapter,
    item: Item,
    tokens: torch.Tensor,
    av_logits: torch.Tensor,
    base_logits: torch.Tensor,
    audio_words: set[str],
) -> list[dict]:
    """Records of one answer. tokens (T,) padded with -1; av_logits, base_logits (T, V)."""
    ids = [int(t) for t in tokens if t >= 0]
    if not ids:
        return []
    vocab = min(av_logits.shape[-1], base_logits.shape[-1])  # lm_head rows past the tokenizer may differ
    av = torch.log_softmax(av_logits[: len(ids), :vocab].float(), -1)
    ref = torch.log_softmax(base_logits[: len(ids), :vocab].float(), -1)
    kl = (av.exp() * (av - ref)).sum(-1)
    index = torch.tensor(ids, dtype=torch.long)[:, None]
    chosen = ref.gather(1, index)
    ranks = 1 + (ref > chosen).sum(-1)  # ties rank as high as the token itself
    eos = set(adapter.eos_ids)
    out = []
    for t, (tok, word) in enumerate(zip(ids, token_words(adapter.tokenizer, ids), strict=True)):
        rank = int(ranks[t])
        out.append(
            item.record(
                position=t,
                token_id=tok,
                token=adapter.tokenizer.decode([tok]),
                word=word,
                eos=tok in eos,
                rank=rank,
                shift=shift_class(rank),
                kl=float(kl[t]),
                p_av=float(av[t, tok].exp()),
                p_base=float(chosen[t, 0].exp()),
                audio_word=word in audio_words,
            )
        )
    return out


def token_words(tokenizer: Any, ids: list[int]) -> list[str]:
    """The word (lower case, ``common.words``' definition) each token of a generated answer falls in, "" for
    tokens outside any word (punctuation, spaces, special tokens). A word split over several tokens is the word
    of each of them."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    spans = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"[A-Za-z0-9]+", full)]
    out, done = [], 0  # done: characters of the answer decoded before this token
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if full.startswith(text):
            out.append(next((w for a, b, w in spans if a < len(text) and b > done), ""))
            done = len(text)
        else:  # decoding is not prefix-stable here (e.g. half a UTF-8 character): read the token alone
            alone = words(tokenizer.decode([ids[t]], skip_special_tokens=True))
            out.append(alone[0] if alone else "")
    return out


def cut_at_media(tokens: torch.Tensor, media_ids: set[int]) -> tuple[torch.Tensor, dict[int, tuple[int, str]]]:
    """Answers cut before their first media placeholder or marker token.

    A generated media token cannot be teacher-forced: the model would look for media features for it. Trained
    models do not generate them; random test models do.

    Args:
        tokens: (B, T) generated ids, -1 after a row stopped.

    Returns:
        the cut tokens (B, T) and row -> (position, reason) for every row that was cut.
    """
    tokens = tokens.clone()
    is_media = torch.isin(tokens, torch.tensor(sorted(media_ids), dtype=tokens.dtype))
    cuts = {}
    for r in is_media.any(1).nonzero().flatten().tolist():
        t = int(is_media[r].nonzero()[0])
        cuts[r] = (t, f"the model generated media token {int(tokens[r, t])}")
        tokens[r, t:] = -1
    return tokens, cuts


def _check_vocabulary(adapter: Adapter, base: Adapter, tokens: torch.Tensor) -> None:
    """Teacher forcing needs the same token ids: the generated ids must mean the same tokens to both models."""
    ids = sorted({int(t) for t in tokens.flatten() if t >= 0})
    if adapter.tokenizer.convert_ids_to_tokens(ids) != base.tokenizer.convert_ids_to_tokens(ids):
        raise InputError(
            f"the base model ({base.source or base.family}) does not share the AV model's token ids; token_shift "
            "needs the vision-language model it was built from"
        )


# ---------------------------------------------------------------------------------------------------------
# Teacher forcing
# ---------------------------------------------------------------------------------------------------------
def extend(adapter: Adapter, inputs: Inputs, tokens: torch.Tensor) -> Inputs:
    """The batch with each row's generated tokens appended after its prompt, left-padded again.

    Args:
        inputs: a batch from ``adapter.prepare`` (left-padded).
        tokens: (B, T) generated ids, -1 after a row stopped.

    Returns:
        Inputs of length max_b(prompt_b + generated_b): media tensors unchanged, the layout shifted with the new
        tokens in ``generated`` and ``last`` still the last prompt position (as during generation).

    Raises:
        ValueError: the generated tokens change the prompt's layout (e.g. a media placeholder was generated).
    """
    ids, mask = inputs.input_ids, inputs.tensors["attention_mask"].bool()
    b, old_len = ids.shape
    n_prompt = mask.sum(1)
    n_gen = (tokens >= 0).sum(1)
    length = int((n_prompt + n_gen).max())
    pad = adapter.tokenizer.pad_token_id
    pad = pad if pad is not None else adapter.eos_ids[0]
    new_ids = torch.full((b, length), pad, dtype=ids.dtype)
    new_mask = torch.zeros((b, length), dtype=inputs.tensors["attention_mask"].dtype)
    # src: old prompt columns; dst: where they go; gen: columns of the generated tokens
    src, dst, gen = [], [], []
    for r in range(b):
        p, g = int(n_prompt[r]), int(n_gen[r])
        start = length - p - g
        src.append(slice(old_len - p, old_len))
        dst.append(slice(start, start + p))
        gen.append(slice(start + p, length))
        new_ids[r, dst[r]] = ids[r, src[r]]
        new_ids[r, gen[r]] = tokens[r, :g]
        new_mask[r, start:] = 1
    tensors = dict(inputs.tensors, input_ids=new_ids, attention_mask=new_mask)
    if "mm_token_type_ids" in tensors:  # generated tokens are text (type 0)
        old = tensors["mm_token_type_ids"]
        new = old.new_zeros((b, length))
        for r in range(b):
            new[r, dst[r]] = old[r, src[r]]
        tensors["mm_token_type_ids"] = new
    groups = {}
    for name, g in inputs.layout.groups.items():
        moved = g.new_zeros((b, length))
        for r in range(b):
            moved[r, dst[r]] = g[r, src[r]]
        groups[name] = moved
    groups["generated"] = torch.zeros((b, length), dtype=torch.bool)
    for r in range(b):
        groups["generated"][r, gen[r]] = True
    layout = replace(inputs.layout, groups=groups, valid=new_mask.bool())
    _check_layout(adapter, layout, new_ids, new_mask)
    return Inputs(tensors=tensors, layout=layout, samples=inputs.samples, errors=inputs.errors)


def _check_layout(adapter: Adapter, layout: TokenLayout, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The shifted layout must be what the model's token ids say (chunks need the video grids: not compared)."""
    derived = TokenLayout.from_ids(ids, mask, adapter.special_ids)
    for name, g in derived.groups.items():
        if name in ("last", "generated") or name.startswith("chunk"):
            continue
        if not torch.equal(g, layout.groups.get(name, torch.zeros_like(g))):
            raise ValueError(f"the generated tokens change the prompt's token group '{name}'")


def teacher_forced(adapter: Adapter, inputs: Inputs, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits for each generated token given the prompt and the tokens before it.

    Args:
        inputs: the prompt batch for this model (from ``adapter.prepare``).
        tokens: (B, T) ids generated (by any model sharing the token ids), -1 after a row stopped.

    Returns:
        (B, T, V) float logits: [b, t] is the distribution the model gives for token t of row b (NaN where
        tokens[b, t] is -1). One forward over prompt + generated tokens.
    """
    ext = extend(adapter, inputs, tokens)
    logits = run(adapter, ext, logits="all").logits  # (B, L', V)
    b, t = tokens.shape
    out = logits.new_full((b, t, logits.shape[-1]), float("nan"))
    for r in range(b):
        gen = ext.layout.groups["generated"][r].nonzero().flatten()
        if len(gen):
            # token t is predicted at the position before it (the last prompt position for t = 0)
            out[r, : len(gen)] = logits[r, gen - 1]
    return out


# ---------------------------------------------------------------------------------------------------------
# Summary, figure, comparison with P1
# ---------------------------------------------------------------------------------------------------------
def mark_template(tokens: pd.DataFrame, share: float | None) -> pd.DataFrame:
    """``tokens`` with column ``template``: the token (its id) is at the same position in at least ``share`` of
    the answers (items) of its model, a fixed word of the answer template rather than content."""
    if tokens.empty or share is None:
        return tokens.assign(template=False)
    n_answers = tokens.id.nunique()
    counts = tokens.groupby(["position", "token_id"]).id.transform("nunique")
    return tokens.assign(template=(counts >= share * n_answers).to_numpy())


def positions(tokens: pd.DataFrame) -> pd.DataFrame:
    """The distribution of KL per answer position: n, the most frequent token there and whether it is a template
    token, KL mean / median / quartiles / max, and the shares of unshifted tokens."""
    if tokens.empty:
        return pd.DataFrame(columns=POSITION_COLUMNS)
    g = tokens.groupby("position")
    out = pd.DataFrame(
        {
            "n": g.size(),
            "token": g.token.agg(lambda s: s.value_counts().index[0]),
            "template": g.template.mean() >= 0.5,
            "kl_mean": g.kl.mean(),
            "kl_median": g.kl.median(),
            "kl_q25": g.kl.quantile(0.25),
            "kl_q75": g.kl.quantile(0.75),
            "kl_max": g.kl.max(),
            "unshifted_share": g["shift"].agg(lambda s: float((s == "unshifted").mean())),
        }
    ).reset_index()
    return out[POSITION_COLUMNS]


POSITION_COLUMNS = ["position", "n", "token", "template", "kl_mean", "kl_median", "kl_q25", "kl_q75", "kl_max"]
POSITION_COLUMNS += ["unshifted_share"]


def finalize(tables: dict[str, pd.DataFrame], config: Config) -> dict[str, pd.DataFrame]:
    """Mark template tokens over all of a model's answers (column ``template``, see :func:`mark_template`) and
    add table ``positions`` (see :func:`positions`)."""
    tokens = mark_template(tables["tokens"], config.template_share)
    return {**tables, "tokens": tokens, "positions": positions(tokens)}


def shares(tokens: pd.DataFrame) -> dict[str, float]:
    """Shares of unshifted, marginal and shifted tokens, and of tokens within the base's top 3."""
    n = len(tokens)
    out = {f"{s}_share": float((tokens["shift"] == s).mean()) if n else float("nan") for s in SHIFTS}
    out["top3_share"] = float((tokens["rank"] <= 3).mean()) if n else float("nan")
    return out


@dataclass(frozen=True)
class Summary:
    """Shift shares (unshifted: rank 1 under the base, marginal: 2-3, shifted: > 3; top3: rank <= 3) over all
    generated tokens and over audio-event words (``audio_*``), KL(AV || base) in nats, and per clip condition
    (None: no such tokens, n = 0 beside it).

    KL: ``mean_kl`` / ``median_kl`` over all tokens; ``content_*`` over the tokens that are not fixed words of
    the answer template (the verdict's figure: P1's free descriptions have no fixed template), ``template_*``
    over those that are; ``median_kl_by_position``: position -> median (the full distribution is table
    ``positions``); ``template_tokens``: the template's words by position."""

    n_tokens: int
    n_audio_tokens: int
    unshifted_share: float | None
    marginal_share: float | None
    shifted_share: float | None
    top3_share: float | None
    audio_unshifted_share: float | None
    audio_marginal_share: float | None
    audio_shifted_share: float | None
    audio_top3_share: float | None
    mean_kl: float | None
    median_kl: float | None = None
    n_content_tokens: int = 0
    content_mean_kl: float | None = None
    content_median_kl: float | None = None
    n_template_tokens: int = 0
    template_mean_kl: float | None = None
    template_tokens: dict[int, str] = field(default_factory=dict)
    median_kl_by_position: dict[int, float | None] = field(default_factory=dict)
    mean_kl_by_condition: dict[str, float | None] = field(default_factory=dict)
    content_mean_kl_by_condition: dict[str, float | None] = field(default_factory=dict)
    audio_unshifted_share_by_condition: dict[str, float | None] = field(default_factory=dict)
    n_audio_tokens_by_condition: dict[str, int] = field(default_factory=dict)


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    """Shift shares over all tokens and over audio-event words, mean KL; per clip condition too."""
    t = tables["tokens"]
    if "template" not in t:  # tables that did not go through finalize
        t = mark_template(t, Config().template_share)
    audio = t[t.audio_word.astype(bool)] if len(t) else t
    content, template = t[~t.template.astype(bool)], t[t.template.astype(bool)]

    def mean(x: pd.Series) -> float | None:
        return num(x.mean(), 3) if len(x) else None

    def median(x: pd.Series) -> float | None:
        return num(x.median(), 3) if len(x) else None

    out: dict[str, Any] = {"n_tokens": len(t), "n_audio_tokens": len(audio)}
    out |= {k: num(v, 3) for k, v in shares(t).items()}
    out |= {f"audio_{k}": num(v, 3) for k, v in shares(audio).items()}
    out |= {"mean_kl": mean(t.kl), "median_kl": median(t.kl)}
    out |= {
        "n_content_tokens": len(content),
        "content_mean_kl": mean(content.kl),
        "content_median_kl": median(content.kl),
    }
    out |= {"n_template_tokens": len(template), "template_mean_kl": mean(template.kl)}
    pos = positions(t)
    out["template_tokens"] = {int(r.position): str(r.token) for r in pos.itertuples() if r.template}
    out["median_kl_by_position"] = {int(r.position): num(r.kl_median, 3) for r in pos.itertuples()}
    kl, content_kl, unshifted, n_audio = {}, {}, {}, {}
    for cond, g in t.groupby("condition"):
        a = g[g.audio_word.astype(bool)]
        kl[cond] = mean(g.kl)
        content_kl[cond] = mean(g.kl[~g.template.astype(bool)])
        unshifted[cond] = num((a["shift"] == "unshifted").mean(), 3) if len(a) else None
        n_audio[cond] = len(a)
    return Summary(
        **out,
        mean_kl_by_condition=kl,
        content_mean_kl_by_condition=content_kl,
        audio_unshifted_share_by_condition=unshifted,
        n_audio_tokens_by_condition=n_audio,
    )


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Stacked shares of unshifted / marginal / shifted tokens, all tokens and audio-event words, per model; the
    KL per answer position (median, quartiles shaded, mean as open circles; template positions named and
    shaded grey); mean KL over content tokens per model and clip condition."""
    fig = Figure(figsize=(6 + 3.2 * len(tables), 4.4), layout="constrained")
    ax, ax_pos, ax_kl = fig.subplots(1, 3, width_ratios=[1.6, 1.6, 1])
    colors = {"unshifted": "#1b9e77", "marginal": "#e6ab02", "shifted": "#d95f02"}
    labels, values = [], []
    for model, t in tables.items():
        tok = t["tokens"]
        for what, sub in (("all", tok), ("audio words", tok[tok.audio_word.astype(bool)] if len(tok) else tok)):
            labels.append(f"{model}\n{what}\n(n={len(sub)})")
            values.append([shares(sub)[f"{s}_share"] for s in SHIFTS])
    values = np.nan_to_num(np.array(values, dtype=float).reshape(-1, len(SHIFTS)))
    bottom = np.zeros(len(labels))
    for j, s in enumerate(SHIFTS):
        ax.bar(labels, values[:, j], bottom=bottom, color=colors[s], label=f"{s} (base rank {RANKS[s]})")
        bottom += values[:, j]
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("model, tokens")
    ax.set_ylabel("share of generated tokens")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("rank of each token under the base", fontsize=10)

    for k, (model, t) in enumerate(tables.items()):
        pos = t.get("positions")
        if pos is None:
            pos = positions(mark_template(t["tokens"], Config().template_share))
        if pos.empty:
            continue
        color = f"C{k}"
        ax_pos.plot(pos.position, pos.kl_median, "-o", ms=3, color=color, label=f"{model}: median (quartiles shaded)")
        ax_pos.fill_between(pos.position, pos.kl_q25, pos.kl_q75, color=color, alpha=0.15, lw=0)
        ax_pos.plot(pos.position, pos.kl_mean, "o", mfc="none", color=color, label=f"{model}: mean")
        if k == 0:
            for r in pos[pos.template.astype(bool)].itertuples():
                ax_pos.axvspan(r.position - 0.4, r.position + 0.4, color="#dddddd", zorder=0, lw=0)
            ticks = [f"{r.position}\n{r.token!r}" if r.template else str(r.position) for r in pos.itertuples()]
            ax_pos.set_xticks(pos.position, ticks, fontsize=7)
    ax_pos.set_yscale("symlog", linthresh=0.01)
    ax_pos.set_xlabel("answer position (grey: template token, named)")
    ax_pos.set_ylabel("KL(AV || base), nats")
    ax_pos.set_title("KL by position", fontsize=10)

    conditions = sorted({c for t in tables.values() for c in t["tokens"].get("condition", pd.Series()).unique()})
    width = 0.8 / max(1, len(conditions))
    for k, cond in enumerate(conditions):
        kls = []
        for t in tables.values():
            tok = t["tokens"]
            content = ~tok.template.astype(bool) if "template" in tok else np.ones(len(tok), bool)
            kls.append(tok.loc[(tok.condition == cond) & content, "kl"].mean())
        ax_kl.bar(
            np.arange(len(tables)) + k * width, kls, width=width, label=f"content tokens, {cond}", color=f"C{k + 2}"
        )
    ax_kl.axhline(0.4, color="#555555", ls="--", lw=0.8, label="P1: mean KL 0.4")
    ax_kl.set_xticks(np.arange(len(tables)) + width * (len(conditions) - 1) / 2, list(tables), fontsize=8)
    ax_kl.set_xlabel("model")
    ax_kl.set_ylabel("mean KL over content tokens, nats")
    ax_kl.set_title("mean KL (template excluded)", fontsize=10)
    legend_outside(fig, (ax, ax_pos, ax_kl), ncols=4)
    fig.suptitle("Token-distribution shift against the vision-language base")
    return fig


RANKS = {"unshifted": "1", "marginal": "2-3", "shifted": "> 3"}


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """Shift shares and KL beside P1's."""
    parts, calls = [], []
    for m, s in summaries.items():
        un, top3 = s.audio_unshifted_share, s.audio_top3_share
        parts.append(
            f"{m}: audio-event tokens {pct(un)} unshifted, {pct(top3)} in the base's top 3 "
            f"(n={s.n_audio_tokens}); all tokens {pct(s.unshifted_share)} unshifted"
        )
        calls.append(
            None
            if un is None or top3 is None
            else "agrees"
            if un >= 0.5 and top3 >= 0.7
            else "partly"
            if top3 >= 0.5
            else "disagrees"
        )
    inherited = Finding(
        CLAIM,
        "66% of audio-event tokens unshifted, 85% within the base's top 3 (Qwen2.5-Omni vs Qwen2.5-VL)",
        "; ".join(parts),
        verdict(calls),
        "Agrees when at least half the audio-event tokens are unshifted and 70% are in the top 3. "
        "The base sees the same prompt and video without the audio.",
    )
    parts, calls = [], []
    for m, s in summaries.items():
        kl = s.content_mean_kl
        template = ", ".join(f"{w!r}" for w in s.template_tokens.values()) or "none"
        parts.append(
            f"{m}: mean KL over content tokens {pct(kl, '.2f')} (median {pct(s.content_median_kl, '.2f')}, "
            f"n={s.n_content_tokens}); over all tokens mean {pct(s.mean_kl, '.2f')}, median {pct(s.median_kl, '.2f')}"
            f" (n={s.n_tokens}); template tokens ({template}) mean {pct(s.template_mean_kl, '.2f')}"
            f" (n={s.n_template_tokens})"
        )
        calls.append(None if kl is None else "agrees" if kl <= 1.0 else "partly" if kl <= 2.0 else "disagrees")
    divergence = Finding(
        "The AV model's next-token distribution stays close to the base's",
        "KL(AVLLM || base) 0.4 on average over generated tokens",
        "; ".join(parts),
        verdict(calls),
        "Verdict on the mean KL over content tokens: tokens that are not fixed words of the answer template (a "
        "token at the same position in at least 90% of the answers), since P1's free descriptions have no such "
        "template; the template's KL is shown beside it, and the KL per answer position in the figure. KL depends "
        "on the vocabulary and how peaked the models are; agrees when it stays below 1 nat.",
    )
    return [inherited, divergence]


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """The report's table: per model and token group (all, audio-event words, content, template), n, shift
    shares and KL."""
    rows = []
    for model, s in summaries.items():
        groups = {
            "all tokens": (s.n_tokens, s.unshifted_share, s.marginal_share, s.shifted_share, s.top3_share),
            "audio-event words": (
                s.n_audio_tokens,
                s.audio_unshifted_share,
                s.audio_marginal_share,
                s.audio_shifted_share,
                s.audio_top3_share,
            ),
        }
        kl = {"all tokens": (s.mean_kl, s.median_kl)}
        for group, (n, un, marginal, shifted, top3) in groups.items():
            mean, median = kl.get(group, (None, None))
            rows.append(
                {"model": model, "tokens": group, "n": n, "unshifted": un, "marginal": marginal, "shifted": shifted,
                 "in base's top 3": top3, "mean KL": mean, "median KL": median}
            )  # fmt: skip
        rows.append(
            {"model": model, "tokens": "content (not template)", "n": s.n_content_tokens, "mean KL": s.content_mean_kl,
             "median KL": s.content_median_kl}
        )  # fmt: skip
        template = ", ".join(repr(w) for w in s.template_tokens.values())
        rows.append(
            {"model": model, "tokens": f"template ({template or 'none'})", "n": s.n_template_tokens,
             "mean KL": s.template_mean_kl}
        )  # fmt: skip
    out = pd.DataFrame(rows, dtype=object).set_index(["model", "tokens"])
    out.attrs["caption"] = "Shift classes (share of tokens; rank under the base 1 / 2-3 / > 3) and KL(AV || base), nats"
    return [out]


CLAIM = "The AV model's audio-event tokens are mostly what the vision-language base would say"

SPEC = Analysis(
    name=NAME,
    title="Token-distribution shift against the vision-language base",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="audio_unshifted_share",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    finalize=finalize,
    tables=tables,
    default_config=Config(conditions=("factual", "swapped")),
    needs=Needs(base=True, generation=True),
    about=__doc__,
)
