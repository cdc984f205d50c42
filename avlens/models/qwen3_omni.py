"""Qwen3-Omni-MoE: the thinker (audio tower, vision tower with deepstack, mixture-of-experts text decoder).

Differences from Qwen2.5-Omni that the adapter handles: the audio length rule, audio-in-video spans that
merge video grids and audio tokens by time (no fixed 2-second chunks), and deepstack visual features that the
text decoder adds to the residual after its first layers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as qwen3

from .qwen import QwenAdapter
from .registry import register


@register
class Qwen3OmniAdapter(QwenAdapter):
    family = "qwen3-omni"
    description = "Qwen3-Omni-MoE thinker (Qwen3OmniMoeThinkerForConditionalGeneration; full Omni checkpoints too)"
    model_types = ("qwen3_omni_moe_thinker", "qwen3_omni_moe")
    full_model_types = ("qwen3_omni_moe",)
    model_class = Qwen3OmniMoeThinkerForConditionalGeneration
    tokens: ClassVar[dict[str, str]] = {
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "audio_start": "<|audio_start|>",
        "audio_end": "<|audio_end|>",
        "image": "<|image_pad|>",
        "video": "<|video_pad|>",
        "audio": "<|audio_pad|>",
    }

    def audio_token_count(self, n_frames: int) -> int:
        return int(qwen3._get_feat_extract_output_lengths(torch.tensor([n_frames]))[0])

    def interleave_order(self, video_times: np.ndarray, audio_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # One chunk per video grid step: its video tokens, then the audio tokens up to the next grid step
        # (the processor's merge by time, video first on ties).
        starts = np.unique(video_times)
        video_chunk = np.searchsorted(starts, video_times, side="left")
        audio_chunk = np.maximum(np.searchsorted(starts, audio_times, side="right") - 1, 0)
        return video_chunk, audio_chunk

    def _additions(self, captured: dict[str, Any], embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        deepstack = captured.get("deepstack_visual_embeds")
        where = captured.get("visual_pos_masks")
        if deepstack is None or where is None:
            return {}
        out = {}
        for layer, features in enumerate(deepstack):
            delta = torch.zeros_like(embeds)
            delta[where.to(embeds.device)] = features.to(embeds.device, embeds.dtype)
            out[layer] = delta
        return out
