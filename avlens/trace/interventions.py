"""Interventions as data: small frozen dataclasses that say what to do, not how.

Layers are decoder-layer indices. A residual "at layer i" is the input of decoder layer i (i = n_layers: the
output of the last layer, before the final norm), so ``residual[0]`` are the input embeddings, as in
transformers' ``output_hidden_states`` (which, for Qwen3-Omni, records layer outputs before the deepstack
visual features are added; avlens's residual includes them, as the next layer sees them).
Token sets are group expressions of the layout ("last+generated", "video", "clip1&audio") or explicit
position tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

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


@dataclass(frozen=True)
class Knockout:
    """Block attention edges from every ``query`` position to every ``key`` position in ``layers``.

    A position always keeps its edge to itself (so no attention row is ever empty). In generation the
    ``generated`` group holds the new tokens; the last prompt position, which produces the first answer token,
    is the group ``last`` (write ``"last+generated"`` to block both).
    """

    query: str
    key: str
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))


@dataclass(frozen=True, eq=False)
class Patch:
    """Overwrite the residual at ``layers`` and positions ``at`` with the values of another run.

    ``source`` maps a layer to a residual (B, L, D) of the same batch layout, e.g. the ``residual`` capture of a
    clean run: ``Patch("audio", layers=[4], source=clean.captures["residual"])``.
    """

    at: Positions
    layers: tuple[int, ...]
    source: Mapping[int, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "at", _positions(self.at))
        missing = [i for i in self.layers if i not in self.source]
        if missing:
            raise ValueError(f"Patch source has no residual for layers {missing}")


@dataclass(frozen=True)
class Steer:
    """Scale attention from ``query`` toward ``key`` in ``layers`` (and ``heads``; None = all heads).

    ``mode="post"``: on the attention probabilities, A + alpha*|A| on the key columns, then renormalise each row
    (PAI-style amplification). ``mode="bias"``: add ``alpha`` to the pre-softmax logits of the key columns.
    """

    key: str
    layers: tuple[int, ...]
    alpha: float
    query: str = "last+generated"
    heads: tuple[int, ...] | None = None
    mode: Literal["post", "bias"] = "post"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _layers(self.layers))
        object.__setattr__(self, "heads", _layers(self.heads))
        if self.mode not in ("post", "bias"):
            raise ValueError(f"Steer mode must be 'post' or 'bias', not {self.mode!r}")
        if self.mode == "post" and self.alpha <= -1:
            raise ValueError("Steer(mode='post') needs alpha > -1 (A + alpha*|A| must stay positive)")


@dataclass(frozen=True)
class Discard:
    """Remove a token group from the sequence and from the KV cache from ``from_layer`` on: later positions
    no longer see it in those layers, and the layers run on fewer tokens (the speed-up)."""

    group: str
    from_layer: int


@dataclass(frozen=True)
class Capture:
    """Record something during a run; results land in ``Trace.captures[name]``, keyed by layer.

    Build with :meth:`residual` or :meth:`attention`.
    """

    kind: Literal["residual", "attention"]
    name: str
    layers: tuple[int, ...] | None = None
    at: Positions | None = None
    keys: tuple[str, ...] = ()
    reduce: Literal["mean"] | None = None

    @classmethod
    def residual(
        cls,
        layers: int | Iterable[int] | None = None,
        at: str | Iterable[int] | None = None,
        *,
        reduce: Literal["mean"] | None = None,
        name: str = "residual",
    ) -> Capture:
        """The residual stream at ``layers`` (None: 0..n_layers).

        Result per layer: (B, L, D) if ``at`` is None; (B, D) with ``reduce="mean"`` over the group (NaN where a
        row has none); else a list of (n_b, D), one per row.
        """
        return cls("residual", name, _layers(layers), _positions(at), (), reduce)

    @classmethod
    def attention(
        cls,
        query: str,
        keys: Iterable[str],
        layers: int | Iterable[int] | None = None,
        *,
        name: str = "attention",
    ) -> Capture:
        """Attention mass from the ``query`` group to each key group, per layer and head.

        Result per layer: (B, H, K) = for every row, head and key group, the attention probability summed over
        the group's keys and averaged over the query positions. Computed inside the attention function, only for
        the query rows, so it works on sdpa and never holds a full attention matrix.
        """
        return cls("attention", name, _layers(layers), query, tuple(keys), None)


Intervention = Knockout | Patch | Steer | Discard
