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

Several clips (P3's parallel paths). A multi-clip manifest (a ``clips`` column: ``avlens data multiclip``) is read
into one item per row (:func:`items_from_multiclip`; condition ``multiclip``, question ``which``) whose right answer
is the target clip's number, read as the first answer token. Its batches get the groups of
:func:`multiclip_layout` (``candidate``, ``target``, ``distractor``, ``reference``, ``option``) and the edges of
``Config.multiclip_edges``, which test P3's two paths, candidates + question -> reference -> last and candidates
-> option markers -> last, beside each clip's own map (``clip*`` stands for every clip: ``clip0->last``...).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import InputError
from ..layout import TokenLayout
from ..models.base import Adapter
from ..trace import Knockout, run_conditions
from .base import Analysis, Finding, num, pct, verdict
from .causal_trace import mean_ci
from .common import Item, LabelTokens, Readout, batches, items_from_manifest, relative
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

MULTICLIP = "multiclip"
"""The condition of multi-clip items."""
WHICH = "which"
"""The question kind of multi-clip items (which clip has the sound of X?)."""
EACH_CLIP = "clip*"
"""In a multi-clip edge, every clip of the prompt in turn: ``clip*->last`` is ``clip0->last``, ``clip1->last``..."""

MULTICLIP_EDGES: tuple[str, ...] = (
    "candidate->reference",
    "target->reference",
    "distractor->reference",
    "candidate->option",
    "target->option",
    "reference->last",
    "option->last",
    "question->last",
    "target->last",
    "distractor->last",
    "clip*->question",
    "clip*->last",
)
"""The edges of multi-clip items: P3's two paths hop by hop (the clips to the reference and to the option
markers, those to the last position), the question, the target and the other clips to the last position, and
each clip's own map (its span -> question, -> last). Groups: :func:`multiclip_layout`."""

PATHS: dict[str, tuple[str, str]] = {
    "reference": ("candidate->reference", "reference->last"),
    "option": ("candidate->option", "option->last"),
}
"""P3's two parallel paths with several clips, as their two hops: candidates (+ question) -> reference -> last,
and candidates -> option markers -> last."""

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
        edges: ``source->target[@same|@earlier]`` (see the module docstring), for single-clip items.
        multiclip_edges: the edges for multi-clip items (:data:`MULTICLIP_EDGES`; ``clip*`` is every clip).
        multiclip_prompts: besides the manifest's own items, this many prompts of ``multiclip_clips`` clips built
            with :func:`avlens.data.builders.multiclip` from its factual rows (each clip playing its video's own
            track, as single clips do; seed ``multiclip_seed``); 0: none. A manifest with a ``clips`` column is
            read as multi-clip items whatever this says.
        batch_size: items per forward.
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?", "see": "What do you see?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    window: int | None = None
    edges: tuple[str, ...] = EDGES
    multiclip_edges: tuple[str, ...] = MULTICLIP_EDGES
    multiclip_prompts: int = 0
    multiclip_clips: int = 2
    multiclip_seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        for edge in (*self.edges, *self.multiclip_edges):
            parse_edge(edge)

    def items(self, manifest: str | Path | pd.DataFrame) -> list[Item]:
        """The items of a manifest: a multi-clip one's rows (:func:`items_from_multiclip`), or the questions
        about its clips of the conditions asked and, with ``multiclip_prompts``, that many multi-clip prompts
        built from its factual rows."""
        if _has_clips(manifest):
            return items_from_multiclip(manifest)
        items = items_from_manifest(manifest, self.questions, conditions=self.conditions)
        if self.multiclip_prompts > 0:
            items += multiclip_items_of(manifest, self.multiclip_prompts, self.multiclip_clips, self.multiclip_seed)
        return items


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


# ---------------------------------------------------------------------------------------------------------
# Several clips
# ---------------------------------------------------------------------------------------------------------
def _has_clips(manifest: str | Path | pd.DataFrame) -> bool:
    """Whether a manifest is multi-clip (has a ``clips`` column)."""
    from ..data.manifest import read_manifest

    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest, required=())
    return "clips" in df.columns


