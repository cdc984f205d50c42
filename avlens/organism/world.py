"""The procedurally generated audio-visual world of the avlens model organism.

Every clip shows one sound-making *thing* and plays the sound of one thing. In a *congruent* clip both are
the same class; in a *swapped* clip the sound comes from a class of another semantic group (see
:data:`LABEL_GROUPS`), which is what counterfactual analyses need.

Each class has a visual signature (shape, hue, texture, motion) and an audio signature (pitch range,
harmonic profile, envelope, noise band, rhythm). Classes are separable by hue alone, because a prototype
showed that a small vision encoder needs that (shape x colour family alone left it at 29% accuracy); the
shape, texture and motion are extra cues. Within a class, clips vary in size, position, hue (a little),
motion speed and phase, pitch, rhythm, loudness and background: a random colour gradient with
low-saturation clutter, and background noise at a random SNR in ``WorldConfig.snr_db``.

Randomness comes only from the seed: :func:`render_clip` splits ``np.random.default_rng(seed)`` into a
visual and an audio child generator, so a swapped clip with the same seed shows exactly the picture of
the congruent clip and only its sound differs.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from scipy import signal

from avlens.errors import InputError

__all__ = [
    "CLASSES",
    "LABEL_GROUPS",
    "WorldConfig",
    "contact_sheet",
    "render_audio",
    "render_clip",
    "render_visual",
    "unrelated",
    "write_clip",
    "write_world",
]

LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "animals": ("bird", "frog", "bee"),
    "machines": ("engine", "siren", "horn"),
    "instruments": ("bell", "drum", "gong"),
    "household": ("rain", "clock", "kettle"),
}
"""Semantic groups; a swapped clip pairs a picture and a sound from different groups."""

CLASSES: tuple[str, ...] = tuple(label for group in LABEL_GROUPS.values() for label in group)
"""All class labels, one lowercase English word each."""

_GROUP_OF = {label: group for group, labels in LABEL_GROUPS.items() for label in labels}


@dataclass(frozen=True)
class _Look:
    """Visual signature of a class."""

    hue: float  # degrees; one per class, 30 degrees apart, so hue alone tells classes apart
    shape: str
    texture: str
    motion: str


_LOOKS: dict[str, _Look] = {
    "drum": _Look(0, "hexagon", "rings", "pulse"),
    "gong": _Look(30, "ring", "stripes", "rotate"),
    "bell": _Look(60, "triangle", "solid", "sway"),
    "bee": _Look(90, "star", "stripes", "zigzag"),
    "frog": _Look(120, "ellipse", "dots", "bounce"),
    "kettle": _Look(150, "heart", "solid", "sway"),
    "rain": _Look(180, "bars", "stripes", "drift"),
    "bird": _Look(210, "crescent", "dots", "drift"),
    "engine": _Look(240, "square", "checker", "shake"),
    "horn": _Look(270, "cross", "checker", "orbit"),
    "clock": _Look(300, "circle", "checker", "rotate"),
    "siren": _Look(330, "diamond", "solid", "pulse"),
}
assert set(_LOOKS) == set(CLASSES)

HUE_JITTER = 5.0  # degrees; well under half the 30 degree spacing, so classes stay separable by hue


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and ranges of the world.

    Attributes:
        duration: clip length in seconds.
        height, width: frame size in pixels (even, for yuv420p).
        fps: frames per second written to the video file.
        sampling_rate: audio samples per second.
        snr_db: range of the signal-to-background-noise ratio of the audio, in dB.
        onset: range of the time, in seconds, at which the thing starts making its sound (drawn per clip);
            before it the track holds only the background noise. (0, 0): the sound plays from the start.
    """

    duration: float = 2.0
    height: int = 112
    width: int = 112
    fps: int = 8
    sampling_rate: int = 16000
    snr_db: tuple[float, float] = (5.0, 20.0)
    onset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise InputError(f"duration must be positive, got {self.duration}")
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise InputError(f"frame size must be even and >= 16, got {self.height}x{self.width}")
        if self.fps < 1 or self.sampling_rate < 8000:
            raise InputError(f"fps must be >= 1 and sampling_rate >= 8000, got {self.fps}, {self.sampling_rate}")
        lo, hi = self.snr_db
        if lo > hi:
            raise InputError(f"snr_db must be (low, high), got {self.snr_db}")
        # a JSON round trip gives a list; keep the field hashable and comparable
        object.__setattr__(self, "snr_db", (float(lo), float(hi)))
        start, stop = self.onset
        if not 0 <= start <= stop < self.duration:
            raise InputError(f"onset must be (low, high) within [0, duration), got {self.onset}")
        object.__setattr__(self, "onset", (float(start), float(stop)))

    @property
    def n_frames(self) -> int:
        return round(self.duration * self.fps)

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sampling_rate)


