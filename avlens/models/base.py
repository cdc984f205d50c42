"""What every model adapter provides: samples in, model inputs and a token layout out; where things are.

An adapter wraps one loaded model (for an Omni model, its thinker) with its tokenizer and media processors.
Analyses and the engine talk to models only through this interface; a new model family is one file that
subclasses :class:`Adapter` (most Qwen-style families subclass :class:`avlens.models.qwen.QwenAdapter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..layout import SpecialIds, TokenLayout, VideoGrid
from ..media import VideoClip
from .decoder import DecoderContract

Media = str | Path | np.ndarray | VideoClip
"""A media item: a file path, a waveform (float32 (n,) at 16 kHz), frames (uint8 (T, H, W, 3) at 2 fps),
or a :class:`~avlens.media.VideoClip`."""


@dataclass
class Clip:
    """One clip of a prompt: a video, an audio, an image, or a video with its audio.

    ``video_audio``: when a video is given without a separate audio, use the video's own audio track.
    """

    video: Media | None = None
    audio: Media | None = None
    image: Media | None = None
    video_audio: bool = True

    def describe(self) -> str:
        parts = [f"{k}={_name(v)}" for k, v in (("video", self.video), ("audio", self.audio), ("image", self.image))]
        return ", ".join(p for p in parts if not p.endswith("=None"))


def _name(m: Media | None) -> str:
    if m is None or isinstance(m, str | Path):
        return str(m)
    return f"<{type(m).__name__}>"


@dataclass
class Sample:
    """A prompt with its media. Build single-clip samples with ``Sample(prompt, video=..., audio=...)``,
    multi-clip ones with ``clips=[Clip(...), Clip(...)]`` (each clip is introduced by ``clip_label``)."""

    prompt: str
    video: Media | None = None
    audio: Media | None = None
    image: Media | None = None
    video_audio: bool = True
    clips: list[Clip] | None = None
    system: str | None = None
    id: str = ""
    clip_label: str = "Clip {k}: "
    meta: dict[str, Any] = field(default_factory=dict)

    def all_clips(self) -> list[Clip]:
        """The sample's clips (a single-clip sample has one)."""
        if self.clips is not None:
            if any(m is not None for m in (self.video, self.audio, self.image)):
                raise InputError("give media either per clip or for the sample, not both", sample=self.id)
            return list(self.clips)
        if self.video is None and self.audio is None and self.image is None:
            return []
        return [Clip(self.video, self.audio, self.image, self.video_audio)]


@dataclass
class Inputs:
    """A batch ready for the model.

    Attributes:
        tensors: the model's keyword arguments (input_ids (B, L), attention_mask (B, L), input_features,
            feature_attention_mask, pixel_values_videos, video_grid_thw, ...), left-padded.
        layout: the token groups of the batch.
        samples: the samples of the batch rows, in order.
        errors: samples that could not be built (one InputError each), left out of the batch.
        media: the media actually used, one dict per batch row: ``{"id": sample id, "clips": [clip, ...]}``
            with, per clip, ``"video"``: {file, seconds (decoded length), frames (sampled), fps (sampling
            rate used), source_fps}, ``"audio"``: {file, from_video, seconds_used, seconds_total,
            sampling_rate (what the model gets), source_rate (the file's; None for a waveform)} and
            ``"image"``: {file, height, width}, each None when the clip has no such media. ``file`` is None
            for in-memory media.
    """

    tensors: dict[str, Any]
    layout: TokenLayout
    samples: list[Sample]
    errors: list[InputError] = field(default_factory=list)
    media: list[dict[str, Any]] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class Embedded:
    """What the text decoder receives, taken from the model's own forward just before its language model.

    Attributes:
        embeds: (B, L, D) input embeddings with audio/video/image features merged in.
        position_ids: (3, B, L) multimodal rotary position ids (or (4, B, L): text ids first).
        attention_mask: (B, L).
        additions: layer -> (B, L, D) added to the residual after that decoder layer (Qwen3 deepstack), else empty.
    """

    embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    additions: dict[int, torch.Tensor] = field(default_factory=dict)


