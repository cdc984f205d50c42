"""Tests of avlens.media: decoding real files written here with PyAV/soundfile, and patch/feature extraction
compared bit for bit with transformers' own processors."""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from avlens.errors import MediaError
from avlens.media import (
    AudioProcessor,
    VisionProcessor,
    decode_audio,
    load_audio,
    load_image,
    load_video,
    probe,
    smart_resize,
)

SINE_HZ = 440.0
SECONDS = 6.0  # long enough that codec priming/padding (up to ~50 ms for mp3 in avi) stays under 1%
RED = (255, 0, 0)
SIZE = 64  # frame width and height, even as yuv420p needs


# --------------------------------------------------------------------------------------------- fixtures


def sine(rate: int, seconds: float = SECONDS, right_gain: float = 1.0) -> np.ndarray:
    """Stereo 440 Hz sine, float32 (2, n), amplitude 0.5 on the left channel."""
    t = np.arange(round(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * SINE_HZ * t)
    return np.stack([left, right_gain * left]).astype(np.float32)


def write_av(
    path: Path,
    *,
    vcodec: str | None,
    acodec: str | None,
    audio_rate: int = 44100,
    frames: list[np.ndarray] | None = None,
    fps: int = 10,
    faststart: bool = False,
) -> Path:
    """Write a container with an optional video track (rgb frames) and an optional stereo 440 Hz track
    as long as the video (SECONDS if there is no video)."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        if vcodec:
            vstream = container.add_stream(vcodec, rate=fps)
            vstream.height, vstream.width = frames[0].shape[:2]
            vstream.pix_fmt = "yuv420p"
            if vcodec == "libx264":
                vstream.options = {"crf": "12"}  # keep the index codes of the frames exact enough
        if acodec:
            astream = container.add_stream(acodec, rate=audio_rate)
            astream.layout = "stereo"
        if vcodec:
            for frame in frames:
                container.mux(vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(vstream.encode(None))
        if acodec:
            seconds = len(frames) / fps if vcodec else SECONDS
            samples = sine(audio_rate, seconds)
            step = astream.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], step):
                chunk = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples[:, start : start + step]), format="fltp", layout="stereo"
                )
                chunk.sample_rate = audio_rate
                chunk.pts = start
                container.mux(astream.encode(chunk))
            container.mux(astream.encode(None))
    return path


def solid_frames(n: int, colour=RED) -> list[np.ndarray]:
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:] = colour
    return [frame] * n


def coded_frames(n: int) -> list[np.ndarray]:
    """Grey frames whose level, 4 * i, tells which frame i they are after lossy coding."""
    return [np.full((SIZE, SIZE, 3), 4 * i, np.uint8) for i in range(n)]


def frame_codes(frames: np.ndarray) -> list[int]:
    return [round(float(f[8:-8, 8:-8].mean()) / 4) for f in frames]


def noise_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


CONTAINERS = {  # name: (video codec, audio codec, audio rate, FFmpeg's decoder names)
    "mp4": ("libx264", "aac", 44100, ("h264", "aac")),
    "mov": ("libx264", "aac", 44100, ("h264", "aac")),
    "mkv": ("libx264", "flac", 44100, ("h264", "flac")),
    "webm": ("libvpx-vp9", "libopus", 48000, ("vp9", "opus")),  # Opus only runs at 48 kHz (and below)
    "avi": ("mpeg4", "libmp3lame", 44100, ("mpeg4", "mp3float")),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Every fixture file, written once for the module."""
    d = tmp_path_factory.mktemp("media")
    files = {}
    n_video = round(SECONDS * 10)
    for ext, (vcodec, acodec, rate, _) in CONTAINERS.items():
        files[ext] = write_av(
            d / f"red.{ext}", vcodec=vcodec, acodec=acodec, audio_rate=rate, frames=solid_frames(n_video)
        )

    stereo = sine(44100).T
    for ext in ("wav", "flac", "ogg", "mp3"):
        files[ext] = d / f"sine.{ext}"
        sf.write(files[ext], stereo, 44100)
    files["m4a"] = write_av(d / "sine.m4a", vcodec=None, acodec="aac")

    files["coded"] = write_av(d / "coded.mp4", vcodec="libx264", acodec=None, frames=coded_frames(60))
    files["one_frame"] = write_av(d / "one.mp4", vcodec="libx264", acodec=None, frames=coded_frames(1))
    files["three_frames"] = write_av(d / "three.mp4", vcodec="libx264", acodec=None, frames=coded_frames(3))
    files["silent_mp4"] = files["coded"]

    sf.write(d / "unbalanced.wav", sine(44100, right_gain=0.2).T, 44100)
    files["unbalanced"] = d / "unbalanced.wav"
    files["empty_wav"] = d / "empty.wav"
    sf.write(files["empty_wav"], np.zeros(0, np.float32), 16000)

    # Damaged files. Noise frames make the video the bulk of each file, so a cut lands inside it.
    noisy = noise_frames(40)
    full = write_av(d / "full.mp4", vcodec="libx264", acodec="aac", frames=noisy)
    files["truncated_mp4"] = cut(full, d / "truncated.mp4")  # index (moov) is at the end: gone
    full = write_av(d / "full_fs.mp4", vcodec="libx264", acodec="aac", frames=noisy, faststart=True)
    files["truncated_faststart_mp4"] = cut(full, d / "truncated_fs.mp4")  # index kept, data missing
    full = write_av(d / "full.avi", vcodec="mpeg4", acodec=None, frames=noisy)
    files["truncated_avi"] = cut(full, d / "truncated.avi")
    files["full_mkv"] = write_av(d / "full.mkv", vcodec="libx264", acodec=None, frames=noisy)
    files["truncated_mkv"] = cut(files["full_mkv"], d / "truncated.mkv")
    files["random_mp4"] = d / "random.mp4"
    files["random_mp4"].write_bytes(np.random.default_rng(1).bytes(20_000))
    files["unknown_codec_wav"] = unknown_codec_wav(d / "unknown_codec.wav")
    files["xyz"] = d / "notes.xyz"
    files["xyz"].write_text("not media")
    files["text_wav"] = d / "notes.wav"
    files["text_wav"].write_text("not media, whatever the name says\n")
    files["text_noext"] = d / "notes"
    files["text_noext"].write_text("not media\n")
    # Decodable files under names the old extension lists refused.
    files["mp4_as_xyz"] = d / "clip.xyz"
    files["mp4_as_xyz"].write_bytes(files["mp4"].read_bytes())
    files["oga"] = d / "sine.oga"  # Ogg Vorbis, as Debian's sound themes ship
    sf.write(files["oga"], stereo, 44100, format="OGG", subtype="VORBIS")
    files["opus_oga"] = d / "opus.oga"
    sf.write(files["opus_oga"], sine(48000).T, 48000, format="OGG", subtype="OPUS")
    files["wav_noext"] = d / "recording"
    sf.write(files["wav_noext"], stereo, 44100, format="WAV")
    files["png"] = d / "red.png"
    Image.fromarray(np.full((16, 16, 3), RED, np.uint8)).save(files["png"])
    files["png_as_dat"] = d / "red.dat"
    files["png_as_dat"].write_bytes(files["png"].read_bytes())
    files["cover_mp3"] = mp3_with_cover_art(d / "cover.mp3")
    files["missing"] = d / "does_not_exist.mp4"
    files["bad_png"] = d / "broken.png"
    files["bad_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return files


def cut(src: Path, dst: Path, keep: float = 0.4) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def unknown_codec_wav(path: Path) -> Path:
    """A well-formed WAV whose format tag (0x7777) names no codec FFmpeg knows."""
    data = np.zeros(1600, np.int16).tobytes()
    fmt = struct.pack("<HHIIHH", 0x7777, 1, 16000, 32000, 2, 16)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def mp3_with_cover_art(path: Path) -> Path:
    """An mp3 holding a JPEG cover, which FFmpeg shows as a one-frame video track marked attached_pic."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 255, 0)).save(buf, "JPEG")
    with av.open(str(path), "w") as container:
        audio = container.add_stream("libmp3lame", rate=44100)
        audio.layout = "stereo"
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        samples = sine(44100, seconds=1.0)
        for start in range(0, samples.shape[1], 1152):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, start : start + 1152]), format="fltp", layout="stereo"
            )
            chunk.sample_rate, chunk.pts = 44100, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))
        packet = av.Packet(buf.getvalue())
        packet.stream, packet.pts, packet.dts = cover, 0, 0
        container.mux(packet)
    return path


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_container_decodes_video_and_audio(media, ext):
    info = probe(media[ext])
    assert (info.has_video, info.has_audio) == (True, True)
    assert (info.video_codec, info.audio_codec) == CONTAINERS[ext][3]
    assert info.duration == pytest.approx(SECONDS, abs=0.15)

    clip = load_video(media[ext], fps=2.0)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (12, SIZE, SIZE, 3)
    assert clip.source_fps == pytest.approx(10.0)
    assert clip.duration == pytest.approx(SECONDS)
    assert clip.fps == pytest.approx(2.0)
    mean = clip.frames.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 245 and mean[1] < 8 and mean[2] < 8, f"red came out as {mean}"

    audio = load_audio(media[ext])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(16000 * SECONDS, rel=0.01)
    assert dominant_hz(audio, 16000) == pytest.approx(SINE_HZ, abs=5)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_audio_file_is_resampled_to_16k_mono(media, ext):
    info = probe(media[ext])
    assert (info.has_video, info.has_audio) == (False, True)
    audio = load_audio(media[ext])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(16000 * SECONDS, rel=0.01)
    assert dominant_hz(audio, 16000) == pytest.approx(SINE_HZ, abs=5)
    assert 0.45 < np.abs(audio).max() < 0.56  # a 0.5 sine, give or take codec ringing


def test_audio_other_sampling_rate(media):
    audio = load_audio(media["flac"], sampling_rate=8000)
    assert len(audio) == pytest.approx(8000 * SECONDS, rel=0.01)
    assert dominant_hz(audio, 8000) == pytest.approx(SINE_HZ, abs=5)


def test_channels_are_averaged_not_summed(media):
    # Left 0.5 sine, right 0.2 of it: the average peaks at 0.3 (FFmpeg's default downmix would give 0.42).
    audio = load_audio(media["unbalanced"])
    assert np.abs(audio).max() == pytest.approx(0.3, abs=0.005)


@pytest.mark.parametrize(
    ("fps", "max_frames", "min_frames", "expected"),
    [
        (2.0, None, 2, 12),  # 6 s * 2 fps
        (1.0, None, 2, 6),
        (0.5, None, 2, 4),  # 1.5 pairs rounds (half to even) to 2 pairs
        (0.25, None, 2, 2),
        (0.1, None, 2, 2),  # raised to min_frames
        (0.1, None, 7, 8),  # min_frames rounded up to a multiple of frame_factor
        (2.0, 5, 2, 4),  # max_frames rounded down to a multiple of frame_factor
        (100.0, None, 2, 60),  # capped at the 60 frames there are
        (100.0, 33, 2, 32),
    ],
)
def test_frame_sampling_rule(media, fps, max_frames, min_frames, expected):
    clip = load_video(media["coded"], fps=fps, max_frames=max_frames, min_frames=min_frames)
    assert clip.frames.shape == (expected, SIZE, SIZE, 3)
    expected_indices = np.linspace(0, 59, expected).round().astype(int)
    assert clip.indices.tolist() == expected_indices.tolist()
    # The frames are really those source frames, in order.
    assert frame_codes(clip.frames) == expected_indices.tolist()
    assert clip.duration == pytest.approx(6.0)
    assert clip.fps == pytest.approx(expected / 6.0)


def test_frame_indices_by_hand(media):
    assert load_video(media["coded"], fps=0.5).indices.tolist() == [0, 20, 39, 59]
    assert load_video(media["coded"], fps=1.0).indices.tolist() == [0, 12, 24, 35, 47, 59]


def test_frame_factor_other_than_two(media):
    clip = load_video(media["coded"], fps=2.0, frame_factor=5, min_frames=1)
    assert len(clip.frames) == 10  # round(12 / 5) * 5
    clip = load_video(media["coded"], fps=100.0, frame_factor=7, min_frames=1)
    assert len(clip.frames) == 56  # 60 floored to a multiple of 7


def test_videos_shorter_than_frame_factor_repeat_frames(media):
    one = load_video(media["one_frame"])
    assert one.indices.tolist() == [0, 0] and frame_codes(one.frames) == [0, 0]
    three = load_video(media["three_frames"], fps=100.0)
    assert three.indices.tolist() == [0, 2] and frame_codes(three.frames) == [0, 2]


def test_truncated_mkv_yields_the_decodable_part(media):
    # Matroska does not declare its frame count, so a cut file just ends early: documented behaviour is to
    # return the part that decodes, with a duration that says how much that is.
    full = load_video(media["full_mkv"], fps=100.0)
    part = load_video(media["truncated_mkv"], fps=100.0)
    assert len(full.frames) == 40
    assert 2 <= len(part.frames) < 30
    # All decodable frames are taken, bar one when their count is odd (frame_factor=2).
    decodable = round(part.duration * 10)
    assert len(part.frames) in (decodable, decodable - 1)
    assert part.indices[-1] == decodable - 1
    assert np.array_equal(part.frames, full.frames[part.indices])


def test_load_image(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.bmp")
    assert np.array_equal(load_image(tmp_path / "grey.bmp"), np.repeat(grey[..., None], 3, axis=2))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image[0, 0].tolist() == [200, 0, 0] and image[3, 3].tolist() == [255, 255, 255]

    Image.fromarray(np.full((16, 16, 3), RED, np.uint8)).save(tmp_path / "red.jpg")
    image = load_image(tmp_path / "red.jpg")
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - RED).max() <= 3


BAD_INPUTS = [  # (fixture key, loader, problem the message must contain)
    ("missing", load_video, "file not found"),
    ("missing", load_audio, "file not found"),
    ("missing", probe, "file not found"),
    ("truncated_mp4", load_video, "not a readable media file"),
    ("truncated_mp4", load_audio, "not a readable media file"),
    ("truncated_faststart_mp4", load_video, "truncated"),
    ("truncated_avi", load_video, "truncated"),
    ("random_mp4", load_video, "not a readable media file"),
    ("random_mp4", probe, "not a readable media file"),
    ("silent_mp4", load_audio, "no audio track"),
    ("empty_wav", load_audio, "audio is empty (0 samples)"),
    ("xyz", load_video, "unsupported format '.xyz' (not audio or video FFmpeg can decode"),
    ("xyz", load_audio, "unsupported format '.xyz'"),
    ("text_wav", load_audio, "not a readable media file (Invalid data"),
    ("text_wav", probe, "not a readable media file"),
    ("text_noext", load_audio, "unsupported format 'notes' (not audio or video"),
    ("wav", load_video, "no video track"),
    ("m4a", load_video, "no video track"),
    ("cover_mp3", load_video, "no video track"),
    ("unknown_codec_wav", load_audio, "unsupported codec"),
    ("bad_png", load_image, "not a readable image"),
    ("bad_png", load_audio, "no audio track"),
    ("png", load_audio, "no audio track"),
    ("png", load_video, "an image (png_pipe), not a video"),
    ("mp4", load_image, "unsupported image format '.mp4' (Pillow cannot read it"),
]


@pytest.mark.parametrize(("key", "loader", "problem"), BAD_INPUTS, ids=[f"{k}-{f.__name__}" for k, f, _ in BAD_INPUTS])
def test_bad_input_raises_one_media_error(media, key, loader, problem):
    path = media[key]
    with pytest.raises(MediaError) as caught:
        loader(path)
    message = str(caught.value)
    assert path.name in message
    assert problem in message
    assert "\n" not in message
    assert caught.value.path == str(path)


@pytest.mark.parametrize("key", ["oga", "opus_oga", "wav_noext", "mp4_as_xyz"])
def test_media_are_judged_by_content_not_extension(media, key):
    audio = load_audio(media[key])
    assert audio.dtype == np.float32 and len(audio) == pytest.approx(16000 * SECONDS, rel=0.02)
    assert dominant_hz(audio, 16000) == pytest.approx(SINE_HZ, abs=5)
    assert probe(media[key]).has_audio


def test_decode_audio_reports_the_source_rate(media):
    track = decode_audio(media["oga"])
    assert (track.sampling_rate, track.source_rate) == (16000, 44100)
    assert track.seconds == pytest.approx(SECONDS, rel=0.02)


def test_video_and_image_by_content(media):
    clip = load_video(media["mp4_as_xyz"])
    assert clip.frames.shape[1:] == (SIZE, SIZE, 3) and clip.duration == pytest.approx(SECONDS, rel=0.05)
    image = load_image(media["png_as_dat"])
    assert image.shape == (16, 16, 3) and image[0, 0].tolist() == list(RED)


def test_cover_art_is_not_video(media):
    info = probe(media["cover_mp3"])
    assert (info.has_video, info.has_audio, info.video_codec) == (False, True, None)
    audio = load_audio(media["cover_mp3"])
    assert dominant_hz(audio, 16000) == pytest.approx(SINE_HZ, abs=5)


def test_probe_without_audio(media):
    info = probe(media["silent_mp4"])
    assert (info.has_video, info.has_audio, info.audio_codec) == (True, False, None)


# --------------------------------------------------------------------------------------------- vision


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (28, 28), (27, 29), (56, 3000), (4000, 3000), (480, 640), (1080, 1920), (10, 1999)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for min_pixels, max_pixels in [
        (56 * 56, 28 * 28 * 1280),
        (128 * 28 * 28, 768 * 28 * 28),
        (3136, 12845056),
    ]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            ours = smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours == hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(10, 2010)


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def hf_patches(images, **kwargs):
    out = Qwen2VLImageProcessorPil(**kwargs)(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


# (56, 56): no resize; (100, 37), (33, 500), (31, 67): odd sizes and aspect ratios; (20, 20): scaled up to
# min_pixels; (1200, 1000): scaled down to max_pixels.
IMAGE_SIZES = [(56, 56), (100, 37), (33, 500), (20, 20), (1200, 1000), (31, 67), (224, 448)]


def test_images_bit_identical_to_transformers():
    images = random_images(IMAGE_SIZES)
    # A smooth image too: noise alone would not catch an error that only shows on gradients.
    y, x = np.mgrid[0:90, 0:130]
    images.append(np.stack([x * 255 // 129, y * 255 // 89, (x + y) % 256], axis=-1).astype(np.uint8))
    ours, grid = VisionProcessor().images(images)
    theirs, their_grid = hf_patches(images)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert grid.dtype == np.int64 and np.array_equal(grid, their_grid)


def test_images_bit_identical_with_config():
    config = {  # Qwen2.5-Omni's preprocessor_config.json, with a smaller pixel budget to force resizing
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 8 * 28 * 28,
        "max_pixels": 64 * 28 * 28,
        "feature_size": 128,
        "chunk_length": 300,
    }
    processor = VisionProcessor.from_config(config)
    assert (processor.min_pixels, processor.max_pixels) == (8 * 28 * 28, 64 * 28 * 28)
    images = random_images(IMAGE_SIZES, seed=1)
    ours, grid = processor.images(images)
    theirs, their_grid = hf_patches(images, min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28)
    assert np.array_equal(ours, theirs) and np.array_equal(grid, their_grid)
    assert grid[:, 1:].prod(axis=1).max() <= 64 * 4  # the budget was applied


def test_vision_from_config_size_dict():
    processor = VisionProcessor.from_config({"size": {"shortest_edge": 1000, "longest_edge": 5000}, "patch_size": 16})
    assert (processor.min_pixels, processor.max_pixels, processor.patch_size) == (1000, 5000, 16)
    assert processor.temporal_patch_size == 2 and processor.patch_dim == 3 * 2 * 16 * 16


def test_video_of_frame_pairs_equals_image_patches():
    a, b, c = random_images([(50, 75)] * 3, seed=2)  # 50x75 is resized, to 56x84
    patches, grid = VisionProcessor().video(np.stack([a, a, b, b, c, c]))
    theirs, their_grid = hf_patches([a, b, c])
    assert grid.tolist() == [3, *their_grid[0, 1:].tolist()]
    assert np.array_equal(patches, theirs)


def test_video_temporal_slots_hold_their_frames():
    a, b = random_images([(90, 60)] * 2, seed=3)
    patches, grid = VisionProcessor().video(np.stack([a, b]))
    assert grid[0] == 1
    slots = patches.reshape(-1, 3, 2, 14, 14)
    patches_a = hf_patches([a])[0].reshape(-1, 3, 2, 14, 14)
    patches_b = hf_patches([b])[0].reshape(-1, 3, 2, 14, 14)
    assert np.array_equal(slots[:, :, 0], patches_a[:, :, 0])
    assert np.array_equal(slots[:, :, 1], patches_b[:, :, 0])
    assert not np.array_equal(slots[:, :, 0], slots[:, :, 1])


def test_video_odd_frame_count_repeats_last_frame():
    a, b, c = random_images([(56, 56)] * 3, seed=4)
    patches, grid = VisionProcessor().video(np.stack([a, b, c]))
    assert grid.tolist() == [2, 4, 4]
    assert np.array_equal(patches[16:], hf_patches([c])[0])


def test_decoded_clip_goes_through_vision(media):
    clip = load_video(media["mp4"], fps=1.0)
    patches, grid = VisionProcessor().video(clip.frames)
    assert grid.tolist() == [3, 4, 4]  # 6 frames, 64x64 -> 56x56
    assert patches.shape == (3 * 4 * 4, 1176)


# --------------------------------------------------------------------------------------------- audio


def test_features_equal_whisper_extractor():
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 12345)]
    features, mask = AudioProcessor().features(waves)
    reference = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300
    )
    expected = reference(
        waves,
        sampling_rate=16000,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert features.dtype == torch.float32 and features.shape == (2, 128, 30000)
    assert torch.equal(features, expected["input_features"])
    assert mask.dtype == torch.int64 and torch.equal(mask, expected["attention_mask"].long())
    assert mask.sum(dim=1).tolist() == [100, 78]


@pytest.mark.parametrize("hop_length", [160, 150])  # 150 does not divide the padded length
def test_n_frames_equals_mask_sum(hop_length):
    processor = AudioProcessor(chunk_length=1, hop_length=hop_length)
    lengths = [1, 149, 150, 151, 159, 160, 161, 12345, 15999, 16000, 25000, 32000]  # the last two: two windows
    _, mask = processor.features([np.full(n, 0.1, np.float32) for n in lengths])
    assert mask.sum(dim=1).tolist() == [processor.n_frames(n) for n in lengths]
    assert processor.n_frames(16000) == math.ceil(16000 / hop_length) - (16000 % hop_length != 0)


def test_audio_longer_than_the_window_is_kept_in_full():
    rng = np.random.default_rng(0)
    w40, w10, w12 = (0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (40, 10, 12))
    processor = AudioProcessor(chunk_length=10)
    features, mask = processor.features([w40, w10, w12])
    assert features.shape == (3, 128, 4000) and mask.sum(dim=1).tolist() == [4000, 1000, 1200]
    assert [processor.n_frames(len(w)) for w in (w40, w10, w12)] == [4000, 1000, 1200]
    reference = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=10)

    def extract(wave, **kwargs):
        out = reference([wave], sampling_rate=16000, return_attention_mask=True, return_tensors="pt", **kwargs)
        return out["input_features"][0], out["attention_mask"][0]

    # 40 s: what Qwen3-Omni's processor computes (padding to the longest, no truncation), bit for bit.
    expected, expected_mask = extract(w40, padding=True, truncation=False)
    assert torch.equal(features[0], expected) and torch.equal(mask[0], expected_mask.long())
    # 10 s: exactly the one-window features it always had (Qwen2.5-Omni's call); the rest of the row is padding.
    expected, _ = extract(w10, padding="max_length", truncation=True)
    assert torch.equal(features[1, :, :1000], expected) and not mask[1, 1000:].any()
    # 12 s: two windows' worth of padding, all 12 s valid.
    expected, _ = extract(w12, padding="max_length", max_length=320000, truncation=False)
    assert torch.equal(features[2, :, :2000], expected)


def test_audio_from_config_and_decoded_file(media):
    processor = AudioProcessor.from_config({"feature_size": 80, "chunk_length": 30, "patch_size": 14})
    assert (processor.feature_size, processor.chunk_length, processor.hop_length) == (80, 30, 160)
    audio = load_audio(media["wav"])
    features, mask = processor.features([audio])
    assert features.shape == (1, 80, 3000)
    assert int(mask.sum()) == processor.n_frames(len(audio)) == 600


def test_empty_waveform_is_a_media_error():
    with pytest.raises(MediaError, match=r"audio is empty \(0 samples\)"):
        AudioProcessor(chunk_length=1).features([np.ones(100, np.float32), np.zeros(0, np.float32)])