def unrelated(a: str, b: str) -> bool:
    """Whether labels ``a`` and ``b`` belong to different :data:`LABEL_GROUPS`."""
    return _group(a) != _group(b)


def _group(label: str) -> str:
    try:
        return _GROUP_OF[label]
    except KeyError:
        raise InputError(f"unknown label {label!r}; the world has {', '.join(CLASSES)}") from None


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in object coordinates, where the object fits the unit disc.

    Args:
        u, v: float arrays of any (equal) shape; x to the right, y downwards.

    Returns:
        bool array of the same shape.
    """
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)

    def polygon(k: int) -> np.ndarray:
        # regular k-gon with circumradius 1: distance along the sector's normal <= apothem
        phi = np.mod(theta + np.pi / 2, 2 * np.pi / k) - np.pi / k
        return r * np.cos(phi) <= np.cos(np.pi / k)

    if shape == "circle":
        return r <= 0.9
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return polygon(3)
    if shape == "hexagon":
        return polygon(6)
    if shape == "star":
        # radius swings between 0.45 and 1 five times around the centre
        phi = np.mod(theta + np.pi / 2, 2 * np.pi / 5) / (2 * np.pi / 5)
        return r <= 0.45 + 0.55 * np.abs(2 * phi - 1) ** 1.5
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
    if shape == "bars":
        return (np.abs(v) <= 0.85) & (np.abs(u) <= 0.85) & (np.mod(u + 0.85, 0.65) <= 0.4)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.5, v) >= 0.8)
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.25  # the implicit heart curve, scaled into the unit disc
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Brightness factor of the object's surface, 1 or 0.55 (the hue stays the same).

    Args:
        u, v: object coordinates, float arrays of equal shape.
        freq: pattern cells per unit of object radius.

    Returns:
        float32 array of the same shape.
    """
    if texture == "solid":
        dark = np.zeros(u.shape, bool)
    elif texture == "stripes":
        dark = np.mod(np.floor(u * freq), 2) == 1
    elif texture == "checker":
        dark = np.mod(np.floor(u * freq) + np.floor(v * freq), 2) == 1
    elif texture == "dots":
        du, dv = np.mod(u * freq, 1) - 0.5, np.mod(v * freq, 1) - 0.5
        dark = du * du + dv * dv <= 0.09
    elif texture == "rings":
        dark = np.mod(np.floor(np.hypot(u, v) * freq * 1.5), 2) == 1
    else:
        raise ValueError(f"unknown texture {texture}")
    return np.where(dark, np.float32(0.55), np.float32(1.0))


