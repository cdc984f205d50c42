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
    """

    question: str = "Describe what you see and hear."
    conditions: tuple[str, ...] = ("factual", "swapped")
    max_new_tokens: int = 10
    audio_words: tuple[str, ...] | None = None
    base_sees_audio: bool = False
    batch_size: int = 8


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
def shares(tokens: pd.DataFrame) -> dict[str, float]:
    """Shares of unshifted, marginal and shifted tokens, and of tokens within the base's top 3."""
    n = len(tokens)
    out = {f"{s}_share": float((tokens["shift"] == s).mean()) if n else float("nan") for s in SHIFTS}
    out["top3_share"] = float((tokens["rank"] <= 3).mean()) if n else float("nan")
    return out


@dataclass(frozen=True)
class Summary:
    """Shift shares (unshifted: rank 1 under the base, marginal: 2-3, shifted: > 3; top3: rank <= 3) over all
    generated tokens and over audio-event words (``audio_*``), mean KL(AV || base) in nats, and per clip
    condition (None: no such tokens)."""

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
    mean_kl_by_condition: dict[str, float | None] = field(default_factory=dict)
    audio_unshifted_share_by_condition: dict[str, float | None] = field(default_factory=dict)


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    """Shift shares over all tokens and over audio-event words, mean KL; per clip condition too."""
    t = tables["tokens"]
    audio = t[t.audio_word.astype(bool)] if len(t) else t
    out: dict[str, Any] = {"n_tokens": len(t), "n_audio_tokens": len(audio)}
    out |= {k: num(v) for k, v in shares(t).items()}
    out |= {f"audio_{k}": num(v) for k, v in shares(audio).items()}
    out["mean_kl"] = num(t.kl.mean()) if len(t) else None
    kl, unshifted = {}, {}
    for cond, g in t.groupby("condition"):
        a = g[g.audio_word.astype(bool)]
        kl[cond] = num(g.kl.mean())
        unshifted[cond] = num((a["shift"] == "unshifted").mean()) if len(a) else None
    return Summary(**out, mean_kl_by_condition=kl, audio_unshifted_share_by_condition=unshifted)


def plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Stacked shares of unshifted / marginal / shifted tokens, all tokens and audio-event words, per model;
    mean KL per model and clip condition."""
    fig = Figure(figsize=(4 + 2.2 * len(tables), 3.6), layout="constrained")
    ax, ax_kl = fig.subplots(1, 2, width_ratios=[2, 1])
    colors = {"unshifted": "#1b9e77", "marginal": "#e6ab02", "shifted": "#d95f02"}
    labels, values = [], []
    for model, t in tables.items():
        tok = t["tokens"]
        for what, sub in (("all", tok), ("audio words", tok[tok.audio_word.astype(bool)] if len(tok) else tok)):
            labels.append(f"{model}\n{what} (n={len(sub)})")
            values.append([shares(sub)[f"{s}_share"] for s in SHIFTS])
    values = np.nan_to_num(np.array(values, dtype=float).reshape(-1, len(SHIFTS)))
    bottom = np.zeros(len(labels))
    for j, s in enumerate(SHIFTS):
        ax.bar(labels, values[:, j], bottom=bottom, color=colors[s], label=s)
        bottom += values[:, j]
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of generated tokens")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title("rank under the base: 1 / 2-3 / >3")
    conditions = sorted({c for t in tables.values() for c in t["tokens"].get("condition", pd.Series()).unique()})
    width = 0.8 / max(1, len(conditions))
    for k, cond in enumerate(conditions):
        kls = [t["tokens"].loc[t["tokens"].condition == cond, "kl"].mean() for t in tables.values()]
        ax_kl.bar(np.arange(len(tables)) + k * width, kls, width=width, label=cond)
    ax_kl.axhline(0.4, color="#555555", ls="--", lw=0.8, label="P1: 0.4")
    ax_kl.set_xticks(np.arange(len(tables)) + width * (len(conditions) - 1) / 2, list(tables), fontsize=8)
    ax_kl.set_ylabel("mean KL(AV || base), nats")
    ax_kl.legend(fontsize=8)
    fig.suptitle("Token-distribution shift against the vision-language base")
    return fig


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
        kl = s.mean_kl
        parts.append(f"{m}: mean KL {pct(kl, '.2f')}")
        calls.append(None if kl is None else "agrees" if kl <= 1.0 else "partly" if kl <= 2.0 else "disagrees")
    divergence = Finding(
        "The AV model's next-token distribution stays close to the base's",
        "KL(AVLLM || base) 0.4 on average over generated tokens",
        "; ".join(parts),
        verdict(calls),
        "KL depends on the vocabulary and how peaked the models are; agrees when it stays below 1 nat.",
    )
    return [inherited, divergence]


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
    default_config=Config(conditions=("factual", "swapped")),
    needs=Needs(base=True, generation=True),
    about=__doc__,
)