def target_index(answer: str, n_clips: int) -> int | None:
    """The 0-based target clip of an answer: its number ("2" -> 1) or option letter ("B" -> 1); None when it
    names no clip of ``n_clips``."""
    a = str(answer).strip().strip("().").strip()
    k = int(a) - 1 if a.isdigit() else ord(a.upper()) - ord("A") if len(a) == 1 and a.isalpha() else -1
    return k if 0 <= k < n_clips else None


def items_from_multiclip(manifest: str | Path | pd.DataFrame, *, limit: int | None = None) -> list[Item]:
    """One item per row of a multi-clip manifest: condition ``multiclip``, question ``which``, scored on the first
    answer token.

    Two kinds of rows: :func:`avlens.data.builders.multiclip`'s (``clips``, ``question``, ``answer`` the target
    clip's number, ``target_label``, optionally ``visual_labels``), whose ``expected`` is that number and whose
    target clip is known; and benchmark rows (:mod:`avlens.data.formats`: AV-Odyssey's ``clips``, a ``question``
    that lists lettered options, ``expect_question`` the right letter), whose ``expected`` is the letter and whose
    target clip is unknown (None: the target, distractor and reference groups are empty, their edges no-ops). The
    sample's ``meta`` holds ``target_label``, ``target_clip`` (0-based or None) and ``visual_labels``. A builder
    row whose answer names no clip, or a row with neither answer, carries the reason as the item's ``problem``.

    Raises:
        InputError: an unreadable manifest, or one without ``clips`` or ``question``.
    """
    from ..data.builders import samples_from_multiclip
    from ..data.manifest import check_columns, read_manifest

    need = ("clips", "question")
    if isinstance(manifest, pd.DataFrame):
        df = manifest
        check_columns(df, need, path=df.attrs.get("path"))
    else:
        df = read_manifest(manifest, required=need)
    out: list[Item] = []
    for row in df.to_dict("records")[:limit]:
        sample = samples_from_multiclip(row)
        sample.id = f"{row['id']}/{WHICH}"
        n = len(sample.clips or [])
        answer, letter = (_text(row.get(k)) for k in ("answer", "expect_question"))
        target = target_index(answer, n) if answer is not None else None
        problem = None
        if answer is not None and target is None:
            problem = f"the answer {answer!r} names none of the {n} clips"
        elif answer is None and letter is None:
            problem = "the row has neither an answer (the target clip's number) nor an expect_question"
        sample.meta = {
            **sample.meta,
            "target_label": _text(row.get("target_label")) if target is not None else None,
            "target_clip": target,
            "visual_labels": list(row.get("visual_labels") or [None] * n),
        }
        out.append(Item(sample.id, sample, MULTICLIP, WHICH, None, None, answer or letter, problem))
    return out


def _text(v: object) -> str | None:
    """A manifest cell as stripped text (None when empty)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    return str(v).strip() or None


def multiclip_items_of(manifest: str | Path | pd.DataFrame, n_prompts: int, n_clips: int, seed: int) -> list[Item]:
    """Items of ``n_prompts`` multi-clip prompts built by :func:`avlens.data.builders.multiclip` from a
    manifest's factual rows (their ``audio`` column dropped, so that each clip plays its video's own track, as a
    single clip does). The prompts are written to a temporary directory and read back; the items hold resolved
    media paths."""
    from ..data.builders import multiclip
    from ..data.manifest import read_manifest

    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest, required=())
    if "condition" in df.columns:
        df = df[df.condition.isin(["factual", "congruent"]) | df.condition.isna()]
    df = df.drop(columns=[c for c in ("audio", "image") if c in df.columns])
    with tempfile.TemporaryDirectory() as tmp:
        built = multiclip(df, tmp, n_clips=n_clips, n_prompts=n_prompts, seed=seed)
        return items_from_multiclip(read_manifest(built.manifest))


LETTERED = re.compile(r"\(\s*([A-Za-z])\s*\)")
"""An option letter the question lists, "(A)" (spaces allowed inside, as word-level tokenizers decode it): the
marker by which it names a choice."""


def _char_spans(adapter: Adapter, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of a run of token ids and each token's [start, end) in it (by decoding the run's growing
    prefixes, so any tokenizer's spacing rules are kept)."""
    spans, end = [], 0
    text = ""
    for i in range(len(ids)):
        text = adapter.tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        spans.append((end, len(text)))
        end = len(text)
    return text, spans