def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave of period 1 between -1 and 1."""
    return 4 * np.abs(np.mod(x, 1) - 0.5) - 1


def _motion(
    motion: str, t: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Trajectory of the object.

    Args:
        t: (T,) frame times in seconds.

    Returns:
        dx, dy: (T,) offsets from the rest position in object radii; angle: (T,) rotation in radians
        (added to the clip's base angle); scale: (T,) size factor.
    """
    f = rng.uniform(0.6, 1.4)  # speed multiplier
    phase = rng.uniform(0, 1)
    zero, one = np.zeros_like(t), np.ones_like(t)
    w = 2 * np.pi * (t * f * 0.5 + phase)  # one cycle per two seconds at f = 1
    if motion == "bounce":
        return zero, -1.1 * np.abs(np.sin(2 * w)) + 0.5, zero, one
    if motion == "rotate":
        return zero, zero, rng.choice([-1, 1]) * w, one
    if motion == "pulse":
        return zero, zero, zero, 1 + 0.25 * np.sin(3 * w)
    if motion == "sway":
        return 0.15 * np.sin(2 * w), zero, 0.55 * np.sin(2 * w), one
    if motion == "drift":
        angle = rng.uniform(0, 2 * np.pi)  # back and forth along a random direction
        s = 0.9 * _tri(w / (2 * np.pi))
        return s * np.cos(angle), s * np.sin(angle), zero, one
    if motion == "zigzag":
        return 0.9 * _tri(w / (2 * np.pi)), 0.35 * np.sin(4 * w), zero, one
    if motion == "orbit":
        return 0.7 * np.cos(w), 0.7 * np.sin(w), zero, one
    if motion == "shake":
        jitter = rng.normal(0, 0.12, (3, len(t)))
        return jitter[0], jitter[1], 1.5 * jitter[2], one
    raise ValueError(f"unknown motion {motion}")


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg / 360) % 1, s, v), np.float32) * 255


_CLUTTER_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")


