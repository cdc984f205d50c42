"""Interventions as data: small frozen dataclasses that say what to do, not how.

Layers are decoder-layer indices. A residual "at layer i" is the input of decoder layer i (i = n_layers: the
output of the last layer, before the final norm), so ``residual[0]`` are the input embeddings, as in
transformers' ``output_hidden_states`` (which, for Qwen3-Omni, records layer outputs before the deepstack
visual features are added; avlens's residual includes them, as the next layer sees them). Other sites inside a
layer are named in :data:`avlens.trace.ops.SITES`.
Token sets are group expressions of the layout ("last+generated", "video", "clip1&audio") or explicit
position tuples, for every intervention alike.

Each intervention says where it first acts (:meth:`Intervention.start`, so the engine can share the baseline's
work below it) and lowers itself into the engine's primitive operations (:meth:`Intervention.lower`, see
:mod:`avlens.trace.ops`). A new intervention is one class with these two methods::

    @dataclass(frozen=True)
    class Silence(Intervention):          # zero the attention output of a group in some layers
        at: str
        layers: tuple[int, ...]

        def start(self, layout, n_layers):
            return first_acting(self.layers, positions_mask(self.at, layout))

        def lower(self, low):
            where = low.positions(self.at)
            return [WriteState(i, "attn_out", where, torch.zeros(low.hidden)) for i in self.layers]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..layout import TokenLayout
from .ops import (
    SITES,
    BiasLogits,
    BlockEdges,
    DropPositions,
    Lowering,
    Op,
    RecordAttention,
    RecordReceived,
    Records,
    RecordState,
    WriteState,
    positions_mask,
)

Positions = str | tuple[int, ...]


def _layers(layers: int | Iterable[int] | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        return (layers,)
    return tuple(sorted({int(i) for i in layers}))


def _positions(at: str | Iterable[int] | None) -> Positions | None:
    if at is None or isinstance(at, str):
        return at
    return tuple(int(i) for i in at)


def check_layers(layers: Sequence[int], n_layers: int, what: str, upto: int | None = None) -> None:
    """Raise ValueError naming ``what`` if a layer is outside 0..upto-1 (default: the decoder's layers)."""
    upto = n_layers if upto is None else upto
    bad = [i for i in layers if not 0 <= i < upto]
    if bad:
        raise ValueError(f"{what}: layer(s) {bad} out of range (the model has {n_layers} decoder layers)")


def first_acting(layers: Sequence[int], where: torch.Tensor) -> tuple[int, int] | None:
    """(first layer, first position) of an operation at ``layers`` on the positions ``where`` (B, L)."""
    cols = where.any(0).nonzero()
    return None if not len(cols) or not layers else (layers[0], int(cols[0]))


def _check_site(site: str, layers: Sequence[int], n_layers: int, what: str) -> None:
    if site not in SITES:
        raise ValueError(f"{what}: unknown site {site!r} (sites: {', '.join(SITES)})")
    check_layers(layers, n_layers, what, n_layers + 1 if site == "residual" else n_layers)


class Intervention(ABC):
    """What every intervention provides to the engine."""

    @abstractmethod
    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        """(first layer, first position) at which it can change anything, or None if it never does.

        Validates: raises UnknownGroupError for a group the layout lacks, ValueError for a layer out of range.
        """

    @abstractmethod
    def lower(self, low: Lowering) -> Iterable[Op]:
        """The primitive operations that carry it out on the rows ``low.on`` of a forward."""


def _attention_start(
    query: Positions, key: Positions, layers: Sequence[int], layout: TokenLayout, self_edge: bool
) -> tuple[int, int] | None:
    """First acting position of an attention edit: the first query that can see a key of the group (causally;
    with ``self_edge=False`` a position's edge to itself does not count, as a knockout never blocks it)."""
    q, k = positions_mask(query, layout), positions_mask(key, layout)
    seen = (k & layout.valid).long().cumsum(1) - (0 if self_edge else k.long())
    return first_acting(layers, q & (seen > 0))


@dataclass(frozen=True)
class Knockout(Intervention):
    """Block attention edges from every ``query`` position to every ``key`` position in ``layers``.

    A position always keeps its edge to itself (so no attention row is ever empty). In generation the
    ``generated`` group holds the new tokens; the last prompt position, which produces the first answer token,
    is the group ``last`` (write ``"last+generated"`` to block both).
    """

    query: Positions
    key: Positions
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "query", _positions(self.query))
        object.__setattr__(self, "key", _positions(self.key))

    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        check_layers(self.layers, n_layers, "Knockout")
        return _attention_start(self.query, self.key, self.layers, layout, self_edge=False)

    def lower(self, low: Lowering) -> list[Op]:
        q, k = low.positions(self.query), low.positions(self.key)
        return [BlockEdges(i, q, k) for i in self.layers]