class Adapter(DecoderContract):
    """Base class of model adapters. Subclasses set ``family``/``model_types`` and implement loading, input
    building and the decoder contract (:class:`~avlens.models.decoder.DecoderContract`: how the engine calls the
    text decoder); the properties below describe where things are."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    has_audio: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer: Any, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    # -- structure (subclasses point these at the right modules) --------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The text decoder (a module with ``layers``, ``norm``, ``rotary_emb``, ``embed_tokens``)."""
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.text_model.norm

    @property
    def embed_tokens(self) -> nn.Module:
        return self.text_model.embed_tokens

    @property
    def attention_modules(self) -> list[tuple[int, nn.Module]]:
        """(layer index, self-attention module) of every decoder layer."""
        return [(m.layer_idx, m) for m in (layer.self_attn for layer in self.layers)]

    @property
    def text_config(self) -> Any:
        return self.text_model.config

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(self.text_config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.n_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def max_length(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def special_ids(self) -> SpecialIds:
        raise NotImplementedError

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end generation."""
        raise NotImplementedError

    # -- inputs ---------------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Sample], **options: Any) -> Inputs:
        """Load the samples' media and build a left-padded batch. Samples that fail are reported in
        ``Inputs.errors`` (one InputError each, naming the sample and file) and left out."""
        raise NotImplementedError

    def embed(self, inputs: Inputs) -> Embedded:
        """Run the model's own forward up to its language model and return what the decoder would get."""
        raise NotImplementedError

    # -- text -----------------------------------------------------------------------------------------------
    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of generated ids, special tokens skipped."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def word_ids(self, word: str) -> list[int]:
        """Token ids of a word as it appears after a space in generated text."""
        ids = self.tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        return ids or self.tokenizer.encode(word.strip(), add_special_tokens=False)

    def unembed(self, hidden: torch.Tensor, *, norm: bool = True) -> torch.Tensor:
        """Logits (..., V) of residual-stream states (..., D): the logit lens (final norm applied unless
        ``norm=False``, which reproduces lenses that skipped it)."""
        h = hidden.to(self.dtype)
        return self.lm_head(self.final_norm(h) if norm else h).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source or self.family}, layers={self.n_layers}, d={self.hidden_size})"

    # -- inputs from one's own tensors ------------------------------------------------------------------------
    def inputs_from_ids(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        groups: dict[str, torch.Tensor] | None = None,
        **tensors: Any,
    ) -> Inputs:
        """Inputs from token ids (and media features) one built oneself, without a chat template or media files.

        The layout is derived from the ids with the model's special ids, as for :meth:`prepare`: ``audio``,
        ``video``, ``image`` (the placeholder tokens), ``clip0``, ``clip1``... (the media spans), ``last``, and
        ``system`` / ``question`` from the text of turns that open with the chat template's headers
        (``<|im_start|>system\\n``, ``<|im_start|>user\\n``): ids without those headers have empty system and
        question groups, so name your own with ``groups``. For an interleaved (audio-in-video) batch — the
        family's interleave flag (``use_audio_in_video=True``) and ``video_grid_thw`` given — each vision span
        that holds audio tokens also gets its ``chunk{j}`` groups, from its grid's frames, the seconds per grid
        step (``video_second_per_grid``, default 1.0) and the family's chunk rule. ``mm_token_type_ids`` is
        derived for families whose forward takes it (Qwen2.5-VL), unless given.

        Args:
            input_ids: (B, L) token ids, left-padded (or (L,) for one row), each media placeholder already
                repeated once per media token, as the model's forward expects.
            attention_mask: (B, L), 1 on tokens and 0 on the left padding (default: all ones).
            groups: extra token groups by name, each a bool mask (B, L) (or (L,) for one row); a derived group of
                the same name (e.g. ``question``) is replaced.
            **tensors: the model's other inputs, passed through unchanged, e.g. ``input_features``
                (n_audio, mel bins, frames) with ``feature_attention_mask`` (n_audio, frames);
                ``pixel_values_videos`` (n_patches, patch dim) with ``video_grid_thw`` (n_videos, 3) and
                ``video_second_per_grid`` (n_videos,) (Qwen2.5-VL: ``second_per_grid_ts``); ``pixel_values``
                with ``image_grid_thw``; ``use_audio_in_video``. Media items are in batch order (row 0's first).

        Returns:
            Inputs with no samples (``Inputs.samples`` is empty).

        Raises:
            InputError: ids that are not (B, L), a mask or group of another shape, a mask not left-padded, a
                row with no token, or more video spans than ``video_grid_thw`` rows.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise InputError(f"input_ids must be (B, L), got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        if not bool(mask.any(1).all()):
            raise InputError("every row of attention_mask needs at least one token")
        if bool((mask.diff(dim=1) < 0).any()):
            raise InputError("inputs must be left-padded: attention_mask is 0 only before a row's first token")
        out = {"input_ids": ids, "attention_mask": mask, **self._tensors_from_ids(ids, tensors), **tensors}
        layout = TokenLayout.from_ids(
            ids,
            mask,
            self.special_ids,
            interleaved=self._interleaved_from_ids(ids, mask, out),
            chunk_rule=self._chunk_rule,
        )
        for name, group in (groups or {}).items():
            group = torch.as_tensor(group, dtype=torch.bool)
            group = group[None] if group.ndim == 1 else group
            if group.shape != ids.shape:
                raise InputError(f"group '{name}' has shape {tuple(group.shape)}, input_ids {tuple(ids.shape)}")
            layout = layout.with_group(name, group)
        return Inputs(tensors=out, layout=layout, samples=[])

    # What a family derives from ids alone (QwenAdapter overrides both).
    def _tensors_from_ids(self, input_ids: torch.Tensor, given: dict[str, Any]) -> dict[str, Any]:
        """Model inputs that follow from the ids (B, L) alone and are not among ``given`` (none by default)."""
        return {}

    def _interleaved_from_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tensors: dict[str, Any]
    ) -> list[list[VideoGrid]] | None:
        """Per row, the :class:`VideoGrid` of each interleaved span (None: not interleaved, the default)."""
        return None

    def _chunk_rule(self, video_times: torch.Tensor, audio_times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk ids of an interleaved span's video and audio tokens from their times (families that interleave)."""
        raise NotImplementedError