def _background(rng: np.random.Generator, h: int, w: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A random two-colour gradient with 4-7 small, low-saturation distractor shapes.

    Returns:
        float32 (H, W, 3) in 0..255.
    """
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.95))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.95))
    a = rng.uniform(0, 2 * np.pi)
    g = (xs / w - 0.5) * np.cos(a) + (ys / h - 0.5) * np.sin(a)  # position along a random direction
    g = ((g - g.min()) / (g.max() - g.min()))[..., None]
    bg = (1 - g) * c0 + g * c1
    size = min(h, w)
    for _ in range(rng.integers(4, 8)):
        r = rng.uniform(0.04, 0.09) * size
        cx, cy, ang = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi)
        u = ((xs - cx) * np.cos(ang) + (ys - cy) * np.sin(ang)) / r
        v = (-(xs - cx) * np.sin(ang) + (ys - cy) * np.cos(ang)) / r
        mask = _shape_mask(str(rng.choice(_CLUTTER_SHAPES)), u, v)
        bg[mask] = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.15, 1.0))
    return bg


def render_visual(label: str, rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """Draw the picture track of one thing of class ``label``.

    Returns:
        uint8 (T, H, W, 3) RGB frames, T = round(duration * fps).
    """
    _group(label)  # unknown labels are an InputError
    look = _LOOKS[label]
    h, w, n = cfg.height, cfg.width, cfg.n_frames
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    bg = _background(rng, h, w, ys, xs)

    size = min(h, w)
    radius = rng.uniform(0.2, 0.3) * size
    margin = 1.6 * radius  # rest position leaves room for the motion
    cx0, cy0 = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    color = _hsv(look.hue + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    base_angle = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(2.2, 3.2)
    t = np.arange(n) / cfg.fps
    dx, dy, dangle, scale = _motion(look.motion, t, rng)

    # keep at least most of the object inside the frame whatever the motion does
    cx = np.clip(cx0 + dx * radius, 0.8 * radius, w - 0.8 * radius)
    cy = np.clip(cy0 + dy * radius, 0.8 * radius, h - 0.8 * radius)
    frames = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        ca, sa = np.cos(base_angle + dangle[i]), np.sin(base_angle + dangle[i])
        r = radius * scale[i]
        u = ((xs - cx[i]) * ca + (ys - cy[i]) * sa) / r
        v = (-(xs - cx[i]) * sa + (ys - cy[i]) * ca) / r
        mask = _shape_mask(look.shape, u, v)
        frames[i] = bg
        frames[i][mask] = color * _texture(look.texture, u[mask], v[mask], freq)[:, None]
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Sounds
# ---------------------------------------------------------------------------------------------------------


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float, sr: int) -> np.ndarray:
    """White noise band-passed to lo..hi Hz, unit RMS, (n,) float64."""
    sos = signal.butter(4, [lo, min(hi, 0.45 * sr)], btype="bandpass", fs=sr, output="sos")
    x = signal.sosfilt(sos, rng.standard_normal(n))
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _onsets(rng: np.random.Generator, duration: float, rate: float, jitter: float = 0.1) -> np.ndarray:
    """Roughly regular event times at ``rate`` per second with a random phase, (k,) seconds."""
    period = 1 / rate
    times = np.arange(rng.uniform(0, period), duration, period)
    return np.clip(times + rng.normal(0, jitter * period, len(times)), 0, None)


def _events(t: np.ndarray, onsets: np.ndarray, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Time since the latest onset and whether an event of ``length`` s is sounding, both (n,)."""
    # before the first onset, "a long time ago" (finite, so that sin(since) * exp(-since) stays 0)
    if len(onsets) == 0:
        return np.full_like(t, 1e3), np.zeros(t.shape, bool)
    idx = np.searchsorted(onsets, t, side="right") - 1
    since = np.where(idx >= 0, t - onsets[np.maximum(idx, 0)], 1e3)
    return since, since < length


def _harmonics(phase: np.ndarray, amps: list[float] | np.ndarray, ratios: list[float] | None = None) -> np.ndarray:
    """Sum of sines at multiples (or given ratios) of a running phase (radians), (n,)."""
    ratios = list(range(1, len(amps) + 1)) if ratios is None else ratios
    return sum(a * np.sin(k * phase) for a, k in zip(amps, ratios, strict=True))


def _synth(label: str, rng: np.random.Generator, t: np.ndarray, sr: int, dur: float) -> np.ndarray:
    """The clean sound of one thing of class ``label`` (any scale), (n,) float64."""
    n = len(t)
    pitch = rng.uniform(0.9, 1.1)  # within-class pitch jitter, multiplies the class's base frequency
    rate = rng.uniform(0.8, 1.25)  # within-class rhythm jitter
    if label == "bell":  # inharmonic partials, percussive decay, a strike every ~0.8 s
        f0 = 800 * pitch
        since, _ = _events(t, _onsets(rng, dur, 1.2 * rate, 0.05), dur)
        parts = [(1.0, 1.0, 0.7), (2.0, 0.6, 0.45), (2.76, 0.5, 0.3), (4.07, 0.3, 0.2), (5.4, 0.2, 0.12)]
        x = sum(a * np.sin(2 * np.pi * f0 * k * since) * np.exp(-since / tau) for k, a, tau in parts)
        return x + 0.3 * _band_noise(rng, n, 3000, 6000, sr) * np.exp(-since / 0.01)
    if label == "drum":  # low thump with a falling pitch and a noise slap, 3-5 hits per second
        since, _ = _events(t, _onsets(rng, dur, 4 * rate, 0.05), dur)
        f = 90 * pitch * (1 + 0.8 * np.exp(-since / 0.03))
        phase = 2 * np.pi * np.cumsum(f) / sr
        return np.sin(phase) * np.exp(-since / 0.12) + 0.5 * _band_noise(rng, n, 150, 1200, sr) * np.exp(-since / 0.03)
    if label == "gong":  # dense low inharmonic partials, one or two long-ringing strikes, shimmer
        f0 = 140 * pitch
        since, _ = _events(t, _onsets(rng, dur, 0.6 * rate, 0.1), dur)
        ratios = [1.0, 1.48, 1.93, 2.44, 2.93, 3.61, 4.3]
        x = sum(np.sin(2 * np.pi * f0 * k * since + rng.uniform(0, 2 * np.pi)) / k**0.5 for k in ratios) * np.exp(
            -since / 1.2
        )
        shimmer = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
        return x * shimmer + 0.15 * _band_noise(rng, n, 300, 1500, sr) * np.exp(-since / 0.5)
    if label == "bird":  # fast downward chirps around 3 kHz in bursts
        since, on = _events(t, _onsets(rng, dur, 7 * rate, 0.2), 0.07)
        f = 3200 * pitch - 12000 * np.minimum(since, 0.07)
        phase = 2 * np.pi * np.cumsum(f) / sr
        env = on * np.sin(np.pi * np.minimum(since, 0.07) / 0.07) ** 2
        return env * (np.sin(phase) + 0.25 * np.sin(2 * phase)) + 0.03 * _band_noise(rng, n, 2000, 5000, sr)
    if label == "frog":  # buzzy low croaks: a 30 Hz pulse train over a 300 Hz tone, ~2 croaks per second
        since, on = _events(t, _onsets(rng, dur, 2 * rate, 0.1), 0.25)
        phase = 2 * np.pi * 300 * pitch * t
        pulses = np.maximum(np.sin(2 * np.pi * 30 * rate * t), 0) ** 3
        env = on * np.sin(np.pi * np.minimum(since, 0.25) / 0.25)
        return env * pulses * _harmonics(phase, [1, 0.7, 0.5, 0.3])
    if label == "bee":  # sustained sawtooth buzz with vibrato
        f = 220 * pitch * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(5, 8) * t))
        phase = 2 * np.pi * np.cumsum(f) / sr
        x = _harmonics(phase, 1 / np.arange(1, 16))
        return x * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t)) + 0.3 * _band_noise(rng, n, 150, 1500, sr)
    if label == "engine":  # low rich rumble with firing-rate tremolo and low noise
        f0 = 45 * pitch
        phase = 2 * np.pi * f0 * t
        x = _harmonics(phase, 1 / np.arange(1, 21) ** 0.7)
        tremolo = 1 + 0.6 * np.sin(2 * np.pi * f0 / 2 * t)
        return x * tremolo + 1.0 * _band_noise(rng, n, 50, 400, sr)
    if label == "siren":  # pure-ish wailing tone sweeping 600-1300 Hz
        f = 950 * pitch + 330 * np.sin(2 * np.pi * 0.8 * rate * t + rng.uniform(0, 2 * np.pi))
        phase = 2 * np.pi * np.cumsum(f) / sr
        return _harmonics(phase, [1, 0, 0.2])
    if label == "horn":  # brassy harmonic stack around 380 Hz in one or two long blasts
        phase = 2 * np.pi * 380 * pitch * t
        since, on = _events(t, _onsets(rng, dur, 0.9 * rate, 0.1), 0.7)
        env = on * np.minimum(1, np.minimum(since, 0.7 - since) / 0.03)
        return env * _harmonics(phase, 1 / np.arange(1, 11) ** 0.6)
    if label == "rain":  # broadband hiss plus random droplet pings
        drops = np.zeros(n)
        drops[rng.integers(0, n, int(30 * rate * dur))] = rng.uniform(0.5, 1.5, int(30 * rate * dur))
        ping = np.exp(-np.arange(int(0.004 * sr)) / (0.001 * sr)) * np.sin(
            2 * np.pi * 4500 * pitch * np.arange(int(0.004 * sr)) / sr
        )
        return _band_noise(rng, n, 800 * pitch, 6000, sr) + 3 * np.convolve(drops, ping)[:n]
    if label == "clock":  # alternating high tick and lower tock, 2-3 per second
        onsets = _onsets(rng, dur, 2.5 * rate, 0.02)
        x = np.zeros(n)
        for j, o in enumerate(onsets):
            since = t - o
            f = (2800 if j % 2 == 0 else 1900) * pitch
            x += np.where(since >= 0, np.sin(2 * np.pi * f * since) * np.exp(-np.maximum(since, 0) / 0.008), 0)
        return x
    if label == "kettle":  # high whistle with breath noise, swelling and rising in pitch
        f = 2200 * pitch * (1 + 0.05 * t / dur) * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 7) * t))
        phase = 2 * np.pi * np.cumsum(f) / sr
        swell = np.minimum(1, (t + rng.uniform(0.2, 1.0)) / dur)
        return swell * (np.sin(phase) + 0.4 * _band_noise(rng, n, 1800 * pitch, 2700 * pitch, sr))
    raise AssertionError(label)


