"""The engine's primitive per-layer operations: what every intervention and capture lowers itself into.

An intervention is data that says *what* to do (:mod:`avlens.trace.interventions`); it lowers itself into these
few operations, which say *where and how*, as tensors over the rows of one forward (a row is a sample under a
condition) and the absolute positions of the batch's layout. The engine knows only these, never the
intervention classes, so a new intervention is one class whose ``lower`` yields them.

- :class:`BlockEdges`: attention edges the queries may not use (a position's edge to itself always stays).
- :class:`BiasLogits`: an additive bias on the pre-softmax attention logits of some edges and heads.
- :class:`WriteState`: overwrite the state at a site (residual, attention input, attention output, MLP output).
- :class:`DropPositions`: remove positions from the sequence and the KV cache from a layer on.
- :class:`RecordState` / :class:`RecordAttention` / :class:`RecordReceived`: what captures lower into.

Every op has a ``layer`` and a ``kind`` (the plan's field it belongs to, see :class:`avlens.trace.plan.Plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch

from ..layout import TokenLayout

Site = Literal["residual", "attn_in", "attn_out", "mlp_out"]
SITES: tuple[str, ...] = ("residual", "attn_in", "attn_out", "mlp_out")
"""Where a state is read or written in decoder layer i:

- ``residual``: the input of layer i (i = n_layers: the output of the last layer, before the final norm);
- ``attn_in``: the output of layer i's input norm, what self-attention reads (where P2 patches);
- ``attn_out``: the output of layer i's self-attention, before it is added to the residual;
- ``mlp_out``: the output of layer i's MLP, before it is added to the residual.
"""


@dataclass(frozen=True, eq=False)
class BlockEdges:
    """Block attention from query positions to key positions at ``layer``.

    Attributes:
        query, key: bool (R, L) over the rows' absolute positions.
    """

    kind: ClassVar[str] = "blocks"
    layer: int
    query: torch.Tensor
    key: torch.Tensor


@dataclass(frozen=True, eq=False)
class BiasLogits:
    """Add ``amount`` to the attention logits from query to key positions at ``layer``, in the ``heads``.

    Attributes:
        query, key: bool (R, L); heads: bool (H,).
    """

    kind: ClassVar[str] = "biases"
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    heads: torch.Tensor
    amount: float


@dataclass(frozen=True, eq=False)
class WriteState:
    """Overwrite the state at ``site`` of ``layer`` at the positions ``where`` (R, L) with ``values``: (R, L, D)
    per absolute position, or (D,) for every position alike."""

    kind: ClassVar[str] = "writes"
    layer: int
    site: str
    where: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True, eq=False)
class DropPositions:
    """Remove the positions ``where`` (R, L) from the sequence and the KV cache from ``layer`` on."""

    kind: ClassVar[str] = "drops"
    layer: int
    where: torch.Tensor


@dataclass(frozen=True, eq=False)
class RecordState:
    """Record the state at ``site`` of ``layer`` (every position the run computes)."""

    kind: ClassVar[str] = "states"
    layer: int
    site: str


@dataclass(frozen=True, eq=False)
class RecordAttention:
    """Record, at ``layer``, the attention mass from the ``query`` (R, L) positions to each of the key groups
    ``keys`` (R, L, G), per head, under the capture's ``name``."""

    kind: ClassVar[str] = "attention"
    layer: int
    name: str
    query: torch.Tensor
    keys: torch.Tensor


@dataclass(frozen=True, eq=False)
class RecordReceived:
    """Record, at ``layer``, the attention each key position receives from the ``query`` (R, L) positions after
    it (strictly later), summed over those queries, per head, under the capture's ``name``."""

    kind: ClassVar[str] = "received"
    layer: int
    name: str
    query: torch.Tensor


Op = BlockEdges | BiasLogits | WriteState | DropPositions | RecordState | RecordAttention | RecordReceived


@dataclass(frozen=True, eq=False)
class Lowering:
    """What an intervention may know when it lowers itself, for the rows of one forward.

    Attributes:
        layout: the rows' layout (R rows, L positions: the prompt, plus generated slots in generation).
        on: bool (R, 1), the rows this intervention applies to.
        rows: (R,) the sample of each row (an index into the batch of B samples).
        batch_size: B, the samples of the batch (a Patch source has B rows).
        prompt_length: positions of the prompt (a Patch source covers these).
        n_layers, n_heads, hidden: the decoder's sizes.
        device: the model's device, where the operations' tensors belong.
    """

    layout: TokenLayout
    on: torch.Tensor
    rows: torch.Tensor
    batch_size: int
    prompt_length: int
    n_layers: int
    n_heads: int
    hidden: int
    device: torch.device | str = "cpu"

    def positions(self, at: str | tuple[int, ...]) -> torch.Tensor:
        """bool (R, L) of a group expression or explicit positions, for the rows this op applies to."""
        return (positions_mask(at, self.layout) & self.on).to(self.device)


def positions_mask(at: str | tuple[int, ...], layout: TokenLayout) -> torch.Tensor:
    """bool (B, L) of a group expression ("last+generated", "clip1&audio") or a tuple of absolute positions.

    Raises:
        UnknownGroupError: a group the layout lacks. ValueError: a position outside the sequence.
    """
    if isinstance(at, str):
        return layout.mask(at)
    bad = [p for p in at if not 0 <= p < layout.length]
    if bad:
        raise ValueError(f"position(s) {bad} outside the sequence of {layout.length} positions")
    mask = torch.zeros_like(layout.valid)
    mask[:, list(at)] = True
    return mask & layout.valid


class Records(Protocol):
    """What a finished forward offers a capture to build its result from, for the rows of one condition."""

    n_layers: int
    n_heads: int

    def state(self, layer: int, site: str) -> torch.Tensor:
        """The state at ``site`` of ``layer`` recorded for every position, (B, L, D) (NaN where not computed)."""

    def mass(self, name: str, layer: int) -> torch.Tensor | None:
        """The attention mass capture ``name`` recorded at ``layer``, (B, H, L, G) per query position and key
        group (zero at positions that are not queries), or None if that layer recorded none; for a received
        capture, (B, H, L) per key position."""