def _tokens_over(spans: list[tuple[int, int]], text: str, lo: int, hi: int) -> list[int]:
    """Indices of the tokens whose non-blank characters overlap text[lo:hi]."""
    out = []
    for i, (s, e) in enumerate(spans):
        s2 = s + (len(text[s:e]) - len(text[s:e].lstrip()))
        if s2 < hi and e > lo and text[s:e].strip():
            out.append(i)
    return out


def clips_of(layout: TokenLayout) -> list[str]:
    """The clip groups of a layout (``clip0``, ``clip1``...), in prompt order."""
    names = [g for g in layout.names if g.startswith("clip") and g[len("clip") :].isdigit()]
    return sorted(names, key=lambda g: int(g[len("clip") :]))


def multiclip_layout(
    adapter: Adapter, layout: TokenLayout, input_ids: torch.Tensor, items: Sequence[Item]
) -> TokenLayout:
    """The layout of a multi-clip batch with the groups of P3's parallel paths.

    - ``candidate``: every clip's media tokens (audio, video, image; not the spans' markers);
    - ``target`` / ``distractor``: the media tokens of the row's target clip / of the other clips (they
      partition ``candidate``; both empty where the target clip is unknown, as on a benchmark's lettered items);
    - ``reference``: the question tokens that name the target: the target label's tokens (case-insensitive, whole
      words, its first mention) in the question text after the last clip;
    - ``option``: the tokens by which the prompt names the choices: the user-turn text right before each clip
      (the adapter's clip label, "Clip 1: "), and any lettered option "(A)" the question lists after the clips.

    ``question`` stays the layout's (all user-turn text outside media, so it holds ``option`` and ``reference``).

    Args:
        layout: the batch's layout (B, L groups), with ``clip0``.. from the adapter.
        input_ids: (B, L) the batch's token ids.
        items: the batch's items, whose ``sample.meta`` holds ``target_label`` and ``target_clip``.
    """
    clips = clips_of(layout)
    media = layout.mask("audio+video+image")
    spans = [layout.groups[c] for c in clips]
    candidate = torch.stack(spans).any(0) & media if spans else torch.zeros_like(media)
    target, reference, option = (torch.zeros_like(media) for _ in range(3))
    question = layout.groups["question"]
    known = torch.zeros(layout.batch_size, dtype=torch.bool)  # rows whose target clip is known
    for b, it in enumerate(items):
        t = it.sample.meta.get("target_clip")
        known[b] = t is not None and t < len(spans)
        if known[b]:
            target[b] = spans[t][b] & media[b]
        ends = [int(s[b].nonzero().max()) for s in spans if s[b].any()]
        starts = [int(s[b].nonzero().min()) for s in spans if s[b].any()]
        prev = -1
        for s0, e0 in zip(starts, ends, strict=True):
            run = question[b].clone()
            run[: prev + 1] = False
            run[s0:] = False
            option[b] |= run  # the text between the previous clip and this one: its label
            prev = e0
        after = (question[b] & (torch.arange(layout.length) > prev)).nonzero().flatten()
        if not len(after):
            continue
        text, cs = _char_spans(adapter, input_ids[b, after].tolist())
        label = it.sample.meta.get("target_label")
        if label:
            m = re.search(rf"(?<![a-z0-9]){re.escape(str(label).lower())}(?![a-z0-9])", text.lower())
            if m:
                reference[b, after[_tokens_over(cs, text, m.start(), m.end())]] = True
        for m in LETTERED.finditer(text):
            option[b, after[_tokens_over(cs, text, m.start(), m.end())]] = True
    out = layout
    for name, mask in (
        ("candidate", candidate),
        ("target", target),
        ("distractor", candidate & ~target & known[:, None]),
        ("reference", reference),
        ("option", option),
    ):
        out = out.with_group(name, mask)
    return out


