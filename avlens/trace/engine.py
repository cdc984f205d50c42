"""The intervention engine: forwards and generation with interventions given as data.

How it runs a forward. The adapter runs the model's own forward up to the text decoder (encoders, feature
merging, multimodal position ids) and hands over what the decoder would receive. The engine then calls the
model's decoder layers itself, one by one, through the adapter's decoder contract
(:class:`avlens.models.decoder.DecoderContract`: the layer call, rotary embedding, position-id layout, next
decoding position, final norm, the modules at each site, each layer's attention window), with transformers'
DynamicCache. Attention goes through avlens's registered attention function, which hands it to the run in
progress (masks from absolute positions and windows, blocked edges, biased logits, attention-mass records).
States at the residual are read and written between layers; at the sites inside a layer (attention input and
output, MLP output) by forward hooks on the adapter's modules, present only during the run. The text
decoder's attention implementation is switched to avlens's only inside a run and restored after it.

Plan and strategies. Each intervention lowers itself into a few primitive per-layer operations
(:mod:`avlens.trace.ops`: blocked edges, biased logits, a state written at a site, dropped positions, records);
:func:`avlens.trace.plan.compile_plan` files them by kind and layer into an immutable :class:`Plan` per forward.
The engine only executes plans, in one of these strategies, each a way of choosing the positions a pass over
the layers computes (a :class:`_Pass`) and what it starts from:

- **full**: every position from the input embeddings (a plain ``run``, the baseline of ``run_conditions``);
- **shared prefix**: an intervention that first acts at layer l on positions >= p leaves every layer < l and
  every position < p as in the baseline, so a condition runs positions >= p through layers >= l from the
  baseline's residual, attending to the baseline's keys/values of positions < p (shared by all conditions, not
  copied; that attention is an explicit softmax whatever ``attn`` says). Conditions with the same p (and the
  same l, unless few positions are recomputed) run as one batch. A knockout from the last position costs about
  one decoding step;
- **folded slots**: conditions whose plans act only through attention on the last few positions (at most 16)
  ride along in the baseline's own pass: their positions are appended to the baseline's sequence as extra
  query positions ("slots"), one copy per condition, each attending to the baseline's keys/values before its
  first position and to its own slots; so each layer's weights are read once for all of them;
- **keys-only last layer**: when only the last position's logits are asked for and nothing is recorded from
  the last layer, that layer runs the other positions only as far as their keys/values (the attention function
  stops the layer there) and the rest of it on the last position alone;
- **decoding**: one generated token per row and step, attending to the prompt's and earlier steps' keys.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache

from ..layout import TokenLayout
from ..models.base import Adapter, Embedded, Inputs
from .attention import ACTIVE, BACKENDS, NAME, probabilities, register
from .interventions import AnyCapture, AttentionCapture, Intervention, ReceivedCapture
from .ops import BiasLogits, BlockEdges
from .plan import Plan, compile_plan

LogitsAt = Literal["last", "all"]
_FEW_POSITIONS = 16


@dataclass
class Trace:
    """The result of one condition on a batch.

    Attributes:
        logits: (B, V) at the last prompt position, or (B, L, V) with ``logits="all"``.
        captures: capture name -> layer -> result: a residual capture (B, L, D), or (B, D) with
            ``reduce="mean"``; an attention capture (B, H, K).
        layout: the batch's token layout (extended with ``generated`` after generation).
        tokens: (B, T) generated ids (generation only; padded with -1 after a row stops).
        text: decoded answers (generation only).
        step_logits: (B, T, V) logits that produced each generated token (generation only; NaN after a row
            stopped).
        cache_entries: (B, n_layers) long, the key/value entries of valid positions each row's attention holds
            per layer when the run ends (prompt and generated positions; a discarded group's are gone from its
            layer on). None for conditions run on part of the layers (``run_conditions``).
        seconds: wall times of a generation (``generate`` only): "prefill" (the encoders, the embedding and the
            prompt's forward), "decode" (every decoding step after it) and "steps" (how many steps that was: one
            fewer than the longest row's tokens, since the first token comes from the prefill).
    """

    logits: torch.Tensor
    captures: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    layout: TokenLayout | None = None
    tokens: torch.Tensor | None = None
    text: list[str] | None = None
    step_logits: torch.Tensor | None = None
    cache_entries: torch.Tensor | None = None
    seconds: dict[str, float] | None = None


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def run(
    adapter: Adapter,
    inputs: Inputs,
    interventions: Sequence[Intervention] = (),
    *,
    capture: Sequence[AnyCapture] = (),
    logits: LogitsAt = "last",
    attn: str = "sdpa",
) -> Trace:
    """One forward over the batch with the interventions applied from the first layer and position.

    Args:
        adapter: the model.
        inputs: a batch from ``adapter.prepare`` (or ``adapter.inputs_from_ids``).
        interventions: Knockout, Steer, Patch, Ablate, Discard objects (any :class:`Intervention`).
        capture: what to record (``Capture.residual(...)``, ``Capture.attention(...)``).
        logits: "last" for (B, V) at the last prompt position, "all" for (B, L, V).
        attn: "sdpa" (default) or "eager" (explicit softmax).
    """
    with _avlens_attention(adapter):
        emb = adapter.embed(inputs)
        rows = torch.arange(inputs.batch_size)
        fwd = _Forward(adapter, emb, inputs.layout, rows, [list(interventions)] * len(rows), capture, attn, logits)
        fwd.prefill(0, 0, None)
        return fwd.trace(slice(None))


@torch.no_grad()
def run_conditions(
    adapter: Adapter,
    inputs: Inputs,
    conditions: Mapping[str, Sequence[Intervention]],
    *,
    capture: Sequence[AnyCapture] = (),
    logits: LogitsAt = "last",
    attn: str = "sdpa",
    incremental: bool = True,
    max_rows: int = 64,
) -> dict[str, Trace]:
    """Run several conditions on the same batch, sharing the baseline's work.

    Args:
        conditions: name -> interventions (an empty list is the baseline).
        incremental: reuse the baseline below each condition's first acting layer/position (default), and fold
            attention-only conditions on the last few positions into the baseline's pass; False recomputes
            every condition from scratch (the reference the incremental path is tested against).
        max_rows: most rows (samples x conditions) run as one batch.

    Returns:
        name -> Trace, in the order given.
    """
    with _avlens_attention(adapter):
        return _run_conditions(adapter, inputs, conditions, capture, logits, attn, incremental, max_rows)


def _run_conditions(
    adapter: Adapter,
    inputs: Inputs,
    conditions: Mapping[str, Sequence[Intervention]],
    capture: Sequence[AnyCapture],
    logits: LogitsAt,
    attn: str,
    incremental: bool,
    max_rows: int,
) -> dict[str, Trace]:
    _refuse_received(capture, "run_conditions re-runs only part of each sequence")
    emb = adapter.embed(inputs)
    layout, n, b = inputs.layout, adapter.n_layers, inputs.batch_size
    starts = {name: start_of(ivs, layout, n) for name, ivs in conditions.items()}
    acting = {name: s for name, s in starts.items() if s is not None}
    per_batch = max(1, max_rows // b)
    length = inputs.length
    base = _Forward(adapter, emb, layout, torch.arange(b), [[]] * b, capture, attn, logits)
    if incremental and base.last_only:
        # The baseline keeps the last layer's output of the last position only; past the last layer, nothing
        # but that position's logits can change.
        acting = {k: (layer, max(pos, length - 1) if layer == n else pos) for k, (layer, pos) in acting.items()}
    # Conditions that only change the attention of the last few positions ride along in the baseline's own
    # pass, as extra query positions (each layer's weights are then read once for all of them).
    folded: list[str] = []
    if incremental and not capture and logits == "last":
        near = [k for k in acting if length - acting[k][1] <= _FEW_POSITIONS]
        folded = [k for k in near if _plan(adapter, emb, layout, b, conditions[k]).attention_only][:per_batch]
    if folded:
        ivs = [list(conditions[name]) for name in folded for _ in range(b)]
        base.fold = _Forward(adapter, emb, layout, torch.arange(b).repeat(len(folded)), ivs, (), attn, logits)
        base.fold.start_fold(min(acting[name][1] for name in folded), b)
    acting = {name: s for name, s in acting.items() if name not in folded}
    base.keep_inputs = {s[0] for s in acting.values()} if incremental else set()
    base.prefill(0, 0, None)
    out = {name: base.trace(slice(None)) for name, s in starts.items() if s is None}
    for j, name in enumerate(folded):
        out[name] = base.fold.trace(slice(j * b, (j + 1) * b))
    order = sorted(acting, key=lambda k: (acting[k][1], acting[k][0])) if incremental else list(acting)

    def batch_key(name: str) -> tuple[int, int]:
        # Same first position; the same first layer too unless only a few positions are recomputed (then
        # running a few extra layers costs less than another batch).
        layer, pos = acting[name]
        return (pos, layer if length - pos > _FEW_POSITIONS else -1) if incremental else (0, 0)

    groups: list[list[str]] = []
    for name in order:
        same = groups and batch_key(groups[-1][0]) == batch_key(name)
        if same and len(groups[-1]) < per_batch:
            groups[-1].append(name)
        else:
            groups.append([name])
    for names in groups:
        rows = torch.arange(b).repeat(len(names))
        ivs = [list(conditions[name]) for name in names for _ in range(b)]
        fwd = _Forward(adapter, emb, layout, rows, ivs, capture, attn, logits)
        if incremental:
            fwd.prefill(min(acting[k][0] for k in names), acting[names[0]][1], base)
        else:
            fwd.prefill(0, 0, None)
        for j, name in enumerate(names):
            out[name] = fwd.trace(slice(j * b, (j + 1) * b))
    return {name: out[name] for name in conditions}


def _refuse_received(capture: Sequence[AnyCapture], why: str) -> None:
    if any(isinstance(c, ReceivedCapture) for c in capture):
        raise ValueError(f"Capture.received works with run() only: {why}")


@torch.no_grad()
def generate(
    adapter: Adapter,
    inputs: Inputs,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    capture: Sequence[AnyCapture] = (),
    attn: str = "sdpa",
) -> Trace:
    """Greedy generation with the interventions applied in the prefill and at every decoding step.

    The new tokens form the ``generated`` group of the layout; a knockout or steer whose query group includes
    it acts on them. Rows stop at the model's end-of-turn tokens; a stopped row's tokens are -1 and its step
    logits NaN from then on. As in transformers, ``min_new_tokens`` keeps the end-of-turn tokens from being
    chosen before that many tokens (a fixed amount of decoding, e.g. to time it); their step logits are the
    model's own.
    """
    _refuse_received(capture, "generate() would count decoding queries of stopped rows")
    with _avlens_attention(adapter):
        start = time.perf_counter()
        emb = adapter.embed(inputs)
        layout = inputs.layout.extend(max_new_tokens)
        b = inputs.batch_size
        fwd = _Forward(adapter, emb, layout, torch.arange(b), [list(interventions)] * b, capture, attn, "last")
        fwd.prefill(0, 0, None)
        prefilled = time.perf_counter()
        tokens, step_logits = _greedy(
            adapter, fwd.last_logits, lambda t, nxt: fwd.step(nxt), max_new_tokens, min_new_tokens
        )
        end = time.perf_counter()
        trace = fwd.trace(slice(None))
    trace.seconds = {"prefill": prefilled - start, "decode": end - prefilled, "steps": len(step_logits) - 1}
    return _generated(adapter, trace, tokens, step_logits)


class Schedule(Protocol):
    """The guidance weight of each decoding step of :func:`generate_guided`, from the plain branch's attention.

    ``captures`` are attention captures run on the plain branch; ``weight`` gets, at step t, capture name ->
    layer -> the attention mass (R, H, G) of the query producing step t's token toward each key group, and the
    previous step's weights (R,) (zeros at t = 0), and returns the weights (R,).
    """

    def captures(self) -> Sequence[AttentionCapture]: ...

    def weight(
        self, step: int, mass: Mapping[str, Mapping[int, torch.Tensor]], previous: torch.Tensor
    ) -> torch.Tensor: ...


@torch.no_grad()
def generate_guided(
    adapter: Adapter,
    inputs: Inputs,
    guided: Sequence[Intervention],
    *,
    weight: float | Schedule = 0.5,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 32,
) -> Trace:
    """Greedy guided decoding (P2's adaptive form): two branches share the tokens, the plain one (with
    ``interventions``) and the guided one (with ``interventions`` + ``guided``), each with its own cache; each step
    picks the argmax of log p_plain + s_t (log p_guided - log p_plain).

    Args:
        guided: what defines the guided branch (e.g. a knockout of the answer's attention to some tokens).
        weight: a fixed s_t for every step (0: plain decoding, token for token), or a :class:`Schedule`.

    Returns:
        the Trace of the plain branch, with ``tokens``, ``text`` and ``step_logits`` of the combined
        distribution (log-probabilities), and ``weights`` (B, T) in ``captures["guidance"][0]``.
    """
    schedule = None if isinstance(weight, int | float) else weight
    with _avlens_attention(adapter):
        emb = adapter.embed(inputs)
        layout = inputs.layout.extend(max_new_tokens)
        b = inputs.batch_size
        rows = torch.arange(b)
        caps = tuple(schedule.captures()) if schedule is not None else ()
        plain = _Forward(adapter, emb, layout, rows, [list(interventions)] * b, caps, "sdpa", "last")
        guide = _Forward(adapter, emb, layout, rows, [[*interventions, *guided]] * b, (), "sdpa", "last")
        plain.prefill(0, 0, None)
        # The guided branch differs from the plain one only from its first acting position on: below it, it
        # reads the plain branch's keys and values (the shared-prefix strategy of run_conditions).
        start = start_of(guided, layout, adapter.n_layers)
        first = inputs.length - 1 if start is None else min(start[1], inputs.length - 1)
        guide.prefill(0, first, plain if first > 0 else None)
        weights: list[torch.Tensor] = []

        def combined() -> torch.Tensor:
            lp, lg = plain.last_logits.log_softmax(-1), guide.last_logits.log_softmax(-1)
            previous = weights[-1] if weights else torch.zeros(b, device=lp.device)
            if schedule is None:
                s = torch.full((b,), float(weight), device=lp.device)
            else:
                at = plain.length - 1  # the query that produced these logits
                mass = {c.name: {i: m[:, :, at] for i, m in plain.mass.get(c.name, {}).items()} for c in caps}
                s = schedule.weight(len(weights), mass, previous).to(lp.device)
            weights.append(s)
            return lp + s[:, None] * (lg - lp)

        def step(t: int, nxt: torch.Tensor) -> torch.Tensor:
            plain.step(nxt)
            guide.step(nxt)
            return combined()

        tokens, step_logits = _greedy(adapter, combined(), step, max_new_tokens)
        trace = plain.trace(slice(None))
    trace = _generated(adapter, trace, tokens, step_logits)
    trace.captures["guidance"] = {0: torch.stack(weights[: tokens.shape[1]], 1).cpu()}
    return trace


def _greedy(
    adapter: Adapter,
    logits: torch.Tensor,
    step: Callable[[int, torch.Tensor], torch.Tensor],
    max_new_tokens: int,
    min_new_tokens: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The greedy loop: logits (B, V) of the first step, ``step(t, tokens (B,))`` -> the next step's logits;
    end-of-turn tokens are not chosen before ``min_new_tokens``. Returns tokens (B, T) (-1 after a row stopped)
    and each step's logits (NaN after a row stopped)."""
    b = logits.shape[0]
    eos = torch.tensor(adapter.eos_ids, device=logits.device)
    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long)
    step_logits = []
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    for t in range(max_new_tokens):
        step_logits.append(torch.where(done[:, None], float("nan"), logits))
        nxt = logits.index_fill(-1, eos, float("-inf")).argmax(-1) if t < min_new_tokens else logits.argmax(-1)
        tokens[:, t] = torch.where(done, -1, nxt).cpu()
        done |= torch.isin(nxt, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        logits = step(t, nxt)
    return tokens, step_logits


def _generated(adapter: Adapter, trace: Trace, tokens: torch.Tensor, step_logits: list[torch.Tensor]) -> Trace:
    """A generation's Trace: its first step's logits, the tokens and step logits up to the longest row, texts."""
    n_gen = int((tokens >= 0).any(0).sum())
    eos_ids = adapter.eos_ids
    trace.logits = step_logits[0]
    trace.tokens = tokens[:, :n_gen]
    trace.step_logits = torch.stack(step_logits[:n_gen], 1)
    trace.text = [adapter.decode([i for i in row.tolist() if i >= 0 and i not in eos_ids]) for row in trace.tokens]
    return trace


def start_of(interventions: Sequence[Intervention], layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
    """(first layer, first position) at which any of the interventions can change something, or None.

    Raises:
        UnknownGroupError: a group the layout lacks. ValueError: a layer out of range.
    """
    starts = [s for s in (iv.start(layout, n_layers) for iv in interventions) if s is not None]
    if not starts:
        return None
    return min(s[0] for s in starts), min(s[1] for s in starts)


@torch.no_grad()
def unchanged_inputs(adapter: Adapter, a: Inputs, b: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Where batches ``a`` and ``b`` feed the decoder identically, for a causal trace to leave out no-op patches.

    Returns:
        first_layer: (B, L) bool, the positions whose input to the first layer (embedding, position ids,
            padding) is equal bit for bit. Patching one run's residual or attention input at layer 0 into the
            other there writes the value already there.
        prefix: (B,) long in 0..L, how many leading positions are equal in every layer of both runs (their
            first-layer inputs and any per-layer additions equal, and causality does the rest; L when the two
            batches are the same throughout). Patching at any layer there changes nothing, and the engine's
            shared prefix then reaches the first position that differs.

    Raises:
        ValueError: the batches differ in size or length.
    """
    if (a.batch_size, a.length) != (b.batch_size, b.length):
        raise ValueError(f"batches of {a.batch_size}x{a.length} and {b.batch_size}x{b.length} tokens")
    ea, eb = adapter.embed(a), adapter.embed(b)
    first = (
        (ea.embeds == eb.embeds).all(-1)
        & (ea.position_ids == eb.position_ids).all(0)
        & (ea.attention_mask == eb.attention_mask)
    ).cpu()
    every = first.clone()
    for layer in ea.additions.keys() | eb.additions.keys():
        if layer not in ea.additions or layer not in eb.additions:
            every[:] = False
            break
        every &= (ea.additions[layer] == eb.additions[layer]).all(-1).cpu()
    differs = ~every
    return first, torch.where(differs.any(1), differs.int().argmax(1), a.length)


def unchanged_prefix(adapter: Adapter, a: Inputs, b: Inputs) -> torch.Tensor:
    """How many leading positions of each sample are equal in every layer of both runs: (B,) long in 0..L.
    The second half of :func:`unchanged_inputs`."""
    return unchanged_inputs(adapter, a, b)[1]


@contextlib.contextmanager
def _avlens_attention(adapter: Adapter) -> Iterator[None]:
    """The text decoder's attention through avlens's function for the duration of a run, then as it was."""
    register()
    with adapter.text_attention_during(NAME):
        yield


def _plan(adapter: Adapter, emb: Embedded, layout: TokenLayout, b: int, ivs: Sequence[Intervention]) -> Plan:
    """The plan of one condition over the batch's rows (to ask what kind of operations it has)."""
    return compile_plan(
        [list(ivs)] * b,
        (),
        layout,
        torch.arange(b),
        batch_size=b,
        prompt_length=emb.embeds.shape[1],
        n_layers=adapter.n_layers,
        n_heads=adapter.n_heads,
        hidden=adapter.hidden_size,
    )


# ---------------------------------------------------------------------------------------------------------
# One pass over the layers
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pass:
    """The positions one pass over the decoder layers computes, and what follows from how they were chosen.

    Attributes:
        q_pos: (R, Q) absolute positions of the hidden rows (-1: a padding slot, after a discard).
        text_pos: (R, Q) text position ids, or None (families without them).
        rope_pos: (3, R, Q) rotary position ids.
        causal: positions 0..L-1 of an unpadded batch, nothing before them: sdpa's own causal path (no mask) is
            bit-identical to the model's forward.
        dense: the hidden rows are exactly positions 0..L-1 of the layout (records keep the tensor itself).
        prompt: a prompt pass (False: a decoding step; Qwen3's deepstack additions act on prompt positions).
        keys_only: stop each layer as soon as its keys/values are cached.
    """

    q_pos: torch.Tensor
    text_pos: torch.Tensor | None
    rope_pos: torch.Tensor
    causal: bool = False
    dense: bool = False
    prompt: bool = True
    keys_only: bool = False

    def split(self, head: int) -> tuple[_Pass, _Pass]:
        """The first ``head`` positions as a keys-only pass, and the rest."""

        def part(sl: slice, **kw: bool) -> _Pass:
            text = None if self.text_pos is None else self.text_pos[:, sl]
            return replace(self, q_pos=self.q_pos[:, sl], text_pos=text, rope_pos=self.rope_pos[..., sl], **kw)

        return part(slice(None, head), keys_only=True, dense=False), part(slice(head, None), causal=False, dense=False)

    def reorder(self, order: torch.Tensor, valid: torch.Tensor) -> _Pass:
        """The positions in ``order`` (R, Q'), with padding slots where ``valid`` (R, Q') is False."""
        text = None if self.text_pos is None else self.text_pos.gather(1, order)
        rope = self.rope_pos.gather(2, order[None].expand(self.rope_pos.shape[0], -1, -1))
        q_pos = torch.where(valid, self.q_pos.gather(1, order), -1)
        return replace(self, q_pos=q_pos, text_pos=text, rope_pos=rope, causal=False, dense=False)


class _KeysStored(Exception):
    """Raised by the attention function to stop a decoder layer once its keys/values are cached."""


def _gather(mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """mask (R, L, ...) at positions pos (R, N) (-1 = padding slot) -> (R, N, ...), False/0 at padding."""
    idx = pos.clamp(min=0)
    if mask.dim() == 2:
        return mask.gather(1, idx) & (pos >= 0) if mask.dtype == torch.bool else mask.gather(1, idx) * (pos >= 0)
    out = mask.gather(1, idx[..., None].expand(-1, -1, mask.shape[-1]))
    return out * (pos >= 0)[..., None]


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of a few queries (R, H, Q, d) over key/value (R, H_kv, K, d) with torch's sdpa, the query
    heads sharing a key/value head read it once (no repeated keys); mask (R, 1 or H, Q, K), bool or additive
    -> (R, Q, H, d)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2)


class _Forward:
    """One forward (and its decoding steps) over R rows, each row a (sample, condition), executing a plan."""

    def __init__(
        self,
        adapter: Adapter,
        emb: Embedded,
        layout: TokenLayout,
        rows: torch.Tensor,
        interventions: list[list[Intervention]],
        capture: Sequence[AnyCapture],
        attn: str,
        logits: LogitsAt,
    ) -> None:
        if attn not in BACKENDS:
            raise ValueError(f"attn must be one of {list(BACKENDS)}, not {attn!r}")
        self.adapter, self.emb, self.rows = adapter, emb, rows
        self.device = emb.embeds.device
        self.layout = layout.select(rows)
        self.valid = self.layout.valid.to(self.device)
        self.n = adapter.n_layers
        self.backend = BACKENDS[attn]
        self.logits_at = logits
        self.capture = list(capture)
        self.plan = compile_plan(
            interventions,
            self.capture,
            self.layout,
            rows,
            batch_size=emb.embeds.shape[0],
            prompt_length=emb.embeds.shape[1],
            n_layers=self.n,
            n_heads=adapter.n_heads,
            hidden=adapter.hidden_size,
            device=self.device,
        )
        self.windows = adapter.attention_windows
        # Results.
        self.states: dict[tuple[int, str], torch.Tensor] = {}
        self.mass: dict[str, dict[int, torch.Tensor]] = {}
        self.logits: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        # The baseline keeps its residual at the layers where conditions start: layer -> (hidden, first pos).
        self.keep_inputs: set[int] = set()
        self.inputs_kept: dict[int, tuple[torch.Tensor, int]] = {}
        # Conditions folded into this run's pass (see start_fold), or None.
        self.fold: _Forward | None = None
        # Layer -> (R, K) the absolute position of each key its attention holds (-1: a padding slot).
        self.k_pos: dict[int, torch.Tensor] = {}
        # Nothing asks for the last layer's output at any but the last position: that layer then runs the
        # other positions only as far as their keys/values (which later queries attend to).
        last, states = self.n - 1, self.plan.sites("states")
        self.last_only = (
            logits == "last"
            and not states & {(self.n, "residual"), (last, "attn_out"), (last, "mlp_out")}
            and last not in self.plan.layers("attention")
            and last not in self.plan.layers("received")
        )

    # -- strategies: where a pass starts ------------------------------------------------------------------------
    def prefill(self, start_layer: int, start_pos: int, base: _Forward | None) -> None:
        """Run positions >= start_pos through layers >= start_layer: the full strategy from the embeddings, or
        the shared-prefix strategy from ``base`` (its residual at start_layer, its keys/values before
        start_pos)."""
        emb, r, dev = self.emb, len(self.rows), self.device
        length = emb.embeds.shape[1]
        q_pos = torch.arange(start_pos, length, device=dev).expand(r, -1)
        if start_layer == 0:
            hidden = emb.embeds[self.rows, start_pos:]
        else:
            kept, first = base.inputs_kept[start_layer]
            hidden = kept[self.rows, start_pos - first :]
        text_pos, rope_pos = self.adapter.split_positions(emb.position_ids[:, self.rows, start_pos:])
        plain = start_pos == 0 and bool(self.valid[:, :length].all())
        self.now = _Pass(q_pos, text_pos, rope_pos, causal=plain, dense=start_pos == 0 and length == self.layout.length)
        self.cache = DynamicCache()
        self.k_pos: dict[int, torch.Tensor] = {}
        # The baseline's keys/values of positions < start_pos, per sample (each layer's attention puts them
        # before its rows' own keys).
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if start_pos > 0:
            positions = torch.arange(start_pos, device=dev).expand(r, -1)
            for i in range(start_layer, self.n):
                layer = base.cache.layers[i]
                self.prefix[i] = (layer.keys[:, :, :start_pos], layer.values[:, :, :start_pos])
                self.k_pos[i] = positions
        if base is not None:
            self._inherit(base)
        self.length = length
        if self.fold is not None:
            hidden = self._with_fold_slots(hidden)
        hidden = self._layers(hidden, start_layer)
        self._finish(hidden)

    def start_fold(self, start_pos: int, samples: int) -> None:
        """The folded-slots strategy: make this run (rows = conditions x ``samples``, condition-major) ride along
        in its parent's forward: positions >= start_pos of every row become extra query positions ("slots") of
        the parent's sequences, from the first layer on, attending to the parent's keys/values of positions <
        start_pos and to their own row's slots. Its plan must act through attention only."""
        assert self.plan.attention_only
        r, length, dev = len(self.rows), self.emb.embeds.shape[1], self.device
        q_pos = torch.arange(start_pos, length, device=dev).expand(r, -1)
        self.now = _Pass(q_pos, *self.adapter.split_positions(self.emb.position_ids[:, self.rows, start_pos:]))
        self.length = length
        # The parent's keys are its own positions 0..L-1, then the slots, slot j = (condition c, position t).
        c, t = r // samples, length - start_pos
        slot_pos = torch.arange(start_pos, length, device=dev).repeat(c)  # (C*T,)
        slot_cond = torch.arange(c, device=dev).repeat_interleave(t)
        key_pos = torch.cat([torch.arange(length, device=dev), slot_pos])  # (K,)
        key_cond = torch.cat([torch.full((length,), -1, device=dev), slot_cond])
        prefix = (key_cond < 0) & (key_pos < start_pos)
        same = key_cond[None] == slot_cond[:, None]
        seen = (prefix[None, None] & self.valid[:samples, key_pos][:, None]) | (
            same & (key_pos[None] <= slot_pos[:, None])
        )[None]  # (S, C*T, K)
        row = slot_cond[None] * samples + torch.arange(samples, device=dev)[:, None]  # (S, C*T): each slot's row
        self._fold_geometry = (row, slot_pos, key_pos, seen, same & (key_pos[None] == slot_pos[:, None]))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoding strategy, one step: tokens (R,) -> next-token logits (R, V)."""
        ad = self.adapter
        pos_abs = self.length
        self.length += 1
        prompt = self.emb.embeds.shape[1]
        ids = ad.next_positions(self.emb.position_ids[:, self.rows], pos_abs - prompt)
        text_pos, rope_pos = ad.split_positions(ids)
        self.now = _Pass(torch.full((len(self.rows), 1), pos_abs, device=self.device), text_pos, rope_pos, prompt=False)
        hidden = ad.embed_tokens(tokens[:, None].to(ad.device))
        hidden = self._layers(hidden, 0)
        self._finish(hidden, decoding=True)
        return self.last_logits

    # -- the folded slots ------------------------------------------------------------------------------------
    def slot_mask(self, layer: int) -> torch.Tensor:
        """Mask (S, 1 or H, C*T, K) of this folded run's slots over its parent's keys at one layer: a slot sees
        the keys before the first folded position and its own row's slots, as its plan allows (bool, or
        additive float with biased logits)."""
        row, slot_pos, key_pos, seen, diag = self._fold_geometry
        window = self.windows[layer]
        if window is not None:
            seen = seen & (key_pos[None] > slot_pos[:, None] - window)[None]

        def edges(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (R, L) masks -> (S, C*T, K) edges
            return q[row, slot_pos[None]][..., None] & k[row[..., None], key_pos[None, None]]

        return self._intervened(layer, seen, diag, edges)

    @property
    def _slots(self) -> int:
        """Slots the folded run adds to each of this run's sequences (conditions x positions)."""
        return 0 if self.fold is None else self.fold.now.q_pos.numel() // len(self.rows)

    def _to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """A folded run's per-row tensor (C*S, T, ...) -> the parent's slots (S, C*T, ...)."""
        s = len(self.rows)
        c, t = x.shape[0] // s, x.shape[1]
        return x.reshape(c, s, t, *x.shape[2:]).transpose(0, 1).reshape(s, c * t, *x.shape[2:])

    def _from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """The parent's slots (S, C*T, ...) -> the folded run's rows (C*S, T, ...)."""
        s, t = len(self.rows), self.fold.now.q_pos.shape[1]
        c = len(self.fold.rows) // s
        return x.reshape(s, c, t, *x.shape[2:]).transpose(0, 1).reshape(c * s, t, *x.shape[2:])

    def _with_fold_slots(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (S, L, D) with the folded run's slots appended (copies of the inputs at its positions), and
        the same for the position ids."""
        pos = self._to_slots(self.fold.now.q_pos)[0]  # (C*T,): the same positions for every sample
        text, rope = self.adapter.split_positions(self.emb.position_ids[:, self.rows][..., pos])
        now = self.now
        self.now = replace(
            now,
            text_pos=None if now.text_pos is None else torch.cat([now.text_pos, text], 1),
            rope_pos=torch.cat([now.rope_pos, rope], -1),
        )
        return torch.cat([hidden, self.emb.embeds[self.rows][:, pos]], 1)

    # -- running the layers ------------------------------------------------------------------------------------
    def _layers(self, hidden: torch.Tensor, start_layer: int) -> torch.Tensor:
        ad = self.adapter
        cos_sin = ad.rotary(hidden, self.now.rope_pos)
        token = ACTIVE.set(self)
        try:
            with self._site_hooks(start_layer):
                for i in range(start_layer, self.n):
                    hidden, cos_sin = self._between(i, hidden, cos_sin)
                    own = hidden.shape[1] - self._slots
                    if i == self.n - 1 and self.last_only and own > 1:
                        hidden, cos_sin = self._store_keys(i, hidden, cos_sin, own - 1)
                    hidden = self._call_layer(i, hidden, cos_sin)
                    if i in self.emb.additions and self.now.prompt:  # (deepstack: prompt positions only)
                        pos = self.now.q_pos
                        if self.fold is not None:
                            pos = torch.cat([pos, self._to_slots(self.fold.now.q_pos)], 1)
                        added = _gather(self.emb.additions[i][self.rows], pos.to(hidden.device))
                        hidden = hidden + added.to(hidden.dtype)
                hidden, _ = self._between(self.n, hidden, cos_sin)
        finally:
            ACTIVE.reset(token)
        return hidden

    def _call_layer(self, i: int, hidden: torch.Tensor, cos_sin: tuple) -> torch.Tensor:
        """Decoder layer i on hidden (R, Q, D) at the current positions, whose keys join the layer's."""
        prev = self.k_pos.get(i)
        q_pos = self.now.q_pos
        self.k_pos[i] = q_pos if prev is None else torch.cat([prev, q_pos], 1)
        return self.adapter.call_layer(i, hidden, text_positions=self.now.text_pos, cache=self.cache, rotary=cos_sin)

    def _store_keys(self, i: int, hidden: torch.Tensor, cos_sin: tuple, head: int) -> tuple[torch.Tensor, tuple]:
        """The keys-only strategy for layer i: run it on the first ``head`` of the current positions only until
        their keys/values are in the cache (the attention function stops the layer there), and return the other
        positions' hidden (R, Q', D) and rotary embeddings, for the layer to run in full."""
        keys, rest = self.now.split(head)
        self.now = keys
        try:
            self._call_layer(i, hidden[:, :head], tuple(t[:, :head] for t in cos_sin))
            raise RuntimeError(f"decoder layer {i} did not call its attention function")
        except _KeysStored:
            pass
        self.now = rest
        return hidden[:, head:], tuple(t[:, head:] for t in cos_sin)

    def _between(self, i: int, hidden: torch.Tensor, cos_sin: tuple) -> tuple[torch.Tensor, tuple]:
        """Residual-stream work at the input of layer i: write, drop, keep for conditions, record."""
        hidden = self._write(i, "residual", hidden)
        if i in self.plan.drops:
            hidden, cos_sin = self._drop(self.plan.drops[i], hidden, cos_sin)
        if i in self.keep_inputs:
            self.inputs_kept[i] = (hidden[:, : hidden.shape[1] - self._slots], int(self.now.q_pos[0, 0]))
        self._record_state(i, "residual", hidden)
        return hidden, cos_sin

    def _write(self, i: int, site: str, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, Q, D) at site ``site`` of layer i with the plan's writes applied at the current positions."""
        for op in self.plan.at("writes", i):
            if op.site != site:
                continue
            sel = _gather(op.where, self.now.q_pos)
            values = _gather(op.values, self.now.q_pos) if op.values.dim() == 3 else op.values
            hidden = torch.where(sel[..., None], values.to(hidden.device, hidden.dtype), hidden)
        return hidden

    @contextlib.contextmanager
    def _site_hooks(self, start_layer: int) -> Iterator[None]:
        """Forward hooks on the adapter's site modules that apply the plan's writes and records there, for the
        layers this pass runs; removed afterwards."""
        sites = {(i, s) for i, s in self.plan.sites("writes") | self.plan.sites("states") if s != "residual"}
        handles = []
        for i, site in sorted(sites):
            if i < start_layer:
                continue

            def hook(_module: torch.nn.Module, _args: Any, output: Any, i: int = i, site: str = site) -> Any:
                state = output[0] if isinstance(output, tuple) else output
                state = self._write(i, site, state)
                self._record_state(i, site, state)
                return (state, *output[1:]) if isinstance(output, tuple) else state

            handles.append(self.adapter.site_module(i, site).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _drop(self, drop: torch.Tensor, hidden: torch.Tensor, cos_sin: tuple) -> tuple[torch.Tensor, tuple]:
        """Remove the positions in ``drop`` (R, L) from the current rows, left-padding rows to a common length."""
        q_pos = self.now.q_pos
        keep = ~_gather(drop, q_pos) & (q_pos >= 0)
        counts = keep.sum(1)
        width = int(counts.max())
        # Stable order: kept positions keep their order, padding slots come first.
        order = torch.argsort(keep.long(), dim=1, stable=True)[:, -width:]
        slot_ok = torch.arange(width, device=q_pos.device)[None] >= (width - counts)[:, None]
        self.now = self.now.reorder(order, slot_ok)
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        cos, sin = (t.gather(1, order[..., None].expand(-1, -1, t.shape[-1])) for t in cos_sin)
        return hidden, (cos, sin)

    def _finish(self, hidden: torch.Tensor, decoding: bool = False) -> None:
        if self._slots:
            self.fold._finish(self._from_slots(hidden[:, -self._slots :]))
            hidden = hidden[:, : -self._slots]
        self.last_logits = self.adapter.lm_head(self.adapter.final_norm(hidden[:, -1:]))[:, 0].float()
        if self.logits_at == "all" and not decoding:
            full = self.adapter.lm_head(self.adapter.final_norm(hidden)).float()
            if self.logits is None:
                self.logits = full.new_full((len(self.rows), self.layout.length, full.shape[-1]), float("nan"))
            self._scatter(self.logits, full)

    # -- attention (called by the registered attention function) ----------------------------------------------
    def attend(
        self,
        layer: int,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of one decoder layer for this run (and the conditions folded into it): query (R, H, Q, d),
        key/value (R, H_kv, K, d) as the layer computed them -> (R, Q, H, d)."""
        if self.now.keys_only:  # the keys/values are in the cache: nothing else of this layer is needed
            raise _KeysStored
        if self._slots:  # own positions first, then the folded run's slots (keys likewise)
            v = self._slots
            own = self._attend_own(layer, module, query[:, :, :-v], key[:, :, :-v], value[:, :, :-v], scaling)
            slots = _grouped_attention(query[:, :, -v:], key, value, self.fold.slot_mask(layer), scaling)
            return torch.cat([own, slots], 1)
        return self._attend_own(layer, module, query, key, value, scaling)

    def _attend_own(
        self,
        layer: int,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """This run's attention at its own positions: query (R, H, Q, d), key/value (R, H_kv, K, d) -> (R, Q, H,
        d)."""
        prefix = self.prefix.get(layer)
        if prefix is not None:  # the baseline's keys/values before this run's first position, per sample
            key = torch.cat([prefix[0][self.rows], key], 2)
            value = torch.cat([prefix[1][self.rows], value], 2)
        mask = self._mask(layer, query.shape[2], key.shape[2])
        if layer in self.plan.layers("attention") or layer in self.plan.layers("received"):
            self._record_attention(layer, module, query, key, mask, scaling)
        return self.backend(module, query, key, value, mask, scaling)

    def _mask(self, layer: int, q_len: int, k_len: int) -> torch.Tensor | None:
        """The attention mask of this run's own positions at ``layer``, on the query's device: causal, padding,
        the layer's sliding window and the plan's edits; None where sdpa's own causal path gives the same."""
        window = self.windows[layer]
        edited = self.plan.at("blocks", layer) or self.plan.at("biases", layer)
        if self.now.causal and not edited and window is None and q_len == k_len:
            return None  # causal, no padding: sdpa's own causal path, bit-identical to the model's forward
        qp, kp = self.now.q_pos, self.k_pos[layer]
        diag = kp[:, None, :] == qp[:, :, None]
        allowed = (kp[:, None, :] <= qp[:, :, None]) & _gather(self.valid, kp)[:, None, :]
        if window is not None:  # transformers' sliding window: a key fewer than `window` positions back
            allowed = allowed & (kp[:, None, :] > qp[:, :, None] - window)

        def edges(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (R, L) group masks -> (R, Q, K) edges
            return _gather(q, qp)[:, :, None] & _gather(k, kp)[:, None, :]

        return self._intervened(layer, allowed, diag, edges)

    def _intervened(
        self,
        layer: int,
        allowed: torch.Tensor,
        diag: torch.Tensor,
        edges: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The attention mask from the open edges ``allowed`` (R, Q, K), less the plan's blocked edges at
        ``layer`` (never ``diag``, a position's edge to itself), with its logit biases; ``edges(q, k)`` gives the
        (R, Q, K) edges from a query position mask to a key position mask. -> bool (R, 1, Q, K), or additive
        float (R, H, Q, K) with biases."""
        block: BlockEdges
        for block in self.plan.at("blocks", layer):
            allowed = allowed & ~edges(block.query, block.key)
        allowed = (allowed | diag)[:, None]
        biases: tuple[BiasLogits, ...] = self.plan.at("biases", layer)
        if not biases:
            return allowed
        bias = torch.zeros(allowed.shape[0], self.adapter.n_heads, *allowed.shape[2:], device=allowed.device)
        for op in biases:
            bias[:, op.heads.to(allowed.device)] += op.amount * edges(op.query, op.key).float()[:, None]
        return torch.where(allowed, bias, torch.finfo(torch.float32).min).to(self.adapter.dtype)

    # -- records --------------------------------------------------------------------------------------------
    def _record_attention(
        self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        q_pos, k_pos = self.now.q_pos, self.k_pos[layer]

        def rows_probabilities(query_mask: torch.Tensor):
            """(sel (R, Q), cols, probabilities (R, H, len(cols), K)) of the query positions in ``query_mask``."""
            sel = _gather(query_mask.to(q_pos.device), q_pos)  # (R, Q)
            cols = sel.any(0).nonzero().flatten()
            if len(cols) == 0:
                return sel, cols, None
            sub_mask = None if mask is None else mask[:, :, cols]
            if sub_mask is None:  # causal, no padding: build the rows' causal mask explicitly
                sub_mask = (k_pos[:, None, :] <= q_pos[:, cols][:, :, None])[:, None]
            return sel, cols, probabilities(module, query[:, :, cols], key, sub_mask, scaling).float()

        for op in self.plan.at("received", layer):
            sel, cols, probs = rows_probabilities(op.query)
            if probs is None:
                continue
            later = (k_pos[:, None, :] < q_pos[:, cols][:, :, None]) & sel[:, cols][:, :, None]  # (R, Qc, K)
            got = torch.einsum("rhqk,rqk->rhk", probs, later.to(probs.dtype))  # (R, H, K)
            store = self.mass.setdefault(op.name, {})
            if layer not in store:
                store[layer] = got.new_zeros(len(self.rows), got.shape[1], self.layout.length)
            inside = (k_pos >= 0) & (k_pos < self.layout.length)  # (decoding keys beyond the prompt get none)
            index = torch.where(inside, k_pos, 0)[:, None, :].expand_as(got)
            store[layer].scatter_add_(2, index, got * inside[:, None, :].to(got.dtype))
        for op in self.plan.at("attention", layer):
            sel, cols, probs = rows_probabilities(op.query)
            if probs is None:
                continue
            mass = torch.einsum("rhqk,rkg->rhqg", probs, _gather(op.keys.to(probs.device), k_pos))
            store = self.mass.setdefault(op.name, {})
            if layer not in store:
                store[layer] = mass.new_zeros(len(self.rows), mass.shape[1], self.layout.length, mass.shape[-1])
            pos = q_pos[:, cols]
            ok = sel[:, cols]
            r_idx = torch.arange(len(self.rows), device=pos.device)[:, None].expand_as(pos)
            store[layer][r_idx[ok], :, pos[ok]] = mass.permute(0, 2, 1, 3)[ok]

    def _record_state(self, i: int, site: str, hidden: torch.Tensor) -> None:
        if (i, site) not in self.plan.sites("states"):
            return
        own = hidden[:, : hidden.shape[1] - self._slots] if site == "residual" else hidden
        if self.now.dense and (i, site) not in self.states:
            self.states[(i, site)] = own  # the whole sequence: keep the tensor itself, no copy
            return
        if (i, site) not in self.states:
            dense = own.new_full((len(self.rows), self.layout.length, own.shape[-1]), float("nan"))
            self.states[(i, site)] = dense
        self._scatter(self.states[(i, site)], own)

    def _scatter(self, dense: torch.Tensor, values: torch.Tensor) -> None:
        """Write values (R, Q, ...) at the current absolute positions of dense (R, L, ...)."""
        q_pos = self.now.q_pos
        ok = q_pos >= 0
        r_idx = torch.arange(len(self.rows), device=q_pos.device)[:, None].expand_as(q_pos)
        dense[r_idx[ok], q_pos[ok]] = values[ok].to(dense.dtype)

    def _inherit(self, base: _Forward) -> None:
        """Start from the baseline's records for everything this run does not recompute."""
        for key, h in base.states.items():
            self.states[key] = h[self.rows].clone()
        for name, per_layer in base.mass.items():
            self.mass[name] = {i: m[self.rows].clone() for i, m in per_layer.items()}
        if base.logits is not None:
            self.logits = base.logits[self.rows].clone()
        # Discarded positions have no state from their discard layer on, and no logits.
        for from_layer, drop in self.plan.drops.items():
            for (i, _site), h in self.states.items():
                if i >= from_layer:
                    h[drop] = float("nan")
            if self.logits is not None:
                self.logits[drop] = float("nan")

    # -- results ------------------------------------------------------------------------------------------------
    def trace(self, rows: slice) -> Trace:
        """The Trace of a slice of this forward's rows; each capture builds its result from the records."""
        lay = self.layout.select(torch.arange(len(self.rows))[rows])
        records = _Records(self, rows)
        caps = {cap.name: cap.result(records, lay) for cap in self.capture}
        logits = self.logits[rows] if self.logits_at == "all" else self.last_logits[rows]
        entries, k_pos = None, self.k_pos
        if all(i in k_pos for i in range(self.n)):
            held = [_gather(self.valid, k_pos[i]).sum(1) for i in range(self.n)]  # (R,) per layer
            entries = torch.stack(held, 1)[rows].cpu()
        return Trace(logits=logits, captures=caps, layout=lay, cache_entries=entries)


@dataclass(frozen=True)
class _Records:
    """What a forward recorded, for a slice of its rows (see :class:`avlens.trace.ops.Records`)."""

    forward: _Forward
    rows: slice

    @property
    def n_layers(self) -> int:
        return self.forward.n

    @property
    def n_heads(self) -> int:
        return self.forward.adapter.n_heads

    def state(self, layer: int, site: str) -> torch.Tensor:
        return self.forward.states[(layer, site)][self.rows]

    def mass(self, name: str, layer: int) -> torch.Tensor | None:
        m = self.forward.mass.get(name, {}).get(layer)
        return None if m is None else m[self.rows]
