"""A word-level tokenizer with a Qwen family's special tokens and chat template.

The tiny models (tests, benchmarks) and the organism need a tokenizer that a Qwen adapter loads exactly like a
real checkpoint's: the same special token strings, ``<|im_start|>``/``<|im_end|>`` turns, a chat template, and
the processor attributes (``tokenizer.audio_token`` ...). Text is lower-cased and split into words and
punctuation, so "What do you see?" and "what do you see" share their words; unknown words map to ``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .qwen import chat_template

NEWLINE = "⏎"
UNK = "[UNK]"
PUNCTUATION = ("?", ".", ",", "!", ":", ";", "'", '"', "-", "(", ")")
TURN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROLE_WORDS = ("system", "user", "assistant")

# Attribute names transformers' Qwen processors read from the tokenizer, by our role names.
_PROCESSOR_ATTRIBUTES = {
    "image": "image_token",
    "video": "video_token",
    "audio": "audio_token",
    "vision_start": "vision_bos_token",
    "vision_end": "vision_eos_token",
    "audio_start": "audio_bos_token",
    "audio_end": "audio_eos_token",
}


def build_tokenizer(words: Iterable[str], special: dict[str, str]) -> PreTrainedTokenizerFast:
    """A word-level PreTrainedTokenizerFast.

    Args:
        words: the vocabulary (lower-case words; digits and punctuation are added).
        special: the family's special token strings by role (``QwenAdapter.tokens``).

    Ids: 0 ``<|endoftext|>`` (also pad and eos), 1 ``<|im_start|>``, 2 ``<|im_end|>``, then the family's special
    tokens, ``[UNK]``, the newline symbol, punctuation, digits and the words.
    """
    specials = [*TURN_TOKENS, *dict.fromkeys(special.values())]
    plain = [UNK, NEWLINE, *PUNCTUATION, *map(str, range(10)), *ROLE_WORDS]
    vocab: dict[str, int] = {}
    for token in [*specials, *plain, *sorted({w.lower() for w in words})]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s*\n\s*"), f" {NEWLINE} ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(True),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace(NEWLINE, "\n"), decoders.WordPiece(prefix="##", cleanup=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={_PROCESSOR_ATTRIBUTES[k]: v for k, v in special.items() if k in _PROCESSOR_ATTRIBUTES},
        padding_side="left",
    )
    fast.chat_template = chat_template(special)
    return fast
