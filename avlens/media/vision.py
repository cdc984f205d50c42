"""Qwen2-VL style visual patches, in plain numpy.

The model sees an image or a video as a grid of ``patch_size`` x ``patch_size`` pixel patches, each spanning
``temporal_patch_size`` frames (an image is one frame repeated). This module turns pixels into that
flattened patch sequence, giving bit-identical results to ``transformers.Qwen2VLImageProcessorPil``: frames
are resized with Pillow's bicubic filter, scaled by 1/255 in float64 then cast to float32, and normalised
in float32, in that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from avlens.errors import MediaError

_MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Size (height, width) to resize an image to: multiples of ``factor``, pixel count within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    Same rule as ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize``.

    Raises:
        MediaError: an empty image, or an aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image is empty ({height}x{width} pixels)")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise MediaError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} is above {_MAX_ASPECT_RATIO} "
            f"({height}x{width} pixels)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class VisionProcessor:
    """Turns images and video frames into Qwen2-VL patch sequences.

    Each patch is a vector of ``3 * temporal_patch_size * patch_size**2`` values laid out as
    (channel, time, row, column). Patches are ordered so that each ``merge_size`` x ``merge_size`` block of
    neighbours (which the model merges into one token) is contiguous.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(cls, d: dict) -> VisionProcessor:
        """Read the vision part of a ``preprocessor_config.json`` dict (other keys are ignored).

        Pixel limits come from ``min_pixels``/``max_pixels``, else from ``size`` =
        ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` as transformers 5 writes them.
        """
        size = d.get("size") or {}
        kwargs = {
            key: d[key]
            for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor")
            if d.get(key) is not None
        }
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in d[key])
        min_pixels = d.get("min_pixels", size.get("shortest_edge"))
        max_pixels = d.get("max_pixels", size.get("longest_edge"))
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        return cls(**kwargs)

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector: 3 * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a frame of this size is resized to."""
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def images(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Patches of several images, each resized on its own.

        Args:
            images: uint8 arrays (H, W, 3), RGB; sizes may differ.

        Returns:
            pixel_values: float32 (N, 3 * temporal_patch_size * patch_size**2), the images' patches one
                after the other, N = sum of grid_h * grid_w.
            grid_thw: int64 (n_images, 3), rows (1, grid_h, grid_w).
        """
        if len(images) == 0:
            raise ValueError("no images given")
        # An image is a one-frame video: padding to temporal_patch_size repeats the frame, which is exactly
        # how the Qwen2-VL image processor fills the temporal slots.
        results = [self.video(np.asarray(image)[None]) for image in images]
        pixel_values = np.concatenate([patches for patches, _ in results])
        grid_thw = np.stack([grid for _, grid in results]).astype(np.int64)
        return pixel_values, grid_thw

    def video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patches of a clip; all frames are resized to the size ``target_size`` gives for the first.

        Args:
            frames: uint8 (T, H, W, 3), RGB. T is padded to a multiple of temporal_patch_size by repeating
                the last frame.

        Returns:
            pixel_values: float32 (grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2).
            grid_thw: int64 (3,), (grid_t, grid_h, grid_w).
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if frames.shape[0] == 0:
            raise MediaError("video has no frames")
        height, width = self.target_size(frames.shape[1], frames.shape[2])
        pixels = np.stack([self._resize_normalize(frame, height, width) for frame in frames])
        return self._patchify(pixels)

    def _resize_normalize(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, height, width), with transformers' exact arithmetic."""
        # Pillow resizes even to the same size (returning a copy), as transformers does.
        resized = Image.fromarray(np.ascontiguousarray(frame)).resize(
            (width, height), resample=Image.Resampling.BICUBIC
        )
        # Rescaling and normalising act on each (value, channel) alone, so a 256-entry table per channel holds
        # every result they can give, computed with their exact arithmetic (see _lookup): same bits, faster.
        lookup, values = self._lookup(), np.asarray(resized)  # (3, 256), (height, width, 3)
        return np.stack([lookup[c][values[..., c]] for c in range(3)])

    def _lookup(self) -> np.ndarray:
        """float32 (3, 256): the normalised value of each uint8 value in each channel.

        transformers' rescale multiplies in float64 and only then casts to float32; normalising happens in
        float32. Doing either step in another precision changes the last bits."""
        key = (self.rescale_factor, tuple(self.image_mean), tuple(self.image_std))
        if getattr(self, "_lookup_key", None) != key:
            values = (np.arange(256, dtype=np.float64)[None, :].repeat(3, 0) * self.rescale_factor).astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            self._lookup_table, self._lookup_key = (values - mean) / std, key
        return self._lookup_table

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (T, C, H, W) -> (patches (grid_t * grid_h * grid_w, C * tp * p * p), grid_thw (3,))."""
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        if pad := -pixels.shape[0] % tp:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        t, c, h, w = pixels.shape
        grid_t, grid_h, grid_w = t // tp, h // p, w // p
        patches = pixels.reshape(grid_t, tp, c, grid_h // m, m, p, grid_w // m, m, p)
        # -> (grid_t, gh/m, gw/m, m, m, C, tp, p, p): merge blocks contiguous, each patch (C, tp, p, p).
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = np.ascontiguousarray(patches).reshape(grid_t * grid_h * grid_w, c * tp * p * p)
        return flat, np.array([grid_t, grid_h, grid_w], dtype=np.int64)


__all__ = ["VisionProcessor", "smart_resize"]
