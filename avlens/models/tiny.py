"""Small randomly initialised models of every supported family, built from configs (no download).

The tests, the benchmarks and the quick-start use these; the organism builds its own on the same path.
Sizes are parameters so a benchmark can build a mid-size model (8 layers, hidden 512).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import Adapter
from .registry import ADAPTERS
from .tokenizer import build_tokenizer

WORDS = [
    "what",
    "do",
    "you",
    "see",
    "hear",
    "is",
    "there",
    "a",
    "sound",
    "of",
    "the",
    "in",
    "this",
    "video",
    "audio",
    "clip",
    "describe",
    "and",
    "yes",
    "no",
    "which",
    "has",
    "bell",
    "drum",
    "siren",
    "engine",
    "bird",
    "frog",
    "dog",
    "cat",
]


def tiny_model(
    family: str = "qwen2.5-omni",
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    encoder_hidden: int = 32,
    encoder_layers: int = 1,
    words: tuple[str, ...] = WORDS,
    seed: int = 0,
    save_to: str | Path | None = None,
    audio_chunk_seconds: int = 30,
    text_config: dict[str, Any] | None = None,
) -> Adapter:
    """A randomly initialised model of ``family`` with a word-level tokenizer carrying the family's tokens.

    Args:
        save_to: also save it as a Hugging Face checkpoint directory there (config.json, model.safetensors,
            tokenizer, preprocessor_config.json), loadable by ``avlens.load``.
        audio_chunk_seconds: the audio feature extractor's padding length (Qwen uses 300 s; small is faster).
        text_config: settings of the text decoder's config to add or override (e.g. ``layer_types``).
    """
    cls = ADAPTERS[family]
    tokenizer = build_tokenizer(words, cls.tokens)
    torch.manual_seed(seed)
    config = _config(
        family, tokenizer, layers, hidden, heads, kv_heads, intermediate or 2 * hidden, encoder_hidden, encoder_layers
    )
    for key, value in (text_config or {}).items():
        setattr(config.get_text_config(), key, value)
    model = cls.model_class._from_config(config, dtype=torch.float32).eval()
    preprocessor = preprocessor_config(audio_chunk_seconds, has_audio=cls.has_audio)
    video = video_preprocessor_config()
    adapter = cls(model, tokenizer, f"tiny-{family}", preprocessor=preprocessor, video_preprocessor=video)
    if save_to is not None:
        save(adapter, save_to, preprocessor, video)
    return adapter


def preprocessor_config(audio_chunk_seconds: int = 30, *, has_audio: bool = True) -> dict[str, Any]:
    """A preprocessor_config.json in the format of Qwen2.5-Omni's (Whisper features + Qwen2-VL patches)."""
    out: dict[str, Any] = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 256,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    if has_audio:
        out |= {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": 128,
            "sampling_rate": 16000,
            "hop_length": 160,
            "n_fft": 400,
            "chunk_length": audio_chunk_seconds,
            "n_samples": audio_chunk_seconds * 16000,
            "nb_max_frames": audio_chunk_seconds * 100,
            "padding_value": 0.0,
            "return_attention_mask": True,
        }
    return out


def video_preprocessor_config(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64) -> dict[str, Any]:
    """A video_preprocessor_config.json: Qwen2-VL patches with a small per-frame pixel budget."""
    return {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }


def save(adapter: Adapter, directory: str | Path, preprocessor: dict[str, Any], video: dict[str, Any]) -> Path:
    """Write a model as a Hugging Face checkpoint directory (safetensors weights, tokenizer, processor configs)."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(directory, safe_serialization=True)
    adapter.tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return directory


def _ids(tokenizer: Any, tokens: dict[str, str]) -> dict[str, int]:
    return {role: tokenizer.convert_tokens_to_ids(t) for role, t in tokens.items()}


def _config(
    family: str,
    tokenizer: Any,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    enc: int,
    enc_layers: int,
) -> Any:
    cls = ADAPTERS[family]
    ids = _ids(tokenizer, cls.tokens)
    head_dim = hidden // heads
    half, spatial = head_dim // 2, 3 * head_dim // 16  # Qwen's split of 64 rotary pairs: [16, 24, 24]
    mrope = [half - 2 * spatial, spatial, spatial]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=1,
        hidden_size=enc,
        num_heads=2,
        intermediate_size=2 * enc,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family == "qwen2.5-omni":
        from transformers import Qwen2_5OmniThinkerConfig

        audio = dict(
            num_mel_bins=128,
            encoder_layers=enc_layers,
            encoder_attention_heads=2,
            encoder_ffn_dim=2 * enc,
            d_model=enc,
            output_dim=hidden,
            n_window=50,
        )
        vision |= dict(window_size=112, fullatt_block_indexes=[0])
        config = Qwen2_5OmniThinkerConfig(
            audio_config=audio,
            vision_config=vision,
            text_config=text,
            audio_token_index=ids["audio"],
            image_token_index=ids["image"],
            video_token_index=ids["video"],
            audio_start_token_id=ids["audio_start"],
            audio_end_token_id=ids["audio_end"],
        )
        # Real checkpoints carry these in config.json; the thinker's config class does not declare them.
        config.vision_start_token_id = ids["vision_start"]
        config.vision_end_token_id = ids["vision_end"]
        return config
    if family == "qwen3-omni":
        from transformers import Qwen3OmniMoeThinkerConfig

        audio = dict(
            num_mel_bins=128,
            encoder_layers=enc_layers,
            encoder_attention_heads=2,
            encoder_ffn_dim=2 * enc,
            d_model=enc,
            output_dim=hidden,
            n_window=50,
            n_window_infer=100,
            downsample_hidden_size=enc,
        )
        vision |= dict(num_position_embeddings=64, deepstack_visual_indexes=[0], out_hidden_size=hidden)
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate, decoder_sparse_step=1)
        return Qwen3OmniMoeThinkerConfig(
            audio_config=audio,
            vision_config=vision,
            text_config=text,
            audio_token_id=ids["audio"],
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            audio_start_token_id=ids["audio_start"],
            audio_end_token_id=ids["audio_end"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
        )
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        vision |= dict(window_size=112, fullatt_block_indexes=[0], tokens_per_second=2)
        return Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
        )
    raise ValueError(f"no tiny config for family '{family}'")
