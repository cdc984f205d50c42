"""Qwen2.5-Omni: the thinker (audio tower + vision tower + Qwen2.5 text decoder).

A full Omni checkpoint (thinker + talker + vocoder) is accepted: only its ``.thinker`` is built.
Audio-in-video spans interleave 2-second chunks: each chunk's video tokens, then its audio tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from .qwen import QwenAdapter, chunked_index
from .registry import register


@register
class Qwen2_5OmniAdapter(QwenAdapter):
    family = "qwen2.5-omni"
    description = "Qwen2.5-Omni thinker (Qwen2_5OmniThinkerForConditionalGeneration; full Omni checkpoints too)"
    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni")
    full_model_types = ("qwen2_5_omni",)
    model_class = Qwen2_5OmniThinkerForConditionalGeneration

    def audio_token_count(self, n_frames: int) -> int:
        # The audio tower's own length rule: two stride-2 reductions.
        _, n = self.model.model.audio_tower._get_feat_extract_output_lengths(torch.tensor([n_frames]))
        return int(n[0])

    def interleave_order(self, video_times: np.ndarray, audio_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_chunk = int(self.position_id_per_second * float(self.model.config.seconds_per_chunk))
        return chunked_index(video_times, per_chunk), chunked_index(audio_times, per_chunk)