def expand_edges(edges: Sequence[str], layout: TokenLayout) -> list[str]:
    """The edges with :data:`EACH_CLIP` written out for every clip of the layout."""
    out: list[str] = []
    for edge in edges:
        if EACH_CLIP in edge:
            out += [edge.replace(EACH_CLIP, c) for c in clips_of(layout)]
        else:
            out.append(edge)
    return out


def _condition(edge: str, start: int) -> str:
    return f"{edge}|{start}"


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Probabilities of the answers under every (edge, window) knockout, for a unit of items.

    Table ``flow``, one row per item x edge x window (rows whose edge blocks no pair are kept, with pairs 0):

    - id, clip, condition, question, audio_label, visual_label, expected: the item;
    - edge, source, target, scope (same / earlier / None), window_start, window_end (exclusive), pairs;
    - the knockout table's readout columns (p_audio, p_visual, their _base, delta_*, dp_audio, dp_visual,
      dp_expected, answer, answer_base, correct, correct_base, follows, follows_base);
    - dp_answer: dp of the token the model answers without the knockout (defined for every item);
    - n_clips, target_clip (0-based), target_label: of a multi-clip item (None for a single clip).

    Multi-clip items (condition ``multiclip``) get :func:`multiclip_layout`'s groups and ``config.multiclip_edges``.

    Table ``errors``: items whose inputs could not be built.
    """
    n = adapter.n_layers
    spans = windows(n, window_of(config, n))
    token = LabelTokens(adapter)
    rows: list[dict] = []
    errors: list[dict] = []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        layout = with_other(inputs.layout)
        multi = chunk[0].condition == MULTICLIP  # a batch holds items of one layout and question
        if multi:
            layout = multiclip_layout(adapter, layout, inputs.tensors["input_ids"], chunk)
        edges = expand_edges(config.multiclip_edges, layout) if multi else list(config.edges)
        inputs = replace(inputs, layout=layout)
        conditions: dict[str, list[Knockout]] = {BASELINE: []}
        pairs: dict[str, torch.Tensor] = {}
        for edge in edges:
            for s, e in spans:
                kos = edge_knockouts(edge, layout, range(s, e))
                conditions[_condition(edge, s)] = kos
            pairs[edge] = blocked_pairs(edge_knockouts(edge, layout, [0]), layout)
        traces = run_conditions(adapter, inputs, conditions)
        base_logits = traces[BASELINE].logits.float()
        base = Readout(base_logits, chunk, token)
        answer = base_logits.argmax(-1)
        p_answer_base = torch.softmax(base_logits, -1).gather(1, answer[:, None])[:, 0]
        for edge in edges:
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
                            **_clip_fields(it),
                        )
                    )
    return {"flow": rows, "errors": errors}


def _clip_fields(it: Item) -> dict:
    """A record's multi-clip columns (None for a single-clip item)."""
    clips = it.sample.clips
    meta = it.sample.meta if clips is not None else {}
    return {
        "n_clips": len(clips) if clips is not None else None,
        "target_clip": meta.get("target_clip"),
        "target_label": meta.get("target_label"),
    }


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
    ``question_last_start``. ``n_layers``, ``window``: the sweep; ``n_items``: items.

    Several clips (their edges are under ``edges["which"]["multiclip"]``): ``n_multiclip``, how many were
    asked; ``n_multiclip_correct``, how many the model answered right without knockout (the only ones dp is
    measured on), ``multiclip_accuracy`` their share and ``multiclip_chance`` that of a guess (1 / clips, over
    the prompts whose target clip is known); ``paths``: each of P3's two paths (:data:`PATHS`) -> ``hops`` (edge
    -> its strongest window, as in ``edges``) and ``shows`` (True when every hop lowers the right answer: dp <=
    -:data:`MEANINGFUL_DP` with its 95% interval below 0; None when a hop was not measured)."""

    question_last_dp: float | None = None
    question_last_start: int | None = None
    edges: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    answer_edges: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    n_layers: int | None = None
    window: int | None = None
    n_items: int = 0
    n_multiclip: int = 0
    n_multiclip_correct: int = 0
    multiclip_accuracy: float | None = None
    multiclip_chance: float | None = None
    paths: dict[str, dict] = field(default_factory=dict)


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
        **_multiclip_summary(flow, edges),
    )


def _multiclip_summary(flow: pd.DataFrame, edges: dict) -> dict:
    """The multi-clip fields of :class:`Summary` (counts, accuracy, P3's two paths)."""
    multi = flow[flow.condition == MULTICLIP] if "condition" in flow else flow.iloc[:0]
    if multi.empty:
        return {}
    per_item = multi.drop_duplicates("id")
    right = per_item.correct_base == True  # noqa: E712
    hops = edges.get(WHICH, {}).get(MULTICLIP, {})
    known = per_item[per_item.target_clip.notna()] if "target_clip" in per_item else per_item.iloc[:0]
    clips = pd.to_numeric(known.n_clips, errors="coerce") if len(known) else None  # a guess: 1 / clips
    paths = {}
    for name, path in PATHS.items():
        rs = {e: hops.get(e, {}) for e in path}
        measured = all(r.get("dp") is not None for r in rs.values())
        paths[name] = {"hops": rs, "shows": all(_lowers(r) for r in rs.values()) if measured else None}
    return {
        "n_multiclip": len(per_item),
        "n_multiclip_correct": int(right.sum()),
        "multiclip_accuracy": num(right.mean(), 3),
        "multiclip_chance": num((1 / clips).mean(), 3) if clips is not None and clips.notna().any() else None,
        "paths": paths,
    }


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
    paths: dict = {}
    for model, s in summaries.items():
        for name, path in s.paths.items():
            for edge, r in path["hops"].items():
                paths[(model, name, edge)] = {
                    "dp": r.get("dp"),
                    "95% CI": None if r.get("low") is None else f"{r['low']:.3f} to {r['high']:.3f}",
                    "window start": r.get("start"),
                    "lowers the answer": None if r.get("dp") is None else _lowers(r),
                    "path shows": path["shows"],
                    "n (correct items)": r.get("n", 0),
                    "n (all items)": s.n_multiclip,
                }
    if not paths:
        return [out]
    by_path = object_frame(paths)
    by_path.attrs["caption"] = (
        "Several clips: P3's two parallel paths hop by hop (candidates -> reference -> last, candidates -> option "
        "markers -> last), each hop's strongest window on the items answered with the right clip; a hop lowers "
        "the answer at dp <= -0.05 with its 95% interval below 0, a path shows when both hops do"
    )
    return [out, by_path]


NODES = {
    "system": (0.1, 0.9),
    "audio": (0.1, 0.5),
    "video": (0.1, 0.1),
    "question": (0.5, 0.7),
    "other": (0.5, 0.3),
    "last": (0.92, 0.5),
}
"""Where the graph draws each group."""

MULTICLIP_NODES = {
    "target": (0.1, 0.8),
    "distractor": (0.1, 0.2),
    "reference": (0.5, 0.8),
    "option": (0.5, 0.2),
    "question": (0.5, 0.5),
    "candidate": (0.1, 0.5),
    "last": (0.92, 0.5),
}
"""Where the multi-clip graph draws each group (P3's two paths: top through the reference, bottom through the
option markers)."""


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
        n_layers = int(flow.window_end.max()) if not flow.empty else 0
        conds = set(prof.index.get_level_values("condition")) if len(prof) else set()
        graphs += [(model, prof, n_layers, "factual", NODES)] if conds - {MULTICLIP} or not conds else []
        graphs += [(model, prof, n_layers, MULTICLIP, MULTICLIP_NODES)] if MULTICLIP in conds else []
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
    for r, (model, prof, n_layers, cond, nodes) in enumerate(graphs):
        bands = _bands(n_layers) if n_layers else []
        for c in range(3):
            ax = rows[r, c]
            ax.set_axis_off()
            if c >= len(bands) or not len(prof):
                continue
            name, lo, hi = bands[c]
            _graph(ax, prof, lo, hi, cond, nodes)
            what = "factual" if cond == "factual" else "multi-clip"
            ax.set_title(f"{model}: {name} windows (start {lo}-{hi - 1}), {what}", fontsize=9)
    fig.suptitle("Information flow: attention knockout of each edge in sliding windows")
    return fig


def _graph(
    ax: Axes,
    prof: pd.Series,
    lo: int,
    hi: int,
    condition: str = "factual",
    nodes: dict[str, tuple[float, float]] = NODES,
) -> None:
    """Nodes and arrows for the plain edges of one clip condition; width and label = mean |dp| over the band's
    windows and kinds."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    factual = prof[prof.index.get_level_values("condition") == condition]
    for node, (x, y) in nodes.items():
        ax.annotate(node, (x, y), ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": "#eeeeee"})
    for edge in sorted(set(factual.index.get_level_values("edge"))):
        source, target, scope = parse_edge(edge)
        if scope is not None or source not in nodes or target not in nodes or source == target:
            continue
        e = factual[factual.index.get_level_values("edge") == edge]
        starts = e.index.get_level_values("window_start")
        band = np.abs(e[(starts >= lo) & (starts < hi)].to_numpy(dtype=float))
        value = float(np.nanmean(band)) if np.isfinite(band).any() else float("nan")
        if value != value:
            continue
        (x0, y0), (x1, y1) = nodes[source], nodes[target]
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
        for kind in sorted(k for k in s.edges if k != WHICH):
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
        for kind in sorted(k for k in s.edges if k != WHICH):
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
    return [order, mixing, _paths_finding(summaries)]


def _paths_finding(summaries: dict[str, Summary]) -> Finding:
    """P3's two parallel paths with several clips, hop by hop, with how often the model picked the right clip."""
    parts, calls = [], []
    for m, s in summaries.items():
        if not s.n_multiclip:
            continue
        by = _peak_all(s)
        hops = "; ".join(
            f"{name} path: " + ", ".join(f"{e} {_fmt(r)}" for e, r in p["hops"].items()) for name, p in s.paths.items()
        )
        extra = ", ".join(f"{e} {_fmt(by.get(e, {}))}" for e in ("question->last", "target->last", "distractor->last"))
        parts.append(
            f"{m}: right clip {s.n_multiclip_correct} of {s.n_multiclip} ({pct(s.multiclip_accuracy)}; a guess: "
            f"{pct(s.multiclip_chance)}); {hops}; {extra}"
        )
        shown = [p["shows"] for p in s.paths.values()]
        if s.n_multiclip_correct == 0 or all(x is None for x in shown):
            calls.append(None)
        else:
            calls.append("agrees" if all(shown) else "partly" if any(shown) else "disagrees")
    return Finding(
        "With several clips, two parallel paths: candidates + question -> reference -> last, and candidates -> "
        "option markers -> last",
        "P3: with interleaved clips, blocking either path's hops lowers the answer",
        "; ".join(parts) or "not measured",
        verdict(calls),
        "On multi-clip prompts (which clip has the sound of X?), items answered with the right clip only. A path "
        "shows when both its hops lower the right answer (dp <= -0.05, 95% interval below 0) in their strongest "
        "windows; agrees when both paths show, partly when one does. The reference is the target label's tokens "
        'in the question, the option markers the clip labels ("Clip 1: ") before each clip: a marker precedes '
        "its own clip, so candidate->option reaches only later markers from earlier clips. dp is shown as mean "
        "[interval] @ the window's first layer.",
    )


def _peak_all(s: Summary) -> dict[str, dict]:
    """The multi-clip edges' strongest windows (right answer, correct items)."""
    return s.edges.get(WHICH, {}).get(MULTICLIP, {})


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
