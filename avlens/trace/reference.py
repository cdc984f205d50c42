"""The papers' way of knocking out attention, kept as a slow reference for tests and benchmarks.

One full forward of the model per condition, the text decoder on eager attention, and, in every decoder
layer of a knockout window, an explicit 4D additive mask written into the layer's ``attention_mask`` argument
by a forward pre-hook (with the dtype's minimum on blocked edges). Nothing here is used by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.base import Adapter, Inputs
from .interventions import Knockout


def knockout_mask(inputs: Inputs, knockouts: Sequence[Knockout], layer: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, L, L) for one layer: causal, padding, and the knockouts active in that layer.

    A position always keeps its edge to itself, as in the engine.
    """
    layout = inputs.layout
    n = layout.length
    pos = torch.arange(n)
    allowed = (pos[None, :] <= pos[:, None])[None] & layout.valid[:, None, :]
    for ko in knockouts:
        if layer in ko.layers:
            allowed &= ~(layout.mask(ko.query)[:, :, None] & layout.mask(ko.key)[:, None, :])
    allowed |= torch.eye(n, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def knockout_logits(adapter: Adapter, inputs: Inputs, knockouts: Sequence[Knockout] = ()) -> torch.Tensor:
    """Logits (B, L, V) of one full eager forward with the knockouts written into the masks by pre-hooks."""
    masks = {i: knockout_mask(inputs, knockouts, i, adapter.dtype) for i in range(adapter.n_layers)}
    hooks = []
    for i, layer in enumerate(adapter.layers):

        def write_mask(_module, args, kwargs, i=i):
            kwargs["attention_mask"] = masks[i].to(adapter.device)
            return args, kwargs

        hooks.append(layer.register_forward_pre_hook(write_mask, with_kwargs=True))
    before = adapter.text_attention
    adapter.set_text_attention("eager")
    try:
        return adapter.model(**adapter.model_inputs(inputs), use_cache=False).logits.float()
    finally:
        adapter.set_text_attention(before)
        for h in hooks:
            h.remove()