@dataclass(frozen=True)
class Steer(Intervention):
    """Scale attention from ``query`` toward ``key`` in ``layers`` (and ``heads``; None = all heads).

    ``mode="post"``: on the attention probabilities, A + alpha*|A| on the key columns, then renormalise each row
    (PAI-style amplification; the same as adding log(1 + alpha) to their logits). ``mode="bias"``: add ``alpha``
    to the pre-softmax logits of the key columns.
    """

    key: Positions
    layers: tuple[int, ...]
    alpha: float
    query: Positions = "last+generated"
    heads: tuple[int, ...] | None = None
    mode: Literal["post", "bias"] = "post"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "heads", _layers(self.heads))
        object.__setattr__(self, "query", _positions(self.query))
        object.__setattr__(self, "key", _positions(self.key))
        if self.mode not in ("post", "bias"):
            raise ValueError(f"Steer mode must be 'post' or 'bias', not {self.mode!r}")
        if self.mode == "post" and self.alpha <= -1:
            raise ValueError("Steer(mode='post') needs alpha > -1 (A + alpha*|A| must stay positive)")

    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        check_layers(self.layers, n_layers, "Steer")
        if self.alpha == 0:  # A + 0|A|, or a zero bias: nothing changes
            return None
        return _attention_start(self.query, self.key, self.layers, layout, self_edge=True)

    def lower(self, low: Lowering) -> list[Op]:
        q, k = low.positions(self.query), low.positions(self.key)
        if self.alpha == 0 or not bool(k.any()) or not bool(q.any()):
            return []  # a no-op, bit for bit (no explicit mask replaces the model's own causal path)
        heads = torch.zeros(low.n_heads, dtype=torch.bool)
        heads[list(self.heads) if self.heads is not None else slice(None)] = True
        amount = float(torch.log1p(torch.tensor(self.alpha))) if self.mode == "post" else float(self.alpha)
        return [BiasLogits(i, q, k, heads.to(low.device), amount) for i in self.layers]


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Overwrite the state at ``site`` (default the residual), ``layers`` and positions ``at`` with the values of
    another run.

    ``source`` maps a layer to a state (B, L, D) of the same batch layout, e.g. the capture of a clean run:
    ``Patch("audio", layers=[4], source=clean.captures["residual"])``; with ``site="attn_in"`` a capture made
    with ``Capture.residual(site="attn_in")``.
    """

    at: Positions
    layers: tuple[int, ...]
    source: Mapping[int, torch.Tensor] = field(repr=False)
    site: str = "residual"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "at", _positions(self.at))
        missing = [i for i in self.layers if i not in self.source]
        if missing:
            raise ValueError(f"Patch source has no state for layers {missing}")

    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        _check_site(self.site, self.layers, n_layers, "Patch")
        return first_acting(self.layers, positions_mask(self.at, layout))

    def lower(self, low: Lowering) -> list[Op]:
        where = low.positions(self.at)
        r, length = len(low.rows), low.layout.length
        ops: list[Op] = []
        for i in self.layers:
            src = self.source[i]
            if src.dim() == 3 and src.shape[0] != low.batch_size:
                raise ValueError(
                    f"Patch source at layer {i} has batch size {src.shape[0]}, the inputs have {low.batch_size}"
                )
            if src.shape[-2] != low.prompt_length or src.shape[-1] != low.hidden:
                raise ValueError(
                    f"Patch source at layer {i} has shape {tuple(src.shape)}; expected (B, {low.prompt_length}, "
                    f"{low.hidden}) for this batch"
                )
            src = src[low.rows] if src.dim() == 3 else src.expand(r, -1, -1)
            if src.shape[1] < length:  # generation: the prompt part only
                src = torch.cat([src, src.new_zeros(r, length - src.shape[1], src.shape[2])], 1)
            ops.append(WriteState(i, self.site, where, src.to(low.device)))
        return ops


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Replace the state at ``site``, ``layers`` and positions ``at`` by zeros (``how="zero"``) or by a fixed
    vector per layer (``how="mean"``: ``value`` maps a layer to a (D,) state, e.g. the mean of a capture over a
    reference set). Ablating from a source run is :class:`Patch`."""

    at: Positions
    layers: tuple[int, ...]
    site: str = "residual"
    how: Literal["zero", "mean"] = "zero"
    value: Mapping[int, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "at", _positions(self.at))
        if self.how not in ("zero", "mean"):
            raise ValueError(f"Ablate how must be 'zero' or 'mean', not {self.how!r}")
        if self.how == "mean":
            missing = [i for i in self.layers if self.value is None or i not in self.value]
            if missing:
                raise ValueError(f"Ablate(how='mean') has no value for layers {missing}")

    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        _check_site(self.site, self.layers, n_layers, "Ablate")
        return first_acting(self.layers, positions_mask(self.at, layout))

    def lower(self, low: Lowering) -> list[Op]:
        where = low.positions(self.at)
        ops: list[Op] = []
        for i in self.layers:
            v = torch.zeros(low.hidden) if self.how == "zero" else self.value[i].reshape(-1)
            if v.shape != (low.hidden,):
                raise ValueError(f"Ablate value at layer {i} has shape {tuple(v.shape)}; expected ({low.hidden},)")
            ops.append(WriteState(i, self.site, where, v.to(low.device)))
        return ops


