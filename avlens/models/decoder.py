"""The decoder contract: everything the engine may touch in a model's text decoder, declared by its adapter.

The engine (:mod:`avlens.trace`) runs the text decoder's layers itself, so it needs to know how: which modules
are the layers and how one is called, the rotary embedding, how position ids are laid out and what the next
decoding position is, the final norm and the unembedding, the modules at each site, each layer's attention
window, and how the text decoder's attention implementation is set. An adapter states all of it here; the
engine knows no module path or model family. A config setting the engine does not honour is refused when the
adapter is built (:meth:`DecoderContract.check_supported`), never run silently.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError

LAYER_TYPES = ("full_attention", "sliding_attention")
"""The attention layer types the engine honours (``config.layer_types``)."""

UNHONOURED = ("attention_chunk_size", "attn_logit_softcapping", "final_logit_softcapping")
"""Text-config settings that change attention or logits in ways the engine does not reproduce."""


class DecoderContract(ABC):
    """What an adapter tells the engine about its text decoder."""

    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied to the last layer's output before the unembedding."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module:
        """The unembedding: (..., D) -> logits (..., V)."""

    @property
    @abstractmethod
    def embed_tokens(self) -> nn.Module:
        """Token embedding (ids (...,) -> (..., D)), used for generated tokens."""

    @property
    @abstractmethod
    def text_config(self) -> Any:
        """The text decoder's config."""

    @abstractmethod
    def rotary(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin), each (B, Q, head_dim), for hidden (B, Q, D) at the rotary position ids."""

    @abstractmethod
    def split_positions(self, position_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The model's position ids (P, B, Q) -> (text position ids (B, Q) or None, rotary position ids)."""

    @abstractmethod
    def next_positions(self, position_ids: torch.Tensor, step: int) -> torch.Tensor:
        """Position ids (P, B, 1) of decoding step ``step`` (0: the first generated token's input) after a prompt
        with position ids (P, B, L)."""

    @abstractmethod
    def call_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        *,
        text_positions: torch.Tensor | None,
        cache: Any,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Decoder layer ``index`` on hidden (B, Q, D), appending its keys/values to ``cache`` -> (B, Q, D)."""

    @abstractmethod
    def site_module(self, index: int, site: str) -> nn.Module:
        """The module of layer ``index`` whose output is the state at ``site`` (attn_in, attn_out, mlp_out)."""

    @functools.cached_property
    def attention_windows(self) -> tuple[int | None, ...]:
        """Every layer's :meth:`attention_window`, read once."""
        return tuple(self.attention_window(i) for i in range(len(self.layers)))

    def attention_window(self, index: int) -> int | None:
        """Layer ``index``'s sliding window (a query sees keys fewer than this many positions back), or None.

        Read from the layer's attention module, which is what transformers hands its attention functions (a
        family whose text model has no sliding layers sets None there whatever its config says)."""
        window = getattr(self.layers[index].self_attn, "sliding_window", None)
        return None if window is None else int(window)

    def check_supported(self) -> None:
        """Refuse a text config the engine would not run faithfully, naming the setting.

        Raises:
            UnsupportedModelError: an unknown layer type, a sliding window without a size, or a setting in
                :data:`UNHONOURED`.
        """
        cfg = self.text_config
        for name in UNHONOURED:
            if getattr(cfg, name, None) is not None:
                value = getattr(cfg, name)
                raise UnsupportedModelError(f"text config sets {name}={value!r}, which avlens does not honour")
        types = getattr(cfg, "layer_types", None) or ()
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"text config layer_types has {unknown}; avlens honours {list(LAYER_TYPES)}")
        if "sliding_attention" in types and not isinstance(getattr(cfg, "sliding_window", None), int):
            raise UnsupportedModelError("text config has sliding_attention layers but no integer sliding_window")

    @property
    def text_attention(self) -> str:
        """The text decoder's attention implementation (a name in transformers' AttentionInterface)."""
        return str(self.text_config._attn_implementation)

    def set_text_attention(self, name: str) -> None:
        """Route the text decoder's attention (only it: the encoders keep theirs) through ``name``."""
        self.model.set_attn_implementation({"text_config": name})

    @contextlib.contextmanager
    def text_attention_during(self, name: str) -> Iterator[None]:
        """The text decoder's attention through ``name`` (registered with transformers' AttentionInterface) inside
        the block only, then as it was. The decoder's attention modules read their config's implementation at
        every call, so switching the text config alone is enough, and costs nothing next to
        ``set_attn_implementation``'s walk over every module (about 0.6 ms a call on a 3-layer model)."""
        cfg = self.text_config
        before = cfg._attn_implementation
        cfg._attn_implementation = name
        try:
            yield
        finally:
            cfg._attn_implementation = before
