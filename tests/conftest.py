"""Shared fixtures: tiny random models of every family (built from configs, no download) and media files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from avlens.models import Sample
from avlens.models.tiny import tiny_model

FAMILIES = ("qwen2.5-omni", "qwen3-omni", "qwen2.5-vl")


@pytest.fixture(scope="session")
def models():
    """family -> a 3-layer random model (cached for the session; tests must not change weights)."""
    torch.manual_seed(0)
    return {f: tiny_model(f, layers=3, hidden=64, seed=1) for f in FAMILIES}


@pytest.fixture(scope="session")
def omni(models):
    return models["qwen2.5-omni"]


def write_av(path: Path, seconds: float = 5.0, fps: int = 8, size=(112, 112), audio: bool = True, seed: int = 0):
    """Write an mp4 (H.264, and AAC mono 16 kHz unless audio=False) with random frames and a chirp."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = size[1], size[0], "yuv420p"
        a = None
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
        for _ in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8), format="rgb24")
            for p in v.encode(frame):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            x = (0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype(np.float32)
            for i in range(0, len(x), 1024):
                fr = av.AudioFrame.from_ndarray(x[None, i : i + 1024], format="flt", layout="mono")
                fr.sample_rate, fr.pts = 16000, i
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Paths of small media files: clip.mp4 (5 s, with audio), silent.mp4 (no audio), tone.wav, bad files."""
    d = tmp_path_factory.mktemp("media")
    out = {
        "clip": write_av(d / "clip.mp4", seconds=5.0, seed=1),
        "short": write_av(d / "short.mp4", seconds=2.0, seed=2),
        "silent": write_av(d / "silent.mp4", seconds=2.0, audio=False, seed=3),
    }
    t = np.arange(32000) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    out["wav"] = d / "tone.wav"
    sf.write(d / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    out["empty_wav"] = d / "empty.wav"
    data = out["clip"].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: int(len(data) * 0.4)])
    out["truncated"] = d / "truncated.mp4"
    (d / "notes.xyz").write_text("not media")
    out["unsupported"] = d / "notes.xyz"
    out["missing"] = d / "missing.mp4"
    return out


def av_samples(rng_seed: int = 0, n: int = 2, frames: int = 4, seconds: float = 2.0) -> list[Sample]:
    """In-memory samples (frames + waveform) of different lengths, so that the batch is padded."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for i in range(n):
        t = frames - 2 * (i % 2)
        video = rng.integers(0, 255, (t, 56, 84, 3), dtype=np.uint8)
        audio = (0.1 * rng.standard_normal(int(16000 * seconds * (1 - 0.25 * i)))).astype(np.float32)
        out.append(
            Sample(["what do you hear?", "what do you see", "describe the video"][i % 3], video=video, audio=audio)
        )
    return out


def v_samples(rng_seed: int = 0, n: int = 2) -> list[Sample]:
    rng = np.random.default_rng(rng_seed)
    return [
        Sample(
            "what do you see?" if i % 2 == 0 else "describe",
            video=rng.integers(0, 255, (4 - 2 * (i % 2), 56, 84, 3), dtype=np.uint8),
        )
        for i in range(n)
    ]


def samples_for(adapter, seed: int = 0, n: int = 2) -> list[Sample]:
    return av_samples(seed, n) if adapter.has_audio else v_samples(seed, n)


CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y chromium"


def screenshot(html_path: Path, tmp_path: Path, height: int = 3000) -> np.ndarray:
    """Render ``html_path`` in headless Chromium (Debian's); the screenshot as an (H, W, 3) uint8 array."""
    import subprocess

    from PIL import Image

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the report's screenshot tests need Debian's chromium ({INSTALL})")
    png = tmp_path / f"{html_path.stem}.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={png}",
        f"--window-size=1200,{height}",
        html_path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def count_colour(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    """Pixels of ``image`` (H, W, 3) within ``tolerance`` of ``rgb`` in every channel."""
    return int((np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def chunk_counts(layout) -> list[tuple[int, int]]:
    """(video tokens, audio tokens) of each interleaved chunk of a prepared batch's layout, in order."""
    chunks = sorted((n for n in layout.names if n.startswith("chunk")), key=lambda n: int(n[5:]))
    return [(int(layout.mask(f"{c}&video").sum()), int(layout.mask(f"{c}&audio").sum())) for c in chunks]
