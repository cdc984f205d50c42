"""The intervention engine: forwards and generation with interventions given as data.

How it runs a forward. The adapter runs the model's own forward up to the text decoder (encoders, feature
merging, multimodal position ids) and hands over what the decoder would receive. The engine then calls the
model's decoder layers itself, one by one, with the model's rotary embedding, KV cache (transformers'
DynamicCache) and final norm; attention goes through avlens's registered attention function, which reads
the current run (masks from absolute positions, knockouts, steering, attention-mass capture). Residual-stream
interventions (patching, discarding, capture) happen between layers.

How conditions share work. An intervention that first acts at layer l on positions >= p leaves every layer
< l and every position < p exactly as in the baseline. So :func:`run_conditions` runs the baseline once, keeps
its residual at the layers where conditions start and its keys/values, and runs each condition only on
positions >= p through layers >= l, attending to the baseline's keys/values of positions < p (shared by all
conditions, not copied per condition; that attention is an explicit softmax whatever ``attn`` says).
Conditions with the same p (and the same l, unless few positions are recomputed) run as one batch. A knockout
from the last position costs about one decoding step.

Two savings go further. Conditions that act only through attention (Knockout, Steer) on the last few positions
(at most 16) are folded into the baseline's own pass: their positions are appended to the baseline's sequence
as extra query positions ("slots"), one copy per condition, each attending to the baseline's keys/values before
its first position and to its own slots; so each layer's weights are read once for the baseline and all of
them. And when only the last position's logits are asked for (``logits="last"``, nothing recorded from the last
layer), the last layer runs the other positions only as far as their keys/values: the attention function stops
the layer there, and the rest of it runs on the last position alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from ..layout import TokenLayout
from ..models.base import Adapter, Embedded, Inputs
from .attention import ACTIVE, BACKENDS, masked_softmax, probabilities, repeat_kv
from .interventions import Capture, Discard, Intervention, Knockout, Patch, Positions, Steer

LogitsAt = Literal["last", "all"]
_FEW_POSITIONS = 16


@dataclass
class Trace:
    """The result of one condition on a batch.

    Attributes:
        logits: (B, V) at the last prompt position, or (B, L, V) with ``logits="all"``.
        captures: capture name -> layer -> result (see :class:`Capture` for shapes).
        layout: the batch's token layout (extended with ``generated`` after generation).
        tokens: (B, T) generated ids (generation only; padded with -1 after a row stops).
        text: decoded answers (generation only).
        step_logits: (B, T, V) logits that produced each generated token (generation only).
    """

    logits: torch.Tensor
    captures: dict[str, dict[int, Any]] = field(default_factory=dict)
    layout: TokenLayout | None = None
    tokens: torch.Tensor | None = None
    text: list[str] | None = None
    step_logits: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def run(
    adapter: Adapter,
    inputs: Inputs,
    interventions: Sequence[Intervention] = (),
    *,
    capture: Sequence[Capture] = (),
    logits: LogitsAt = "last",
    attn: str = "sdpa",
) -> Trace:
    """One forward over the batch with the interventions applied from the first layer and position.

    Args:
        adapter: the model.
        inputs: a batch from ``adapter.prepare``.
        interventions: Knockout, Patch, Steer, Discard objects.
        capture: what to record.
        logits: "last" for (B, V) at the last prompt position, "all" for (B, L, V).
        attn: "sdpa" (default) or "eager" (explicit softmax).
    """
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
    capture: Sequence[Capture] = (),
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
    emb = adapter.embed(inputs)
    layout, n, b = inputs.layout, adapter.n_layers, inputs.batch_size
    starts = {name: start_of(ivs, layout, n) for name, ivs in conditions.items()}
    acting = {name: s for name, s in starts.items() if s is not None}
    per_batch = max(1, max_rows // b)
    length = inputs.length
    base = _Forward(adapter, emb, layout, torch.arange(b), [[]] * b, capture, attn, logits)
    # Conditions that only change the attention of the last few positions ride along in the baseline's own
    # pass, as extra query positions (each layer's weights are then read once for all of them).
    foldable = incremental and not capture and logits == "last"
    folded = [
        name
        for name in acting
        if foldable
        and length - acting[name][1] <= _FEW_POSITIONS
        and all(isinstance(iv, Knockout | Steer) for iv in conditions[name])
    ][:per_batch]
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


@torch.no_grad()
def generate(
    adapter: Adapter,
    inputs: Inputs,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 32,
    capture: Sequence[Capture] = (),
    attn: str = "sdpa",
) -> Trace:
    """Greedy generation with the interventions applied in the prefill and at every decoding step.

    The new tokens form the ``generated`` group of the layout; a knockout or steer whose query group includes
    it acts on them. Rows stop at the model's end-of-turn tokens.
    """
    emb = adapter.embed(inputs)
    layout = inputs.layout.extend(max_new_tokens)
    b = inputs.batch_size
    fwd = _Forward(adapter, emb, layout, torch.arange(b), [list(interventions)] * b, capture, attn, "last")
    fwd.prefill(0, 0, None)
    eos_ids = adapter.eos_ids
    eos = torch.tensor(eos_ids)
    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long)
    step_logits = []
    done = torch.zeros(b, dtype=torch.bool)
    logits = fwd.last_logits
    for t in range(max_new_tokens):
        step_logits.append(logits)
        nxt = logits.argmax(-1)
        tokens[:, t] = torch.where(done, -1, nxt)
        done |= torch.isin(nxt, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        logits = fwd.step(nxt)
    n_gen = int((tokens >= 0).any(0).sum())
    trace = fwd.trace(slice(None))
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
    starts = [s for s in (_start(iv, layout, n_layers) for iv in interventions) if s is not None]
    if not starts:
        return None
    return min(s[0] for s in starts), min(s[1] for s in starts)


# ---------------------------------------------------------------------------------------------------------
# Where interventions act
# ---------------------------------------------------------------------------------------------------------
def _check_layers(layers: Sequence[int], n_layers: int, what: str, upto: int) -> None:
    bad = [i for i in layers if not 0 <= i < upto]
    if bad:
        raise ValueError(f"{what}: layer(s) {bad} out of range (the model has {n_layers} decoder layers)")


def _positions_mask(at: Positions, layout: TokenLayout) -> torch.Tensor:
    if isinstance(at, str):
        return layout.mask(at)
    mask = torch.zeros_like(layout.valid)
    mask[:, list(at)] = True
    return mask & layout.valid


def _first(mask: torch.Tensor) -> int | None:
    cols = mask.any(0).nonzero()
    return int(cols[0]) if len(cols) else None


def _start(iv: Intervention, layout: TokenLayout, n: int) -> tuple[int, int] | None:
    if isinstance(iv, Knockout | Steer):
        layers, q, k = iv.layers, layout.mask(iv.query), layout.mask(iv.key)
        _check_layers(layers, n, type(iv).__name__, n)
        # Only queries that can see a key of the group (causally; a knockout never blocks the diagonal).
        seen = (k & layout.valid).long().cumsum(1)
        if isinstance(iv, Knockout):
            seen = seen - k.long()
        p = _first(q & (seen > 0))
        return None if p is None or not layers else (layers[0], p)
    if isinstance(iv, Patch):
        _check_layers(iv.layers, n, "Patch", n + 1)
        p = _first(_positions_mask(iv.at, layout))
        return None if p is None or not iv.layers else (iv.layers[0], p)
    if isinstance(iv, Discard):
        if iv.from_layer >= n:
            return None
        _check_layers([iv.from_layer], n, "Discard", n)
        p = _first(layout.mask(iv.group))
        return None if p is None else (iv.from_layer, p)
    raise TypeError(f"not an intervention: {iv!r}")


# ---------------------------------------------------------------------------------------------------------
# One forward over a set of rows (samples x conditions)
# ---------------------------------------------------------------------------------------------------------
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


class _KeysStored(Exception):
    """Raised by the attention function to stop a decoder layer once its keys/values are cached."""


def _gather(mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """mask (R, L, ...) at positions pos (R, N) (-1 = padding slot) -> (R, N, ...), False/0 at padding."""
    idx = pos.clamp(min=0)
    if mask.dim() == 2:
        return mask.gather(1, idx) & (pos >= 0) if mask.dtype == torch.bool else mask.gather(1, idx) * (pos >= 0)
    out = mask.gather(1, idx[..., None].expand(-1, -1, mask.shape[-1]))
    return out * (pos >= 0)[..., None]


class _Forward:
    """State of one forward (and its decoding steps) over R rows; each row is (sample, condition)."""

    def __init__(
        self,
        adapter: Adapter,
        emb: Embedded,
        layout: TokenLayout,
        rows: torch.Tensor,
        interventions: list[list[Intervention]],
        capture: Sequence[Capture],
        attn: str,
        logits: LogitsAt,
    ) -> None:
        if attn not in BACKENDS:
            raise ValueError(f"attn must be one of {list(BACKENDS)}, not {attn!r}")
        self.adapter, self.emb, self.rows = adapter, emb, rows
        self.layout = layout.select(rows)
        self.n = adapter.n_layers
        self.backend = BACKENDS[attn]
        self.logits_at = logits
        self.capture = list(capture)
        self.keep_inputs: set[int] = set()
        self.inputs_kept: dict[int, torch.Tensor] = {}
        self._compile(interventions)
        self.residual: dict[int, torch.Tensor] = {}
        self.mass: dict[str, dict[int, torch.Tensor]] = {}
        self.logits: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.decoding = False
        self._keys_only = False
        # Conditions folded into this run's pass (see start_fold), or None.
        self.fold: _Forward | None = None
        # Nothing asks for the last layer's output at any but the last position: that layer then runs the
        # other positions only as far as their keys/values (which later queries attend to).
        self._last_only = logits == "last" and self.n not in self.residual_layers and self.n - 1 not in self.att_specs

    # -- compilation of the rows' interventions into per-layer masks ------------------------------------------
    def _compile(self, interventions: list[list[Intervention]]) -> None:
        r, length, n = len(self.rows), self.layout.length, self.n
        lay = self.layout
        # The same intervention object usually serves every row of a condition: compile it once for its rows.
        rows_of: dict[int, tuple[Intervention, torch.Tensor]] = {}
        for row, ivs in enumerate(interventions):
            for iv in ivs:
                if id(iv) not in rows_of:
                    rows_of[id(iv)] = (iv, torch.zeros(r, 1, dtype=torch.bool))
                rows_of[id(iv)][1][row] = True
        self.knock: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.steer: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]]] = {}
        self.patch: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.discard: dict[int, torch.Tensor] = {}
        for iv, on in rows_of.values():
            _start(iv, lay, n)  # validates group names and layers
            if isinstance(iv, Knockout):
                q, k = lay.mask(iv.query) & on, lay.mask(iv.key) & on
                for i in iv.layers:
                    self.knock.setdefault(i, []).append((q, k))
            elif isinstance(iv, Steer):
                q, k = lay.mask(iv.query) & on, lay.mask(iv.key) & on
                heads = torch.zeros(self.adapter.n_heads, dtype=torch.bool)
                heads[list(iv.heads) if iv.heads is not None else slice(None)] = True
                for i in iv.layers:
                    self.steer.setdefault(i, []).append((q, k, heads, iv.alpha, iv.mode))
            elif isinstance(iv, Patch):
                where = _positions_mask(iv.at, lay) & on
                for i in iv.layers:
                    src = iv.source[i]
                    if src.dim() == 3 and src.shape[0] != self.emb.embeds.shape[0]:
                        raise ValueError(
                            f"Patch source at layer {i} has batch size {src.shape[0]}, "
                            f"the inputs have {self.emb.embeds.shape[0]}"
                        )
                    prompt = self.emb.embeds.shape[1]
                    if src.shape[-2] != prompt or src.shape[-1] != self.adapter.hidden_size:
                        raise ValueError(
                            f"Patch source at layer {i} has shape {tuple(src.shape)}; expected (B, {prompt}, "
                            f"{self.adapter.hidden_size}) for this batch"
                        )
                    src = src[self.rows] if src.dim() == 3 else src.expand(r, -1, -1)
                    if src.shape[1] < length:  # generation: the prompt part only
                        src = torch.cat([src, src.new_zeros(r, length - src.shape[1], src.shape[2])], 1)
                    self.patch.setdefault(i, []).append((where, src))
            elif isinstance(iv, Discard) and iv.from_layer < n:
                drop = lay.mask(iv.group) & on
                self.discard[iv.from_layer] = self.discard.get(iv.from_layer, torch.zeros_like(drop)) | drop
        self.att_specs: dict[int, list[tuple[Capture, torch.Tensor, torch.Tensor]]] = {}
        for cap in self.capture:
            if cap.kind != "attention":
                continue
            q = lay.mask(cap.at)
            keys = torch.stack([lay.mask(k) for k in cap.keys], -1).float()  # (R, L, G)
            for i in cap.layers if cap.layers is not None else range(n):
                self.att_specs.setdefault(i, []).append((cap, q, keys))
        self.residual_layers: set[int] = set()
        for cap in self.capture:
            if cap.kind == "residual":
                if cap.at is not None:
                    _positions_mask(cap.at, lay)  # validates the group name early
                self.residual_layers |= set(cap.layers if cap.layers is not None else range(n + 1))

    # -- running ----------------------------------------------------------------------------------------------
    def prefill(self, start_layer: int, start_pos: int, base: _Forward | None) -> None:
        """Run positions >= start_pos through layers >= start_layer (the rest comes from ``base``)."""
        emb = self.emb
        r = len(self.rows)
        length = emb.embeds.shape[1]
        self.q_pos = torch.arange(start_pos, length).expand(r, -1)
        if start_layer == 0:
            hidden = emb.embeds[self.rows, start_pos:]
        else:
            hidden = base.inputs_kept[start_layer][self.rows, start_pos:]
        pos = emb.position_ids[:, self.rows, start_pos:]
        self.text_pos, self.rope_pos = (pos[0], pos[1:]) if pos.shape[0] == 4 else (None, pos)
        self.cache = DynamicCache()
        self.k_pos: dict[int, torch.Tensor] = {}
        # The baseline's keys/values of positions < start_pos, per sample: shared by every row, never copied.
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if start_pos > 0:
            positions = torch.arange(start_pos).expand(r, -1)
            for i in range(start_layer, self.n):
                layer = base.cache.layers[i]
                self.prefix[i] = (layer.keys[:, :, :start_pos], layer.values[:, :, :start_pos])
                self.k_pos[i] = positions
        if base is not None:
            self._inherit(base, start_layer)
        self.start = (start_layer, start_pos)
        self._plain = start_pos == 0 and bool(self.layout.valid[:, :length].all())
        self._whole = start_pos == 0 and length == self.layout.length  # hidden rows are positions 0..L-1
        self.length = length
        if self.fold is not None:
            hidden = self._with_fold_slots(hidden)
        hidden = self._layers(hidden, start_layer)
        self._finish(hidden)

    # -- conditions folded into another run's pass --------------------------------------------------------------
    def start_fold(self, start_pos: int, samples: int) -> None:
        """Make this run (rows = conditions x ``samples``, condition-major) ride along in its parent's forward:
        positions >= start_pos of every row become extra query positions ("slots") of the parent's sequences,
        from the first layer on, attending to the parent's keys/values of positions < start_pos and to their
        own row's slots. Interventions must act through attention only (Knockout, Steer)."""
        r, length = len(self.rows), self.emb.embeds.shape[1]
        self.q_pos = torch.arange(start_pos, length).expand(r, -1)
        self.start, self.length = (0, start_pos), length
        self._plain = self._whole = False
        # The parent's keys are its own positions 0..L-1, then the slots, slot j = (condition c, position t).
        c, t = r // samples, length - start_pos
        slot_pos = torch.arange(start_pos, length).repeat(c)  # (C*T,)
        slot_cond = torch.arange(c).repeat_interleave(t)
        key_pos = torch.cat([torch.arange(length), slot_pos])  # (K,)
        key_cond = torch.cat([torch.full((length,), -1), slot_cond])
        prefix = (key_cond < 0) & (key_pos < start_pos)
        same = key_cond[None] == slot_cond[:, None]
        seen = (prefix[None, None] & self.layout.valid[:samples, key_pos][:, None]) | (
            same & (key_pos[None] <= slot_pos[:, None])
        )[None]  # (S, C*T, K)
        row = slot_cond[None] * samples + torch.arange(samples)[:, None]  # (S, C*T): the row each slot belongs to
        self._fold_geometry = (row, slot_pos, key_pos, seen, same & (key_pos[None] == slot_pos[:, None]))

    def slot_mask(self, layer: int) -> torch.Tensor:
        """Mask (S, 1 or H, C*T, K) of this folded run's slots over its parent's keys at one layer: a slot sees
        the keys before the first folded position and its own row's slots, as its interventions allow (bool,
        or additive float with steering)."""
        row, slot_pos, key_pos, seen, diag = self._fold_geometry

        def edges(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (R, L) masks -> (S, C*T, K) edges
            return q[row, slot_pos[None]][..., None] & k[row[..., None], key_pos[None, None]]

        return self._intervened(seen, diag, self.knock.get(layer, ()), self.steer.get(layer, ()), edges)

    @property
    def _slots(self) -> int:
        """Slots the folded run adds to each of this run's sequences (conditions x positions)."""
        return 0 if self.fold is None else self.fold.q_pos.numel() // len(self.rows)

    def _to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """A folded run's per-row tensor (C*S, T, ...) -> the parent's slots (S, C*T, ...)."""
        s = len(self.rows)
        c, t = x.shape[0] // s, x.shape[1]
        return x.reshape(c, s, t, *x.shape[2:]).transpose(0, 1).reshape(s, c * t, *x.shape[2:])

    def _from_slots(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The parent's slots (S, ..., C*T, ...) with slots on ``dim`` -> the folded run's rows (C*S, ..., T, ...)."""
        fold = self.fold
        s, t = len(self.rows), fold.q_pos.shape[1]
        c = len(fold.rows) // s
        x = x.movedim(dim, 1)
        x = x.reshape(s, c, t, *x.shape[2:]).transpose(0, 1).reshape(c * s, t, *x.shape[2:])
        return x.movedim(1, dim)

    def _with_fold_slots(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (S, L, D) with the folded run's slots appended (copies of the inputs at its positions), and
        the same for the position ids."""
        pos = self._to_slots(self.fold.q_pos)[0]  # (C*T,): the same positions for every sample
        ids = self.emb.position_ids[:, self.rows][..., pos]
        if self.text_pos is not None:
            self.text_pos = torch.cat([self.text_pos, ids[0]], 1)
        self.rope_pos = torch.cat([self.rope_pos, ids[-self.rope_pos.shape[0] :]], -1)
        return torch.cat([hidden, self.emb.embeds[self.rows][:, pos]], 1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decoding step: tokens (R,) -> next-token logits (R, V)."""
        ad = self.adapter
        pos_abs = self.length
        self.length += 1
        self.q_pos = torch.full((len(self.rows), 1), pos_abs)
        nxt = self._next_position[:, None] + (pos_abs - self.emb.embeds.shape[1])
        rope = nxt[None].expand(3, -1, -1)
        self.text_pos, self.rope_pos = (nxt, rope) if self.text_pos is not None else (None, rope)
        self._plain = self._whole = False
        self.decoding = True
        hidden = ad.embed_tokens(tokens[:, None].to(ad.device))
        hidden = self._layers(hidden, 0)
        self._finish(hidden, decoding=True)
        return self.last_logits

    @property
    def _next_position(self) -> torch.Tensor:
        return self.emb.position_ids[:, self.rows].amax(dim=(0, 2)) + 1

    def _layers(self, hidden: torch.Tensor, start_layer: int) -> torch.Tensor:
        ad = self.adapter
        cos_sin = ad.text_model.rotary_emb(hidden, self.rope_pos)
        token = ACTIVE.set(self)
        try:
            for i in range(start_layer, self.n):
                hidden, cos_sin = self._between(i, hidden, cos_sin)
                own = hidden.shape[1] - self._slots
                if i == self.n - 1 and self._last_only and own > 1:
                    hidden, cos_sin = self._store_keys(i, hidden, cos_sin, own - 1)
                hidden = self._call_layer(i, hidden, cos_sin)
                if i in self.emb.additions and not self.decoding:  # (deepstack: prompt positions only)
                    pos = (
                        self.q_pos if self.fold is None else torch.cat([self.q_pos, self._to_slots(self.fold.q_pos)], 1)
                    )
                    added = _gather(self.emb.additions[i][self.rows], pos.to(hidden.device))
                    hidden = hidden + added.to(hidden.dtype)
            hidden, _ = self._between(self.n, hidden, cos_sin)
        finally:
            ACTIVE.reset(token)
        return hidden

    def _call_layer(self, i: int, hidden: torch.Tensor, cos_sin: tuple) -> torch.Tensor:
        """Decoder layer i on hidden (R, Q, D) at the current positions (``q_pos``), whose keys join the layer's."""
        prev = self.k_pos.get(i)
        self.k_pos[i] = self.q_pos if prev is None else torch.cat([prev, self.q_pos], 1)
        return self.adapter.layers[i](
            hidden,
            attention_mask=None,
            position_ids=self.text_pos,
            past_key_values=self.cache,
            use_cache=True,
            position_embeddings=cos_sin,
        )

    def _store_keys(self, i: int, hidden: torch.Tensor, cos_sin: tuple, head: int) -> tuple[torch.Tensor, tuple]:
        """Run layer i on the first ``head`` of the current positions only until their keys/values are in the
        cache (the attention function stops the layer there), and return the other positions' hidden (R, Q',
        D) and rotary embeddings, for the layer to run in full."""
        q_pos, text_pos = self.q_pos, self.text_pos
        self.q_pos = q_pos[:, :head]
        self.text_pos = None if text_pos is None else text_pos[:, :head]
        self._keys_only = True
        try:
            self._call_layer(i, hidden[:, :head], tuple(t[:, :head] for t in cos_sin))
            raise RuntimeError(f"decoder layer {i} did not call its attention function")
        except _KeysStored:
            pass
        finally:
            self._keys_only = False
        self.q_pos = q_pos[:, head:]
        self.text_pos = None if text_pos is None else text_pos[:, head:]
        self._plain = self._whole = False
        return hidden[:, head:], tuple(t[:, head:] for t in cos_sin)

    def _between(self, i: int, hidden: torch.Tensor, cos_sin: tuple) -> tuple[torch.Tensor, tuple]:
        """Residual-stream work at the input of layer i: patch, discard, record."""
        for where, source in self.patch.get(i, ()):
            sel = _gather(where, self.q_pos)
            hidden = torch.where(sel[..., None], _gather(source, self.q_pos).to(hidden.dtype), hidden)
        if i in self.discard:
            hidden, cos_sin = self._discard(self.discard[i], hidden, cos_sin)
        if i in self.keep_inputs:
            self.inputs_kept[i] = hidden[:, : hidden.shape[1] - self._slots]
        if i in self.residual_layers:
            self._record_residual(i, hidden)
        return hidden, cos_sin

    def _discard(self, drop: torch.Tensor, hidden: torch.Tensor, cos_sin: tuple) -> tuple[torch.Tensor, tuple]:
        """Remove the positions in ``drop`` (R, L) from the current rows, left-padding rows to a common length."""
        keep = ~_gather(drop, self.q_pos) & (self.q_pos >= 0)
        counts = keep.sum(1)
        width = int(counts.max())
        # Stable order: kept positions keep their order, padding slots come first.
        order = torch.argsort(keep.long(), dim=1, stable=True)[:, -width:]
        slot_ok = torch.arange(width)[None] >= (width - counts)[:, None]
        self.q_pos = torch.where(slot_ok, self.q_pos.gather(1, order), -1)
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        cos, sin = (t.gather(1, order[..., None].expand(-1, -1, t.shape[-1])) for t in cos_sin)
        self.rope_pos = self.rope_pos.gather(2, order[None].expand(self.rope_pos.shape[0], -1, -1))
        if self.text_pos is not None:
            self.text_pos = self.text_pos.gather(1, order)
        self._plain = self._whole = False
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
        if self._keys_only:  # the keys/values are in the cache: nothing else of this layer is needed
            raise _KeysStored
        if self._slots:  # own positions first, then the folded run's slots (keys likewise)
            v = self._slots
            own = self._attend_own(layer, module, query[:, :, :-v], key[:, :, :-v], value[:, :, :-v], scaling)
            mask = self.fold.slot_mask(layer).to(query.device)
            slots = _grouped_attention(query[:, :, -v:], key, value, mask, scaling)
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
        k_len = key.shape[2] + (0 if prefix is None else prefix[0].shape[2])
        mask = self._mask(layer, query.shape[2], k_len)
        mask = None if mask is None else mask.to(query.device)
        if layer in self.att_specs:
            full = key if prefix is None else torch.cat([prefix[0][self.rows], key], 2)
            self._record_attention(layer, module, query, full, mask, scaling)
        if prefix is not None:
            return self._attend_with_prefix(module, query, key, value, mask, scaling, *prefix)
        return self.backend(module, query, key, value, mask, scaling)

    def _attend_with_prefix(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scaling: float,
        pk: torch.Tensor,
        pv: torch.Tensor,
    ) -> torch.Tensor:
        """Explicit-softmax attention over the baseline's prefix pk/pv (S, H_kv, P, d), indexed by sample, and
        this run's own key/value (R, H_kv, K, d). Rows are (condition, sample) pairs, row j*S + s being sample s
        (as run_conditions lays them out), so the prefix is broadcast over conditions instead of copied per row.
        query (R, H, Q, d) -> (R, Q, H, d)."""
        r, h, q, d = query.shape
        s, kvh, p, _ = pk.shape
        g, c = h // kvh, r // s
        grouped = query.reshape(c, s, kvh, g, q, d)
        scores = torch.cat(
            [
                torch.einsum("cskgqd,skpd->cskgqp", grouped, pk).reshape(r, h, q, p),
                query @ repeat_kv(key, g).transpose(2, 3),
            ],
            -1,
        )
        probs = masked_softmax(scores * scaling, mask).to(query.dtype)
        out = torch.einsum("cskgqp,skpd->cskgqd", probs[..., :p].reshape(c, s, kvh, g, q, p), pv).reshape(r, h, q, d)
        out = out + probs[..., p:] @ repeat_kv(value, g)
        return out.transpose(1, 2).contiguous()

    def _mask(self, layer: int, q_len: int, k_len: int) -> torch.Tensor | None:
        knocks, steers = self.knock.get(layer, ()), self.steer.get(layer, ())
        if self._plain and not knocks and not steers and q_len == k_len:
            return None  # causal, no padding: sdpa's own causal path, bit-identical to the model's forward
        qp, kp = self.q_pos, self.k_pos[layer]
        diag = kp[:, None, :] == qp[:, :, None]
        allowed = (kp[:, None, :] <= qp[:, :, None]) & _gather(self.layout.valid, kp)[:, None, :]

        def edges(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (R, L) group masks -> (R, Q, K) edges
            return _gather(q, qp)[:, :, None] & _gather(k, kp)[:, None, :]

        return self._intervened(allowed, diag, knocks, steers, edges)

    def _intervened(
        self,
        allowed: torch.Tensor,
        diag: torch.Tensor,
        knocks: Sequence,
        steers: Sequence,
        edges: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The attention mask from the open edges ``allowed`` (R, Q, K), less the knockouts' (never ``diag``,
        a position's edge to itself), with the steers' logit bias; ``edges(q, k)`` gives the (R, Q, K) edges
        from a query group mask to a key group mask. -> bool (R, 1, Q, K), or additive float (R, H, Q, K) with
        steering."""
        for q, k in knocks:
            allowed = allowed & ~edges(q, k)
        allowed = (allowed | diag)[:, None]
        if not steers:
            return allowed
        bias = torch.zeros(allowed.shape[0], self.adapter.n_heads, *allowed.shape[2:])
        for q, k, heads, alpha, mode in steers:
            amount = torch.log1p(torch.tensor(alpha)) if mode == "post" else torch.tensor(alpha)
            bias[:, heads] += amount * edges(q, k).float()[:, None]
        return torch.where(allowed, bias, torch.finfo(torch.float32).min).to(self.adapter.dtype)

    def _record_attention(
        self, layer: int, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        for cap, q, keys in self.att_specs[layer]:
            sel = _gather(q, self.q_pos)  # (R, Q)
            cols = sel.any(0).nonzero().flatten()
            if len(cols) == 0:
                continue
            sub_mask = None if mask is None else mask[:, :, cols]
            if sub_mask is None:  # causal, no padding: build the rows' causal mask explicitly
                qp, kp = self.q_pos[:, cols], self.k_pos[layer]
                sub_mask = (kp[:, None, :] <= qp[:, :, None])[:, None]
            probs = probabilities(module, query[:, :, cols], key, sub_mask, scaling).float()
            mass = torch.einsum("rhqk,rkg->rhqg", probs, _gather(keys, self.k_pos[layer]))
            store = self.mass.setdefault(cap.name, {})
            if layer not in store:
                store[layer] = mass.new_zeros(len(self.rows), mass.shape[1], self.layout.length, mass.shape[-1])
            pos = self.q_pos[:, cols]
            ok = sel[:, cols]
            r_idx = torch.arange(len(self.rows))[:, None].expand_as(pos)
            store[layer][r_idx[ok], :, pos[ok]] = mass.permute(0, 2, 1, 3)[ok]

    def _record_residual(self, i: int, hidden: torch.Tensor) -> None:
        if self._whole and i not in self.residual:
            self.residual[i] = hidden  # the whole sequence: keep the tensor itself, no copy
            return
        if i not in self.residual:
            self.residual[i] = hidden.new_full((len(self.rows), self.layout.length, hidden.shape[-1]), float("nan"))
        self._scatter(self.residual[i], hidden)

    def _scatter(self, dense: torch.Tensor, values: torch.Tensor) -> None:
        """Write values (R, Q, ...) at the current absolute positions of dense (R, L, ...)."""
        ok = self.q_pos >= 0
        r_idx = torch.arange(len(self.rows))[:, None].expand_as(self.q_pos)
        dense[r_idx[ok], self.q_pos[ok]] = values[ok].to(dense.dtype)

    def _inherit(self, base: _Forward, start_layer: int) -> None:
        """Start from the baseline's records for everything this run does not recompute."""
        for i, h in base.residual.items():
            self.residual[i] = h[self.rows].clone()
        for name, per_layer in base.mass.items():
            self.mass[name] = {i: m[self.rows].clone() for i, m in per_layer.items()}
        if base.logits is not None:
            self.logits = base.logits[self.rows].clone()
        # Discarded positions have no residual from their discard layer on, and no logits.
        for from_layer, drop in self.discard.items():
            for i, h in self.residual.items():
                if i >= from_layer:
                    h[drop] = float("nan")
            if self.logits is not None:
                self.logits[drop] = float("nan")

    # -- results ------------------------------------------------------------------------------------------------
    def trace(self, rows: slice) -> Trace:
        """The Trace of a slice of this forward's rows."""
        caps: dict[str, dict[int, Any]] = {}
        lay = self.layout.select(torch.arange(len(self.rows))[rows])
        for cap in self.capture:
            if cap.kind == "residual":
                layers = cap.layers if cap.layers is not None else range(self.n + 1)
                caps[cap.name] = {i: _select(self.residual[i][rows], cap, lay) for i in layers}
            else:
                per_layer = self.mass.get(cap.name, {})
                q = lay.mask(cap.at).float()  # (B, L)
                out = {}
                for i in cap.layers if cap.layers is not None else range(self.n):
                    m = per_layer.get(i)
                    if m is None:
                        out[i] = torch.full((q.shape[0], self.adapter.n_heads, len(cap.keys)), float("nan"))
                        continue
                    out[i] = torch.einsum("bhlg,bl->bhg", m[rows], q) / q.sum(1)[:, None, None]
                caps[cap.name] = out
        logits = self.logits[rows] if self.logits_at == "all" else self.last_logits[rows]
        return Trace(logits=logits, captures=caps, layout=lay)


def _select(dense: torch.Tensor, cap: Capture, layout: TokenLayout) -> Any:
    """A residual capture's result from the dense (B, L, D) record."""
    if cap.at is None:
        return dense
    mask = _positions_mask(cap.at, layout)
    if cap.reduce == "mean":
        w = mask.to(dense.dtype)
        return torch.einsum("bld,bl->bd", torch.nan_to_num(dense), w) / w.sum(1, keepdim=True)
    return [dense[b, mask[b]] for b in range(dense.shape[0])]