@dataclass(frozen=True)
class Discard(Intervention):
    """Remove a token group (or positions) from the sequence and from the KV cache from ``from_layer`` on: later
    positions no longer see it in those layers, and the layers run on fewer tokens (the speed-up)."""

    group: Positions
    from_layer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", _positions(self.group))

    def start(self, layout: TokenLayout, n_layers: int) -> tuple[int, int] | None:
        where = positions_mask(self.group, layout)
        if self.from_layer >= n_layers:
            return None
        check_layers([self.from_layer], n_layers, "Discard")
        return first_acting([self.from_layer], where)

    def lower(self, low: Lowering) -> list[Op]:
        if self.from_layer >= low.n_layers:
            return []
        return [DropPositions(self.from_layer, low.positions(self.group))]


# -------------------------------------------------------------------------------------------------------------
# Captures
# -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualCapture:
    """The state at ``site`` (default the residual stream) at ``layers`` (None: all of them).

    Result per layer: (B, L, D) if ``at`` is None (NaN where a run did not compute a position, e.g. discarded);
    (B, D) with ``reduce="mean"`` over the group (NaN where a row has none); else a list of (n_b, D), one per row.
    """

    name: str = "residual"
    layers: tuple[int, ...] | None = None
    at: Positions | None = None
    reduce: Literal["mean"] | None = None
    site: str = "residual"

    def all_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layers recorded: 0..n_layers for the residual, 0..n_layers-1 for sites inside a layer."""
        if self.layers is not None:
            return self.layers
        return tuple(range(n_layers + 1 if self.site == "residual" else n_layers))

    def validate(self, layout: TokenLayout, n_layers: int) -> None:
        """Raise early for an unknown site, layer or group."""
        _check_site(self.site, self.all_layers(n_layers), n_layers, f"Capture {self.name!r}")
        if self.at is not None:
            positions_mask(self.at, layout)

    def records(self, layout: TokenLayout, n_layers: int) -> list[Op]:
        """What the run records for it: the whole state at each layer (selected by ``at`` afterwards)."""
        return [RecordState(i, self.site) for i in self.all_layers(n_layers)]

    def result(self, records: Records, layout: TokenLayout) -> dict[int, torch.Tensor]:
        """layer -> the whole state (B, L, D), NaN outside ``at``, or its mean over ``at`` (B, D)."""
        out = {}
        for i in self.all_layers(records.n_layers):
            dense = records.state(i, self.site)
            if self.at is None:
                out[i] = dense
                continue
            mask = positions_mask(self.at, layout).to(dense.device)
            if self.reduce == "mean":
                w = mask.to(dense.dtype)
                out[i] = torch.einsum("bld,bl->bd", torch.nan_to_num(dense), w) / w.sum(1, keepdim=True)
            else:
                out[i] = torch.where(mask[..., None], dense, float("nan"))
        return out


@dataclass(frozen=True)
class AttentionCapture:
    """Attention mass from the ``query`` group to each key group, per layer and head.

    Result per layer: (B, H, K) = for every row, head and key group, the attention probability summed over the
    group's keys and averaged over the query positions. Computed inside the attention function, only for the
    query rows, so it works on sdpa and never holds a full attention matrix.
    """

    name: str
    query: Positions
    keys: tuple[Positions, ...]
    layers: tuple[int, ...] | None = None

    def all_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(n_layers))

    def validate(self, layout: TokenLayout, n_layers: int) -> None:
        check_layers(self.all_layers(n_layers), n_layers, f"Capture {self.name!r}")
        for g in (self.query, *self.keys):
            positions_mask(g, layout)

    def records(self, layout: TokenLayout, n_layers: int) -> list[Op]:
        """The attention mass of the query rows toward the key groups, at each layer."""
        q = positions_mask(self.query, layout)
        keys = torch.stack([positions_mask(k, layout) for k in self.keys], -1).float()  # (R, L, G)
        return [RecordAttention(i, self.name, q, keys) for i in self.all_layers(n_layers)]

    def result(self, records: Records, layout: TokenLayout) -> dict[int, torch.Tensor]:
        """layer -> (B, H, K): the mass toward each key group, averaged over the query positions."""
        q = positions_mask(self.query, layout).float()  # (B, L)
        out = {}
        for i in self.all_layers(records.n_layers):
            m = records.mass(self.name, i)
            if m is None:
                out[i] = torch.full((q.shape[0], records.n_heads, len(self.keys)), float("nan"))
                continue
            q = q.to(m.device)
            out[i] = torch.einsum("bhlg,bl->bhg", m, q) / q.sum(1)[:, None, None]
        return out


@dataclass(frozen=True)
class ReceivedCapture:
    """The attention each position receives from the ``query`` positions after it, per layer and head.

    Result per layer: (B, H, L) = for every row, head and key position k, the attention probability summed over
    the query positions q > k (the position's own query excluded); ``count(layout)`` gives how many query
    positions that is, (B, L), so ``result / count`` is the mean attention a position receives from later
    queries (StreamingLLM's and P2's attention sinks). Computed inside the attention function for the query
    rows only (sdpa or eager), never as a full attention matrix. Supported by ``run`` (one pass, every query
    computed once); ``run_conditions`` and ``generate`` refuse it.
    """

    name: str
    query: Positions
    layers: tuple[int, ...] | None = None

    def all_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(n_layers))

    def validate(self, layout: TokenLayout, n_layers: int) -> None:
        check_layers(self.all_layers(n_layers), n_layers, f"Capture {self.name!r}")
        positions_mask(self.query, layout)

    def records(self, layout: TokenLayout, n_layers: int) -> list[Op]:
        q = positions_mask(self.query, layout)
        return [RecordReceived(i, self.name, q) for i in self.all_layers(n_layers)]

    def count(self, layout: TokenLayout) -> torch.Tensor:
        """(B, L): how many query positions come after each position."""
        q = positions_mask(self.query, layout).float()
        return q.flip(1).cumsum(1).flip(1) - q  # queries at positions > k

    def result(self, records: Records, layout: TokenLayout) -> dict[int, torch.Tensor]:
        """layer -> (B, H, L): the attention each position receives, summed over the later query positions."""
        out = {}
        for i in self.all_layers(records.n_layers):
            m = records.mass(self.name, i)
            if m is None:
                m = torch.full((layout.valid.shape[0], records.n_heads, layout.length), float("nan"))
            out[i] = m
        return out


class Capture:
    """Builders of the two kinds of capture; results land in ``Trace.captures[name]``, keyed by layer."""

    @staticmethod
    def residual(
        layers: int | Iterable[int] | None = None,
        at: str | Iterable[int] | None = None,
        *,
        reduce: Literal["mean"] | None = None,
        name: str = "residual",
        site: str = "residual",
    ) -> ResidualCapture:
        """The state at ``site`` (the residual stream by default; or attn_in, attn_out, mlp_out) at ``layers``
        (None: all). See :class:`ResidualCapture` for the result's shape."""
        return ResidualCapture(name, _layers(layers), _positions(at), reduce, site)

    @staticmethod
    def attention(
        query: str | Iterable[int],
        keys: Iterable[str | Iterable[int]],
        layers: int | Iterable[int] | None = None,
        *,
        name: str = "attention",
    ) -> AttentionCapture:
        """Attention mass from ``query`` to each of ``keys``; see :class:`AttentionCapture`."""
        return AttentionCapture(name, _positions(query), tuple(_positions(k) for k in keys), _layers(layers))

    @staticmethod
    def received(
        query: str | Iterable[int] = "all", layers: int | Iterable[int] | None = None, *, name: str = "received"
    ) -> ReceivedCapture:
        """The attention each position receives from later ``query`` positions; see :class:`ReceivedCapture`."""
        return ReceivedCapture(name, _positions(query), _layers(layers))


AnyCapture = ResidualCapture | AttentionCapture | ReceivedCapture
