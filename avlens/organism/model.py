"""The organism's architecture: a small Qwen2.5-Omni thinker with a word-level tokenizer.

It is built from transformers' own config classes, so every checkpoint is an ordinary Hugging Face directory
that :func:`avlens.load` opens with the Qwen2.5-Omni adapter, exactly like a real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from ..models.qwen2_5_omni import Qwen2_5OmniAdapter
from ..models.tiny import preprocessor_config
from ..models.tokenizer import build_tokenizer
from .data import DISTRACTORS, LETTERS, LETTERS_V2
from .world import CLASSES


@dataclass(frozen=True)
class OrganismConfig:
    """Sizes of the organism. Video tokens outnumber audio tokens (128 vs 50 for a 2 s clip at 224x224, 2 fps),
    as in real AVLLMs.

    The clip layout: ``fps`` (video frames sampled per second; two frames make one temporal patch) is saved in the
    checkpoint's video preprocessor config, and ``seconds_per_chunk`` (the time span of one interleaved chunk of
    audio-in-video; whole seconds, as transformers' config requires) in its thinker config, where a real
    checkpoint keeps them; so the loaded model lays clips out as it was trained. The defaults (2 fps, 2 s) make a
    2 s clip one chunk.
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 768
    vision_hidden: int = 64
    vision_depth: int = 2
    audio_hidden: int = 64
    audio_layers: int = 2
    frame_size: int = 224
    tie_embeddings: bool = True  # as Qwen2.5's small models (0.5B-3B): the answer words' rows are the input rows
    audio_seconds: int = 10  # the feature extractor's padding length (longer user audio is cut)
    fps: float = 2.0
    seconds_per_chunk: int = 2


QUESTION_WORDS = [
    "what",
    "do",
    "you",
    "see",
    "hear",
    "can",
    "is",
    "in",
    "the",
    "video",
    "there",
    "a",
    "an",
    "sound",
    "of",
    "making",
    "describe",
    "and",
    "clip",
    "which",
    "has",
    "shows",
    "i",
    "nothing",
    "yes",
    "no",
    "it",
    "this",
]
VOCABULARY = tuple(dict.fromkeys([*QUESTION_WORDS, *CLASSES]))

V2_WORDS: tuple[str, ...] = tuple(w for w in (*LETTERS, *DISTRACTORS) if w not in VOCABULARY)
"""Words of the organism-v2 skills (option letters, distractor options). Kept out of :data:`VOCABULARY`: the
tokenizer sorts its words, so adding any would renumber the ids (and change the initial weights) of every
organism trained from scratch."""
VOCABULARY_V2 = (*VOCABULARY, *V2_WORDS)
V2_LETTER_WORDS: tuple[str, ...] = tuple(w for w in LETTERS_V2 if w not in VOCABULARY_V2)
"""The option letters of :data:`~avlens.organism.data.LETTERS_V2` that :data:`VOCABULARY_V2` lacks ("u", "v")."""
VOCABULARY_V2_LETTERS = (*VOCABULARY_V2, *V2_LETTER_WORDS)
"""The v2 vocabulary with :data:`~avlens.organism.data.LETTERS_V2`, option letters used nowhere else in the data.
A vocabulary of its own (not :data:`VOCABULARY_V2` extended) so that runs made with ``VOCABULARY_V2`` (pilots
p0-p4) keep their token ids and initial weights."""


def new_organism(
    config: OrganismConfig = OrganismConfig(), seed: int = 0, vocabulary: tuple[str, ...] = VOCABULARY
) -> Qwen2_5OmniAdapter:
    """A freshly initialised organism (random weights), ready for training.

    ``vocabulary``: its words (:data:`VOCABULARY_V2` for the organism-v2 skills' letters and distractors)."""
    tokenizer = build_tokenizer(vocabulary, Qwen2_5OmniAdapter.tokens)
    ids = {role: tokenizer.convert_tokens_to_ids(t) for role, t in Qwen2_5OmniAdapter.tokens.items()}
    head_dim = config.hidden // config.heads
    spatial = 3 * head_dim // 16
    thinker = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.ffn,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 2 - 2 * spatial, spatial, spatial],
            },
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=config.vision_depth,
            hidden_size=config.vision_hidden,
            num_heads=4,
            intermediate_size=2 * config.vision_hidden,
            out_hidden_size=config.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=224,  # one attention window per frame pair: the frames are 224x224
            fullatt_block_indexes=[config.vision_depth - 1],
        ),
        audio_config=dict(
            num_mel_bins=128,
            encoder_layers=config.audio_layers,
            encoder_attention_heads=4,
            encoder_ffn_dim=2 * config.audio_hidden,
            d_model=config.audio_hidden,
            output_dim=config.hidden,
            n_window=50,
        ),
        audio_token_index=ids["audio"],
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        audio_start_token_id=ids["audio_start"],
        audio_end_token_id=ids["audio_end"],
        tie_word_embeddings=config.tie_embeddings,
        seconds_per_chunk=config.seconds_per_chunk,
    )
    thinker.vision_start_token_id = ids["vision_start"]
    thinker.vision_end_token_id = ids["vision_end"]
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(thinker, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pre = preprocessor_config(config.audio_seconds)
    video = video_config(config)
    adapter = Qwen2_5OmniAdapter(model, tokenizer, "organism", preprocessor=pre, video_preprocessor=video)
    adapter.organism_config = config
    return adapter


def video_config(config: OrganismConfig) -> dict:
    """Video patches at the organism's frame size (224x224 stays 224x224: 8x8 merged tokens per frame pair), and
    its sampling rate."""
    pixels = config.frame_size**2
    return {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": pixels,
        "max_pixels": pixels,
        "fps": config.fps,
    }


def save_organism(adapter: Qwen2_5OmniAdapter, directory: Path, card: dict | None = None) -> Path:
    """Write an organism checkpoint: a Hugging Face directory (safetensors) plus organism.json (its recipe)."""
    from ..models.tiny import save

    config = getattr(adapter, "organism_config", OrganismConfig())
    save(adapter, directory, preprocessor_config(config.audio_seconds), video_config(config))
    (directory / "organism.json").write_text(json.dumps({"config": asdict(config), **(card or {})}, indent=2))
    return directory