def _background_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Coloured noise with a random spectral tilt (white to brownish), unit RMS, (n,)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(len(spec), dtype=np.float64)
    freqs[0] = 1
    spec *= freqs ** (-rng.uniform(0, 0.8))
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def render_audio(label: str, rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """Synthesise the sound track of one thing of class ``label``, with background noise.

    Returns:
        float32 (n,) mono at ``cfg.sampling_rate``, n = round(duration * sampling_rate), peak <= 0.99.
    """
    return _render_audio(label, rng, cfg)[0]


def _render_audio(label: str, rng: np.random.Generator, cfg: WorldConfig) -> tuple[np.ndarray, float]:
    """:func:`render_audio` and the sound's onset in seconds."""
    _group(label)  # unknown labels are an InputError
    sr, n = cfg.sampling_rate, cfg.n_samples
    t = np.arange(n) / sr
    clean = _synth(label, rng, t, sr, cfg.duration)
    onset = 0.0
    if cfg.onset[1] > 0:  # the sound starts late: silent before the onset, with a 20 ms fade-in
        onset = float(rng.uniform(*cfg.onset))
        clean = clean * np.clip((t - onset) / 0.02, 0, 1)
    clean = clean / (np.sqrt(np.mean(clean * clean)) + 1e-12)
    snr_db = rng.uniform(*cfg.snr_db)
    x = clean + _background_noise(rng, n) * 10 ** (-snr_db / 20)
    peak = rng.uniform(0.3, 0.95)  # loudness varies between clips
    return (x * (peak / np.max(np.abs(x)))).astype(np.float32), onset


def render_clip(
    visual_label: str, audio_label: str, seed: int, cfg: WorldConfig = WorldConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Render one clip, deterministically from ``seed``.

    The visual and audio tracks use separate child generators of ``default_rng(seed)``, so clips with
    the same seed and visual label show the same picture whatever their audio label, and vice versa.

    Returns:
        frames: uint8 (T, H, W, 3); audio: float32 (n,).
    """
    return _render_clip(visual_label, audio_label, seed, cfg)[:2]


def _render_clip(
    visual_label: str, audio_label: str, seed: int, cfg: WorldConfig
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`render_clip` and the time, in seconds, its sound starts (0.0 when it plays from the start)."""
    _group(visual_label)
    _group(audio_label)
    visual_rng, audio_rng = np.random.default_rng(seed).spawn(2)
    audio, onset = _render_audio(audio_label, audio_rng, cfg)
    return render_visual(visual_label, visual_rng, cfg), audio, onset


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


# BT.601 limited range, what decoders assume for video without colour metadata: offset, then R, G, B weights
_RGB_TO_YUV = (
    (16.0, 65.481 / 255, 128.553 / 255, 24.966 / 255),
    (128.0, -37.797 / 255, -74.203 / 255, 112.0 / 255),
    (128.0, 112.0 / 255, -93.786 / 255, -18.214 / 255),
)


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H * 3 / 2, W) planar Y, U, V with chroma averaged over 2x2 pixels."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    # elementwise arithmetic rather than a matrix product, so no BLAS kernel can change the rounding
    y, u, v = (c0 + cr * r + cg * g + cb * b for c0, cr, cg, cb in _RGB_TO_YUV)
    u, v = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return np.clip(np.round(planes), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_clip(path_stem: Path, frames: np.ndarray, audio: np.ndarray, cfg: WorldConfig) -> tuple[Path, Path]:
    """Write ``<stem>.mp4`` (H.264 + AAC, 16 kHz mono) and ``<stem>.wav`` (PCM_16) of one clip.

    The same input gives the same bytes: x264 runs single-threaded and without macroblock-tree rate
    control (with it, about one short clip in three came out different from run to run), the container
    is written bit-exact (no timestamps or version strings), and RGB is converted to YUV here with plain
    numpy arithmetic rather than by swscale, whose SIMD code paths depend on the machine.

    Args:
        frames: uint8 (T, H, W, 3) RGB.
        audio: float32 (n,) in -1..1.

    Returns:
        (mp4 path, wav path).
    """
    path_stem = Path(path_stem)
    mp4, wav = path_stem.with_name(path_stem.name + ".mp4"), path_stem.with_name(path_stem.name + ".wav")
    frames = np.ascontiguousarray(frames, np.uint8)
    audio = np.asarray(audio, np.float32)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise InputError(f"frames must be (T, H, W, 3) with even H, W, got {frames.shape}", path=str(mp4))
    if audio.ndim != 1:
        raise InputError(f"audio must be mono (n,), got {audio.shape}", path=str(wav))
    sr = cfg.sampling_rate
    sf.write(wav, audio, sr, subtype="PCM_16")

    x264 = {"threads": "1", "x264-params": "mbtree=0", "crf": "18", "preset": "fast"}
    with av.open(str(mp4), "w", format="mp4", container_options={"fflags": "+bitexact"}) as out:
        video = out.add_stream("libx264", rate=cfg.fps, options=x264)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = out.add_stream("aac", rate=sr, layout="mono")
        sound.bit_rate = 64000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(rgb), format="yuv420p")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        chunk = 1024  # the AAC frame size
        for start in range(0, len(audio), chunk):
            frame = av.AudioFrame.from_ndarray(audio[None, start : start + chunk], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sr, start
            out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
    return mp4, wav


def _clip_seed(seed: int, i: int) -> int:
    """A 53-bit seed for clip ``i`` of world ``seed`` (fits exactly in a JSON number)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(11))


def _plan(n: int, seed: int, swapped_share: float) -> list[dict]:
    """Labels, condition and seed of every clip: visual labels cycle through the shuffled classes, a
    ``swapped_share`` of clips (spread at random) gets the sound of an unrelated class, chosen among the
    least used so far so that audio labels stay balanced too."""
    rng = np.random.default_rng(seed)
    order = [CLASSES[j] for j in rng.permutation(len(CLASSES))]
    n_swapped = round(n * swapped_share)
    swapped = np.zeros(n, bool)
    swapped[rng.permutation(n)[:n_swapped]] = True
    audio_count = dict.fromkeys(CLASSES, 0)
    rows = []
    for i in range(n):
        visual = order[i % len(order)]
        if swapped[i]:
            candidates = [c for c in CLASSES if unrelated(c, visual)]
            least = min(audio_count[c] for c in candidates)
            audio = str(rng.choice([c for c in candidates if audio_count[c] == least]))
        else:
            audio = visual
        audio_count[audio] += 1
        rows.append(
            {
                "visual_label": visual,
                "audio_label": audio,
                "condition": "swapped" if swapped[i] else "congruent",
                "seed": _clip_seed(seed, i),
            }
        )
    return rows


def write_world(
    out: Path,
    n: int,
    seed: int,
    *,
    cfg: WorldConfig = WorldConfig(),
    swapped_share: float = 0.0,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``n`` clips under ``out/clips/``, ``out/manifest.jsonl`` and ``out/world.json``.

    Each manifest line has ``id``, ``video`` and ``audio`` (paths relative to ``out``), ``audio_label``,
    ``visual_label``, ``condition`` ("congruent" or "swapped") and ``seed`` (for :func:`render_clip`); with a
    late sound (``cfg.onset`` above 0) also ``audio_onset``, the time in seconds its sound starts.
    The same (n, seed, cfg, swapped_share) gives the same files. By default every clip is congruent (its sound
    and picture of one class): counterfactual variants, swapped clips among them, are what
    :func:`avlens.data.counterfactual` builds, and it keeps a world's own swapped clips swapped.

    Clips are rendered and encoded by ``workers`` processes (default: one per available core); each clip's
    bytes depend only on its own seed, so the files are the same for any number of workers.

    Args:
        progress: called with the number of clips written so far, after each clip.
        workers: processes to use (1: write in this process).

    Returns:
        the manifest path.

    Raises:
        InputError: bad parameters, or ``out`` already holds a world made with other parameters.
    """
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    if not 0 <= swapped_share <= 1:
        raise InputError(f"swapped_share must be in 0..1, got {swapped_share}")
    out = Path(out)
    manifest, world_json = out / "manifest.jsonl", out / "world.json"
    params = json.loads(
        json.dumps(
            {
                "config": asdict(cfg),
                "classes": CLASSES,
                "label_groups": LABEL_GROUPS,
                "seed": seed,
                "n": n,
                "swapped_share": swapped_share,
            }
        )
    )
    if manifest.exists():
        try:
            old = json.loads(world_json.read_text())
        except (OSError, ValueError):
            old = None
        if old != params:
            raise InputError("holds a world made with other parameters; use another directory", path=str(out))

    (out / "clips").mkdir(parents=True, exist_ok=True)
    world_json.write_text(json.dumps(params, indent=2) + "\n")
    jobs = [(out, f"clip_{i:06d}", row, cfg) for i, row in enumerate(_plan(n, seed, swapped_share))]
    lines = []
    with _pool(workers if workers is not None else _cores(), len(jobs)) as pool:
        for line in pool.map(_write_row, jobs, chunksize=8):
            lines.append(line)
            if progress is not None:
                progress(len(lines))
    # write the manifest last and atomically: its presence means the world is complete
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(manifest)
    return manifest


def _write_row(job: tuple[Path, str, dict, WorldConfig]) -> str:
    """Render and write one clip of a world; its manifest line."""
    out, clip_id, row, cfg = job
    frames, audio, onset = _render_clip(row["visual_label"], row["audio_label"], row["seed"], cfg)
    mp4, wav = write_clip(out / "clips" / clip_id, frames, audio, cfg)
    entry = {"id": clip_id, "video": mp4.relative_to(out).as_posix(), "audio": wav.relative_to(out).as_posix()}
    if cfg.onset[1] > 0:  # (only then: the manifests of worlds without late sounds stay as they were)
        entry["audio_onset"] = round(onset, 4)
    return json.dumps(entry | row)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool(workers: int, jobs: int) -> Executor:
    """A process pool of ``workers`` (forked on Linux, where the children need no fresh imports), or an
    in-process executor when one worker is enough."""
    workers = max(1, min(workers, jobs))
    if workers == 1:
        return _InProcess()
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


class _InProcess(Executor):
    """An executor that runs each call in this process, lazily and in order."""

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return map(fn, *iterables)


def contact_sheet(path: Path, *, seed: int = 0, cfg: WorldConfig = WorldConfig(), scale: int = 2) -> Path:
    """Save a PNG with one labelled frame of every class, for looking at the world.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    h, w = cfg.height * scale, cfg.width * scale
    cols = 6
    rows = math.ceil(len(CLASSES) / cols)
    sheet = Image.new("RGB", (cols * w, rows * (h + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, label in enumerate(CLASSES):
        frames, _ = render_clip(label, label, seed + k, cfg)
        tile = Image.fromarray(frames[len(frames) // 2]).resize((w, h), Image.NEAREST)
        x, y = (k % cols) * w, (k // cols) * (h + 14)
        sheet.paste(tile, (x, y + 14))
        draw.text((x + 3, y + 1), f"{label} ({_group(label)})", fill="black")
    sheet.save(path)
    return Path(path)
