"""Decoding media files into numpy arrays.

Audio and video containers are read with PyAV (FFmpeg), images with Pillow. Every problem with a file is
raised as one :class:`~avlens.errors.MediaError` naming the file; no PyAV, Pillow or OS exception escapes.

Files are accepted by content, not by name: whatever FFmpeg (audio, video) or Pillow (images) can decode is
read, whatever its extension (an ``.oga`` Ogg file, a wav saved without an extension). The extension lists
below only choose the wording of a refusal: an undecodable file with a media extension is "not a readable
media file" (damaged), one with another extension is "unsupported".

Damaged files:

* A file FFmpeg cannot open (random bytes; an mp4 cut short, which loses its index at the end) raises
  ``MediaError``, and so does a decoder error part way through a stream.
* When the container declares its video frame count (mp4, mov, avi) and fewer than 90% of those frames are
  present, the file is reported as truncated (e.g. a cut "faststart" mp4, whose index is at the start).
* Containers that do not declare a frame count (mkv, webm) and simply end early are decoded up to where they
  end: the clip covers the decodable part, and ``VideoClip.duration`` says how long that is. A video with no
  decodable frame at all raises ``MediaError``. Truncated audio likewise yields the samples up to the cut.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from PIL import Image, ImageOps

from avlens.errors import MediaError

if TYPE_CHECKING:
    from collections.abc import Iterator

# Usual extensions, for messages only: files are probed by content (see the module docstring).
SUPPORTED_VIDEO = (".mp4", ".mkv", ".webm", ".avi", ".mov")
SUPPORTED_AUDIO = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a")
SUPPORTED_IMAGE = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# What PyAV raises on bad data: its own FFmpegError family, plus OSError/ValueError/EOFError from the Python
# side (e.g. a resampler fed frames it was not set up for).
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
# What Pillow raises on unreadable, truncated or absurdly large images.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# FFmpeg demuxers of still images (besides the "*_pipe" ones): load_video refuses them.
_IMAGE_DEMUXERS = ("image2",)

# Below this share of the declared frame count, a video counts as truncated rather than slightly off
# (avi indexes, for one, often declare a frame more than they hold).
_MIN_PRESENT_SHARE = 0.9


@dataclass(frozen=True)
class MediaInfo:
    """What a media container holds.

    Attributes:
        path: the file.
        has_video: whether it has a video track (cover art of an audio file does not count).
        has_audio: whether it has an audio track.
        duration: length in seconds, if the container says.
        video_codec: FFmpeg name of the first video track's codec ("unknown" if FFmpeg has no decoder for it).
        audio_codec: same for the first audio track.
    """

    path: str
    has_video: bool
    has_audio: bool
    duration: float | None
    video_codec: str | None
    audio_codec: str | None


@dataclass
class VideoClip:
    """Frames sampled from a video.

    Attributes:
        frames: uint8 array (T, H, W, 3), RGB.
        fps: sampling rate actually used, T / duration (frames per second of video time).
        duration: length in seconds of the decodable video (frame count / source frame rate).
        source_fps: frame rate of the file.
        indices: int64 array (T,), which source frames were taken (frame i is shown at i / source_fps).
    """

    frames: np.ndarray
    fps: float
    duration: float
    source_fps: float
    indices: np.ndarray | None = None


def probe(path: str | Path) -> MediaInfo:
    """Describe the tracks of an audio or video file without decoding it.

    Raises:
        MediaError: missing file, or a file FFmpeg cannot open.
    """
    p = _check_file(path)
    with _open(p) as container:
        videos = _video_streams(container)
        audios = list(container.streams.audio)
        if container.duration is not None:
            duration = container.duration / av.time_base
        else:
            lengths = [float(s.duration * s.time_base) for s in videos + audios if s.duration is not None]
            duration = max(lengths) if lengths else None
        return MediaInfo(
            path=str(p),
            has_video=bool(videos),
            has_audio=bool(audios),
            duration=duration,
            video_codec=_codec_name(videos[0]) if videos else None,
            audio_codec=_codec_name(audios[0]) if audios else None,
        )


def load_audio(path: str | Path, *, sampling_rate: int = 16000) -> np.ndarray:
    """Decode the first audio track of an audio or video file as mono at ``sampling_rate``.

    Channels are averaged (not summed at -3 dB, FFmpeg's default downmix) so that the level matches
    ``librosa.load(mono=True)``, which Qwen's reference code uses.

    Returns:
        float32 array (n,), samples in [-1, 1].

    Raises:
        MediaError: missing, unsupported, unreadable or corrupt file; no audio track; undecodable codec;
            no samples.
    """
    return decode_audio(path, sampling_rate=sampling_rate).samples


@dataclass
class AudioTrack:
    """An audio track decoded as mono.

    Attributes:
        samples: float32 array (n,), in [-1, 1], at ``sampling_rate``.
        sampling_rate: rate of ``samples`` (what was asked for).
        source_rate: sample rate of the file's track.
    """

    samples: np.ndarray
    sampling_rate: int
    source_rate: int | None

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate


def decode_audio(path: str | Path, *, sampling_rate: int = 16000) -> AudioTrack:
    """:func:`load_audio` with the track's own sample rate alongside the samples.

    Raises:
        MediaError: as :func:`load_audio`.
    """
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be positive, got {sampling_rate}")
    p = _check_file(path)
    with _open(p) as container:
        if not container.streams.audio:
            raise MediaError("no audio track", path=str(p))
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise MediaError("unsupported codec (FFmpeg has no decoder for the audio track)", path=str(p))
        source_rate = stream.codec_context.sample_rate or stream.rate or None
        # rematrix_maxval=1 scales the downmix matrix so its coefficients sum to 1, i.e. a plain average.
        resampler = av.AudioResampler(
            format="flt", layout="mono", rate=sampling_rate, options={"rematrix_maxval": "1.0"}
        )
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except _AV_ERRORS as e:
            raise MediaError(f"corrupt or truncated audio (decoding failed: {_reason(e, p)})", path=str(p)) from e
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise MediaError("audio is empty (0 samples)", path=str(p))
    return AudioTrack(audio, sampling_rate, int(source_rate) if source_rate else None)


def load_video(
    path: str | Path,
    *,
    fps: float = 2.0,
    max_frames: int | None = None,
    frame_factor: int = 2,
    min_frames: int = 2,
) -> VideoClip:
    """Decode frames of the first video track, sampled uniformly like Qwen2-VL's reference code.

    The number of frames is ``round(duration * fps / frame_factor) * frame_factor``, at least ``min_frames``
    (rounded up to a multiple of ``frame_factor``) and ``frame_factor``, at most ``max_frames`` and the number
    of decodable frames (both rounded down to a multiple of ``frame_factor``). A video with fewer than
    ``frame_factor`` frames repeats its last frame. The frames taken are
    ``np.linspace(0, total - 1, n).round()``.

    Returns:
        VideoClip with frames uint8 (T, H, W, 3) RGB.

    Raises:
        MediaError: missing, unsupported, unreadable, corrupt or truncated file; no video track; undecodable
            codec; no decodable frame.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if frame_factor < 1 or min_frames < 1:
        raise ValueError("frame_factor and min_frames must be at least 1")
    if max_frames is not None and max_frames < frame_factor:
        raise ValueError(f"max_frames ({max_frames}) must be at least frame_factor ({frame_factor})")
    p = _check_file(path)

    with _open(p) as container:
        if container.format.name in _IMAGE_DEMUXERS or container.format.name.endswith("_pipe"):
            raise MediaError(f"an image ({container.format.name}), not a video: pass it as an image", path=str(p))
        streams = _video_streams(container)
        if not streams:
            raise MediaError("no video track", path=str(p))
        stream = streams[0]
        if stream.codec_context is None:
            raise MediaError("unsupported codec (FFmpeg has no decoder for the video track)", path=str(p))
        stream_index = stream.index
        declared = stream.frames
        rate = stream.average_rate or stream.guessed_rate
        fallback_duration = _declared_duration(container, stream)
        total = _count_packets(container, stream, p)

    if total == 0:
        raise MediaError("no video frames (corrupt or truncated)", path=str(p))
    if declared and total < _MIN_PRESENT_SHARE * declared:
        raise MediaError(f"truncated or corrupt: only {total} of {declared} video frames present", path=str(p))

    def timing(n_frames: int) -> tuple[float, float]:
        """(source fps, duration) of a stream of n_frames frames."""
        if rate:
            return float(rate), n_frames / float(rate)
        if fallback_duration:
            return n_frames / fallback_duration, fallback_duration
        raise MediaError("cannot determine the video's frame rate", path=str(p))

    source_fps, duration = timing(total)
    indices = _sample_indices(total, duration, fps, max_frames, frame_factor, min_frames)
    frames, decoded = _decode_frames(p, stream_index, indices)
    if decoded != total:
        # The decoder dropped (or split) frames without an error, so the indices computed from the packet
        # count point at the wrong frames: sample again from what actually decodes.
        if decoded == 0:
            raise MediaError("no decodable video frames (corrupt or truncated)", path=str(p))
        total = decoded
        source_fps, duration = timing(total)
        indices = _sample_indices(total, duration, fps, max_frames, frame_factor, min_frames)
        frames, decoded = _decode_frames(p, stream_index, indices)
        if decoded != total:
            raise MediaError("decoding is not reproducible (corrupt file?)", path=str(p))

    clip = np.stack([frames[i] for i in indices.tolist()])
    return VideoClip(
        frames=clip, fps=len(indices) / duration, duration=duration, source_fps=source_fps, indices=indices
    )


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB, applying its EXIF orientation and putting transparency on white.

    This is what ``transformers.image_utils.load_image`` followed by the Qwen2-VL processor's RGB conversion
    does.

    Returns:
        uint8 array (H, W, 3).

    Raises:
        MediaError: missing, unsupported, unreadable or corrupt file.
    """
    p = _check_file(path)
    try:
        with Image.open(p) as image:
            image = ImageOps.exif_transpose(image)
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba)
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as e:
        if p.suffix.lower() in SUPPORTED_IMAGE:
            raise MediaError(f"not a readable image ({_reason(e, p)})", path=str(p)) from e
        raise MediaError(
            f"unsupported image format '{p.suffix.lower() or p.name}' (Pillow cannot read it: {_reason(e, p)})",
            path=str(p),
        ) from e


def _sample_indices(
    total: int, duration: float, fps: float, max_frames: int | None, frame_factor: int, min_frames: int
) -> np.ndarray:
    """Indices (n,) int64 of the frames to take out of ``total``."""
    n = round(duration * fps / frame_factor) * frame_factor
    n = max(n, math.ceil(min_frames / frame_factor) * frame_factor, frame_factor)
    if max_frames is not None:
        n = min(n, max_frames // frame_factor * frame_factor)
    # With fewer than frame_factor frames there is no multiple to floor to: linspace then repeats frames.
    n = min(n, max(total // frame_factor * frame_factor, frame_factor))
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def _check_file(path: str | Path) -> Path:
    """The file as a Path, if it exists (its content is judged by the decoder, not its name)."""
    p = Path(path)
    if not p.exists():
        raise MediaError("file not found", path=str(p))
    if not p.is_file():
        raise MediaError("not a file", path=str(p))
    return p


@contextmanager
def _open(p: Path) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(str(p))
    except _AV_ERRORS as e:
        ext = p.suffix.lower()
        if ext in SUPPORTED_VIDEO + SUPPORTED_AUDIO:  # a media file by name: damaged
            raise MediaError(f"not a readable media file ({_reason(e, p)})", path=str(p)) from e
        raise MediaError(
            f"unsupported format '{ext or p.name}' (not audio or video FFmpeg can decode: {_reason(e, p)})",
            path=str(p),
        ) from e
    with container:
        yield container


def _video_streams(container: av.container.InputContainer) -> list:
    """Video tracks, leaving out cover art (an mp3 or m4a keeps its picture as a one-frame video track)."""
    return [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]


def _codec_name(stream) -> str:
    return stream.codec_context.name if stream.codec_context is not None else "unknown"


def _declared_duration(container: av.container.InputContainer, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _count_packets(container: av.container.InputContainer, stream, p: Path) -> int:
    """Number of video frames stored, from demuxing only (much cheaper than decoding)."""
    try:
        # Demuxing ends with an empty packet that flushes the decoder; it holds no frame.
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except _AV_ERRORS as e:
        raise MediaError(f"corrupt or truncated video (demuxing failed: {_reason(e, p)})", path=str(p)) from e


def _decode_frames(p: Path, stream_index: int, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decode the whole track, keeping the frames at ``indices``; also return how many frames decoded.

    Frames are converted to the size of the first frame, in case the resolution changes mid-stream.
    """
    wanted = set(indices.tolist())
    frames: dict[int, np.ndarray] = {}
    count = 0
    size: tuple[int, int] | None = None
    with _open(p) as container:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                if count in wanted:
                    frames[count] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                count += 1
        except _AV_ERRORS as e:
            raise MediaError(
                f"corrupt or truncated video (decoding failed after {count} frames: {_reason(e, p)})",
                path=str(p),
            ) from e
    return frames, count


def _reason(e: BaseException, p: Path) -> str:
    """The exception's message on one line, without the path (the MediaError already starts with it)."""
    text = str(getattr(e, "strerror", None) or e).replace(f"'{p}'", "").replace(str(p), "")
    return " ".join(text.split()).rstrip(" :") or type(e).__name__


__all__ = [
    "SUPPORTED_AUDIO",
    "SUPPORTED_IMAGE",
    "SUPPORTED_VIDEO",
    "AudioTrack",
    "MediaInfo",
    "VideoClip",
    "decode_audio",
    "load_audio",
    "load_image",
    "load_video",
    "probe",
]
