"""A compiled plan: the primitive operations of one forward's rows, grouped by layer, immutable.

:func:`compile_plan` lowers every row's interventions and the captures into :mod:`avlens.trace.ops` operations
and files each under its ``kind``; the engine then asks the plan what happens at a layer (``plan.at(kind,
layer)``) and never looks at intervention classes. The same intervention object usually serves every row of a
condition: it is lowered once, for all its rows.
"""

from __future__ import annotations

from collections.abc import KeysView, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..layout import TokenLayout
from .interventions import AnyCapture, Intervention
from .ops import Lowering, Op

KINDS = ("blocks", "biases", "writes", "drops", "states", "attention", "received")
SITED = ("writes", "states")  # the kinds whose operations name a site


@dataclass(frozen=True)
class Plan:
    """The operations of a forward, by kind and layer.

    Attributes:
        ops: kind -> layer -> operations (read-only mappings and tuples).
        drops: layer -> bool (R, L), the union of the drops that start there.
    """

    ops: MappingProxyType = field(repr=False)
    drops: MappingProxyType = field(repr=False)
    _sites: dict[str, frozenset[tuple[int, str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Asked at every layer of a pass: derived once.
        sites = {k: frozenset((op.layer, op.site) for ops in self.ops[k].values() for op in ops) for k in SITED}
        object.__setattr__(self, "_sites", sites)

    def at(self, kind: str, layer: int) -> tuple[Op, ...]:
        """The operations of ``kind`` at ``layer`` (empty if none)."""
        return self.ops[kind].get(layer, ())

    def layers(self, kind: str) -> KeysView[int]:
        """The layers that have operations of ``kind`` (asked at every layer: a view, nothing built)."""
        return self.ops[kind].keys()

    def sites(self, kind: str) -> frozenset[tuple[int, str]]:
        """(layer, site) pairs of the ``writes`` or ``states`` operations."""
        return self._sites[kind]

    @property
    def attention_only(self) -> bool:
        """True if the plan acts only through attention (blocked edges and biased logits): such conditions can
        ride along in another run's pass (folded slots)."""
        return not any(self.ops[k] for k in ("writes", "drops", "states", "attention", "received"))


def compile_plan(
    interventions: Sequence[Sequence[Intervention]],
    captures: Sequence[AnyCapture],
    layout: TokenLayout,
    rows: torch.Tensor,
    *,
    batch_size: int,
    prompt_length: int,
    n_layers: int,
    n_heads: int,
    hidden: int,
    device: torch.device | str = "cpu",
) -> Plan:
    """Lower the interventions of each row (``interventions[r]``) and the captures (every row) into a plan.

    Args:
        layout: the rows' layout (R rows).
        rows: (R,) the sample of each row.
        device: where the operations' tensors go (the model's).
    """
    r = len(rows)
    on_rows: dict[int, tuple[Intervention, torch.Tensor]] = {}
    for row, ivs in enumerate(interventions):
        for iv in ivs:
            if id(iv) not in on_rows:
                on_rows[id(iv)] = (iv, torch.zeros(r, 1, dtype=torch.bool))
            on_rows[id(iv)][1][row] = True
    by_kind: dict[str, dict[int, list[Op]]] = {k: {} for k in KINDS}

    def lowering(on: torch.Tensor) -> Lowering:
        return Lowering(layout, on, rows, batch_size, prompt_length, n_layers, n_heads, hidden, device)

    for iv, on in on_rows.values():
        iv.start(layout, n_layers)  # validates group names and layers
        for op in iv.lower(lowering(on)):
            by_kind[op.kind].setdefault(op.layer, []).append(op)
    for cap in captures:
        cap.validate(layout, n_layers)
        for op in cap.records(layout, n_layers):
            by_kind[op.kind].setdefault(op.layer, []).append(op)
    drops: dict[int, torch.Tensor] = {}
    for layer, ops in by_kind["drops"].items():
        drops[layer] = torch.stack([op.where.to(device) for op in ops]).any(0)
    frozen: dict[str, Any] = {k: MappingProxyType({i: tuple(v) for i, v in d.items()}) for k, d in by_kind.items()}
    return Plan(MappingProxyType(frozen), MappingProxyType(drops))
