"""Log-mel features for Whisper-style audio encoders (Qwen2-Audio, Qwen2.5-Omni).

A thin wrapper over transformers' ``WhisperFeatureExtractor``, called as the Qwen2.5-Omni processor calls it, so
the features match what the model was trained with.

Audio longer than the extractor's window (``chunk_length``: 300 s for Qwen2.5-Omni, 10 s for the organism) is
kept in full, never cut: it is padded to a whole number of windows instead of one, as Qwen3-Omni's processor
(``truncation=False``) keeps it. The audio towers read any length (they encode the features in blocks of
``2 * n_window`` frames), and the number of audio tokens follows the same rule for any length. Audio up to one
window gives exactly the features it always did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from avlens.errors import MediaError


@dataclass
class AudioProcessor:
    """Waveforms -> padded log-mel spectrograms and the mask of their valid frames.

    Defaults are Qwen2.5-Omni's preprocessor config: 128 mel bins, 16 kHz, 10 ms hop, 25 ms window, every
    input padded to ``chunk_length`` = 300 s (a longer one to a whole number of such windows: nothing is cut).
    """

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 300
    padding_value: float = 0.0
    dither: float = 0.0
    extractor: WhisperFeatureExtractor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.extractor = WhisperFeatureExtractor(
            feature_size=self.feature_size,
            sampling_rate=self.sampling_rate,
            hop_length=self.hop_length,
            n_fft=self.n_fft,
            chunk_length=self.chunk_length,
            padding_value=self.padding_value,
            dither=self.dither,
        )

    @classmethod
    def from_config(cls, d: dict) -> AudioProcessor:
        """Read the audio part of a ``preprocessor_config.json`` dict (other keys are ignored)."""
        keys = (
            "feature_size",
            "sampling_rate",
            "hop_length",
            "n_fft",
            "chunk_length",
            "padding_value",
            "dither",
        )
        return cls(**{key: d[key] for key in keys if d.get(key) is not None})

    @property
    def max_samples(self) -> int:
        """The extractor's window in samples, chunk_length * sampling_rate: what a waveform up to that long is
        padded to (see :meth:`padded_samples` for longer ones)."""
        return self.chunk_length * self.sampling_rate

    def padded_samples(self, n_samples: int) -> int:
        """Length a waveform of ``n_samples`` is padded to: a whole number of windows, at least one."""
        return max(1, math.ceil(n_samples / self.max_samples)) * self.max_samples

    def features(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of a batch of mono waveforms at ``sampling_rate``, every sample kept.

        Each waveform is extracted on its own, padded to :meth:`padded_samples`, so its features do not depend
        on the rest of the batch; rows shorter than the batch's longest are then padded with zeros (masked).

        Args:
            waveforms: float arrays (n_i,) of any length.

        Returns:
            input_features: float32 (B, feature_size, F) with F = padded_samples(max n_i) // hop_length.
            feature_attention_mask: int64 (B, F), 1 on the ``n_frames(n_i)`` valid frames of each waveform,
                0 on padding.

        Raises:
            MediaError: a waveform is empty.
        """
        if len(waveforms) == 0:
            raise ValueError("no waveforms given")
        batch = []
        for i, waveform in enumerate(waveforms):
            waveform = np.asarray(waveform, dtype=np.float32)
            if waveform.ndim != 1:
                raise ValueError(f"waveform {i} must be mono (n,), got shape {waveform.shape}")
            if waveform.size == 0:
                raise MediaError(f"audio is empty (0 samples) in waveform {i}")
            batch.append(waveform)
        rows = [self._extract(w) for w in batch]
        width = max(f.shape[-1] for f, _ in rows)
        features = torch.zeros((len(rows), self.feature_size, width), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (f, m) in enumerate(rows):
            features[i, :, : f.shape[-1]] = f
            mask[i, : m.shape[-1]] = m
        return features, mask

    def _extract(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature_size, F) features and (F,) mask of one waveform padded to its whole windows."""
        # The arguments Qwen2_5OmniProcessor._process_audio passes (padding forced to max_length), with the
        # length raised to whole windows so that truncation never cuts.
        out = self.extractor(
            [waveform],
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=self.padded_samples(len(waveform)),
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_features"][0], out["attention_mask"][0].long()

    def n_frames(self, n_samples: int) -> int:
        """Number of valid mel frames (the feature_attention_mask sum) for a waveform of n_samples samples."""
        if n_samples < 0:
            raise ValueError(f"n_samples must be non-negative, got {n_samples}")
        # The extractor keeps every hop_length-th sample of the sample mask, dropping the last column when
        # the padded length is not a multiple of hop_length.
        columns = self.padded_samples(n_samples) // self.hop_length
        return min(math.ceil(n_samples / self.hop_length), columns)


__all__ = ["AudioProcessor"]
