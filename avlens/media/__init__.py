"""Reading media files and turning them into model inputs.

* :mod:`avlens.media.decode`: audio, video and image files -> numpy arrays (PyAV, Pillow).
* :mod:`avlens.media.vision`: frames -> Qwen2-VL visual patches.
* :mod:`avlens.media.audio`: waveforms -> Whisper log-mel features.
"""

from avlens.media.audio import AudioProcessor
from avlens.media.decode import (
    SUPPORTED_AUDIO,
    SUPPORTED_IMAGE,
    SUPPORTED_VIDEO,
    AudioTrack,
    MediaInfo,
    VideoClip,
    decode_audio,
    load_audio,
    load_image,
    load_video,
    probe,
)
from avlens.media.vision import VisionProcessor, smart_resize

__all__ = [
    "SUPPORTED_AUDIO",
    "SUPPORTED_IMAGE",
    "SUPPORTED_VIDEO",
    "AudioProcessor",
    "AudioTrack",
    "MediaInfo",
    "VideoClip",
    "VisionProcessor",
    "decode_audio",
    "load_audio",
    "load_image",
    "load_video",
    "probe",
    "smart_resize",
]
