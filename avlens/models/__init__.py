"""Model adapters: load a supported audio-visual LLM and turn samples into inputs with a token layout."""

from . import qwen2_5_omni, qwen2_5_vl, qwen3_omni  # noqa: F401  (register the families)
from .base import Adapter, Clip, Embedded, Inputs, Sample
from .qwen import PrepareOptions, QwenAdapter
from .registry import ADAPTERS, adapter_for, load, register

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Clip",
    "Embedded",
    "Inputs",
    "PrepareOptions",
    "QwenAdapter",
    "Sample",
    "adapter_for",
    "load",
    "register",
]
