"""The attention function avlens registers with transformers' AttentionInterface.

Models loaded by avlens route their text decoder's attention (not the encoders') through :func:`attention`.
Outside an engine run it is exactly transformers' sdpa. Inside one, the run in progress (a contextvar) says,
for the module's ``layer_idx``: which query/key positions these are, which edges a knockout blocks, which
logits a steer biases, and which attention mass to record. Masks are built from absolute positions, so the
same code serves a full prefill, a recomputation of positions >= p only, a sequence with discarded tokens,
and one decoding step.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "avlens"


class LayerAttention(Protocol):
    """What the engine's run object offers the attention function (see engine._Forward)."""

    def attend(
        self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor: ...


ACTIVE: contextvars.ContextVar[LayerAttention | None] = contextvars.ContextVar("avlens_run", default=None)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point. query (B, H, Q, d), key/value (B, H_kv, K, d) -> (B, Q, H, d)."""
    run = ACTIVE.get()
    if run is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return run.attend(module.layer_idx, module, query, key, value, scaling), None


def register() -> None:
    """Register :func:`attention` (and sdpa's mask builder for it, so the model's own forward still works).
    Called by every run: registering again is two dictionary writes."""
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """transformers' sdpa with a bool (B, 1, Q, K) or additive float (B, H, Q, K) mask; None means causal."""
    out, _ = sdpa_attention_forward(module, query, key, value, mask, 0.0, scaling)
    return out


def eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Explicit softmax attention, same masks as :func:`sdpa` (the reference the sdpa path is tested against)."""
    probs = probabilities(module, query, key, mask, scaling)
    out = probs @ repeat_kv(value, module.num_key_value_groups)
    return out.transpose(1, 2).contiguous()


def probabilities(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention probabilities (B, H, Q, K) for the given query rows; softmax in float32 as transformers does."""
    scores = query @ repeat_kv(key, module.num_key_value_groups).transpose(2, 3) * scaling
    if mask is None:
        q, k = query.shape[2], key.shape[2]
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    return masked_softmax(scores, mask).to(query.dtype)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of scores (R, H, Q, K) in float32, with a bool mask (False: blocked) or an
    additive float mask broadcast to it."""
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": sdpa, "eager": eager}
