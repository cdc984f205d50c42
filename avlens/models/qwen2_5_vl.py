"""Qwen2.5-VL: the vision-language model Qwen2.5-Omni's thinker was built from (the base for comparisons).

No audio tower; images and videos only.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import Qwen2_5_VLForConditionalGeneration

from .qwen import QwenAdapter
from .registry import register


@register
class Qwen2_5VLAdapter(QwenAdapter):
    family = "qwen2.5-vl"
    description = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), the vision-language base"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    has_audio = False
    video_second_kwarg = "second_per_grid_ts"
    interleave_kwarg = None
    token_types = True
    tokens: ClassVar[dict[str, str]] = {
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "image": "<|image_pad|>",
        "video": "<|video_pad|>",
    }

    @property
    def position_id_per_second(self) -> float:
        return float(getattr(self.model.config.vision_config, "tokens_per_second", 2))
