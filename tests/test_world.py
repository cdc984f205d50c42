"""Tests of the procedurally generated audio-visual world (avlens.organism.world)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from scipy import signal

from avlens.errors import InputError
from avlens.organism.world import (
    CLASSES,
    LABEL_GROUPS,
    WorldConfig,
    render_audio,
    render_clip,
    render_visual,
    unrelated,
    write_clip,
    write_world,
)

CFG = WorldConfig()
SMALL = WorldConfig(duration=0.5, height=32, width=48, fps=8)  # for tests that only need many files


def test_classes_and_groups():
    assert len(CLASSES) >= 12 and len(set(CLASSES)) == len(CLASSES)
    assert all(c.isalpha() and c.islower() for c in CLASSES)
    assert 3 <= len(LABEL_GROUPS) <= 4
    grouped = [c for labels in LABEL_GROUPS.values() for c in labels]
    assert sorted(grouped) == sorted(CLASSES)  # the groups partition the classes
    assert not unrelated("bird", "frog") and unrelated("bird", "bell") and unrelated("bell", "bird")
    with pytest.raises(InputError, match="unknown label"):
        unrelated("bird", "unicorn")
    with pytest.raises(InputError, match="unknown label"):
        render_clip("unicorn", "bird", 0, CFG)


def test_config_rejects_odd_sizes():
    with pytest.raises(InputError):
        WorldConfig(height=111)
    with pytest.raises(InputError):
        WorldConfig(duration=0)


def test_render_shapes_and_ranges():
    cfg = WorldConfig(duration=1.5, height=64, width=96, fps=10, sampling_rate=16000)
    for label in CLASSES:
        frames, audio = render_clip(label, label, 3, cfg)
        assert frames.shape == (15, 64, 96, 3) and frames.dtype == np.uint8
        assert audio.shape == (24000,) and audio.dtype == np.float32
        assert np.all(np.isfinite(audio)) and 0.1 < np.abs(audio).max() <= 0.99
        assert not np.array_equal(frames[0], frames[-1]), f"{label} does not move"


def test_render_clip_is_deterministic_and_seeded():
    a = render_clip("bell", "bell", 7, CFG)
    b = render_clip("bell", "bell", 7, CFG)
    c = render_clip("bell", "bell", 8, CFG)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    # a swapped clip with the same seed shares the picture of the congruent clip and the sound of the
    # congruent clip of its audio label (a shaking engine draws more random numbers than a swaying bell,
    # so this also checks that the two tracks use separate generators)
    swapped = render_clip("engine", "bell", 7, CFG)
    assert np.array_equal(swapped[0], render_clip("engine", "engine", 7, CFG)[0])
    assert np.array_equal(swapped[1], a[1])
    # the track renderers draw only from the generator they are given
    for render in (render_visual, render_audio):
        first = render("gong", np.random.default_rng(1), CFG)
        assert np.array_equal(first, render("gong", np.random.default_rng(1), CFG))
        assert not np.array_equal(first, render("gong", np.random.default_rng(2), CFG))


def test_snr_controls_background_noise():
    """A siren's energy sits in its sweep band when the noise is faint, much less so at low SNR."""

    def in_band(snr: float) -> float:
        audio = render_audio("siren", np.random.default_rng(0), WorldConfig(snr_db=(snr, snr)))
        freqs, power = signal.welch(audio, fs=16000, nperseg=1024)
        return power[(freqs > 500) & (freqs < 1600)].sum() / power.sum()

    assert in_band(60.0) > 0.95
    assert in_band(0.0) < 0.7


@pytest.mark.parametrize("label", CLASSES)
def test_a_late_sound_is_only_background_before_its_onset(label):
    """With ``onset`` the thing starts sounding at the drawn time: before it the track is the background noise
    alone, after it the sound is there."""
    cfg = WorldConfig(duration=3.0, onset=(1.0, 1.0), snr_db=(20.0, 20.0))
    audio = render_audio(label, np.random.default_rng(3), cfg)
    before, after = audio[: 16000 - 400], audio[16000 + 400 :]
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    assert rms(before) < 0.3 * rms(after)  # 20 dB of SNR: the background is about 10% of the sound
    assert rms(before) > 0  # the background plays throughout
    with pytest.raises(InputError):
        WorldConfig(duration=2.0, onset=(0.5, 2.0))


def test_a_world_with_late_sounds_records_each_onset(tmp_path):
    """``audio_onset`` in the manifest is when the clip's sound starts: in the drawn range, different per clip, and
    the written track is background alone before it (a 1 s interleaved chunk of a 3 s clip can be told silent)."""
    cfg = WorldConfig(duration=3.0, onset=(0.5, 2.0), snr_db=(20.0, 20.0))
    manifest = write_world(tmp_path / "late", 6, seed=4, cfg=cfg, workers=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    onsets = [r["audio_onset"] for r in rows]
    assert all(0.5 <= o <= 2.0 for o in onsets) and len(set(onsets)) == len(onsets)
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    for row in rows:
        audio, sr = sf.read(manifest.parent / row["audio"], dtype="float32")
        cut = round(row["audio_onset"] * sr)
        before, after = audio[: cut - 400], audio[cut + 400 :]
        assert rms(before) < 0.3 * rms(after), row["id"]
    plain = write_world(tmp_path / "plain", 2, seed=4, cfg=WorldConfig(duration=3.0), workers=1)
    assert all("audio_onset" not in json.loads(line) for line in plain.read_text().splitlines())


def _decode(mp4: Path) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Stream (type, codec) pairs, decoded RGB frames (T, H, W, 3) and decoded mono audio (n,) of a file."""
    with av.open(str(mp4)) as container:
        streams = [(s.type, s.codec_context.name) for s in container.streams]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(mp4)) as container:
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        audio = np.concatenate([f.to_ndarray().reshape(channels, -1)[0] for f in container.decode(audio=0)])
    assert rate == 16000 and channels == 1
    return streams, frames, audio


def test_clip_files_round_trip(tmp_path):
    frames, audio = render_clip("siren", "drum", 5, CFG)
    mp4, wav = write_clip(tmp_path / "c", frames, audio, CFG)
    assert (mp4.name, wav.name) == ("c.mp4", "c.wav")

    wav_audio, rate = sf.read(wav, dtype="float32")
    assert rate == 16000 and sf.info(wav).subtype == "PCM_16"
    assert np.abs(wav_audio - audio).max() < 1e-4

    streams, decoded, aac = _decode(mp4)
    assert streams == [("video", "h264"), ("audio", "aac")]
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 12

    # AAC may add priming/padding samples: align by cross-correlation before comparing
    xc = signal.correlate(aac, wav_audio, mode="full", method="fft")
    lag = int(np.argmax(xc)) - (len(wav_audio) - 1)
    assert abs(lag) <= 2048
    aligned = aac[max(lag, 0) : max(lag, 0) + len(wav_audio) - max(-lag, 0)]
    reference = wav_audio[max(-lag, 0) : max(-lag, 0) + len(aligned)]
    assert len(aligned) > 0.9 * len(wav_audio)
    assert np.corrcoef(aligned, reference)[0, 1] > 0.9


def test_write_world_is_deterministic(tmp_path):
    # one world in a fresh process, one here: a first encode in a process once came out different; one written
    # in that process alone, one by two worker processes: the bytes must not depend on the number of workers
    script = "import sys; from pathlib import Path; from avlens.organism.world import write_world; "
    script += "write_world(Path(sys.argv[1]), 6, seed=11, workers=1)"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], check=True, cwd=root, timeout=60)
    m1 = tmp_path / "a" / "manifest.jsonl"
    calls = []
    m2 = write_world(tmp_path / "b", 6, seed=11, progress=calls.append, workers=2)
    assert calls == [1, 2, 3, 4, 5, 6]
    assert m1.read_text() == m2.read_text()
    rows = [json.loads(line) for line in m1.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for key in ("video", "audio"):
            a, b = tmp_path / "a" / row[key], tmp_path / "b" / row[key]
            assert a.read_bytes() == b.read_bytes(), f"{row[key]} differs between two identical runs"
        _, audio = render_clip(row["visual_label"], row["audio_label"], row["seed"], CFG)
        assert np.abs(sf.read(tmp_path / "a" / row["audio"], dtype="float32")[0] - audio).max() < 1e-4

    world = json.loads((tmp_path / "a" / "world.json").read_text())
    assert world["seed"] == 11 and world["n"] == 6 and world["classes"] == list(CLASSES)
    assert world["config"]["height"] == CFG.height and world["label_groups"]["animals"] == [
        "bird",
        "frog",
        "bee",
    ]
    assert write_world(tmp_path / "c", 6, seed=12).read_text() != m1.read_text()


def test_write_world_refuses_other_parameters(tmp_path):
    write_world(tmp_path, 3, seed=1, cfg=SMALL)
    before = (tmp_path / "manifest.jsonl").read_text()
    write_world(tmp_path, 3, seed=1, cfg=SMALL)  # the same parameters again: fine
    assert (tmp_path / "manifest.jsonl").read_text() == before
    for kwargs in ({"n": 4, "seed": 1}, {"n": 3, "seed": 2}, {"n": 3, "seed": 1, "swapped_share": 0.2}):
        with pytest.raises(InputError, match="other parameters"):
            write_world(tmp_path, cfg=SMALL, **kwargs)
    with pytest.raises(InputError, match="other parameters"):
        write_world(tmp_path, 3, seed=1, cfg=WorldConfig(duration=0.5, height=32, width=48, fps=4))
    assert (tmp_path / "manifest.jsonl").read_text() == before


def test_manifest_balance_and_conditions(tmp_path):
    n = 3 * len(CLASSES)
    manifest = write_world(tmp_path, n, seed=5, cfg=SMALL, swapped_share=0.5)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == n and len({r["id"] for r in rows}) == n and len({r["seed"] for r in rows}) == n
    assert set(Counter(r["visual_label"] for r in rows).values()) == {3}
    audio_counts = Counter(r["audio_label"] for r in rows)
    assert set(audio_counts) == set(CLASSES) and max(audio_counts.values()) - min(audio_counts.values()) <= 3
    conditions = Counter(r["condition"] for r in rows)
    assert conditions == {"congruent": n // 2, "swapped": n - n // 2}
    for r in rows:
        if r["condition"] == "congruent":
            assert r["audio_label"] == r["visual_label"]
        else:
            assert unrelated(r["audio_label"], r["visual_label"]), r
        assert (tmp_path / r["video"]).is_file() and (tmp_path / r["audio"]).is_file()
        assert r["video"].startswith("clips/") and r["audio"].endswith(".wav")


def _hue_vector(frame: np.ndarray) -> np.ndarray:
    """(cos, sin) of the circular mean hue of the saturated pixels (the object; background is greyish)."""
    hsv = np.asarray(Image.fromarray(frame).convert("HSV")).reshape(-1, 3).astype(float)
    selected = (hsv[:, 1] > 115) & (hsv[:, 2] > 60)
    assert selected.sum() > 200, "the main object should cover a good part of the frame"
    angle = hsv[selected, 0] / 256 * 2 * np.pi
    return np.array([np.cos(angle).mean(), np.sin(angle).mean()])


def _log_spectrum(audio: np.ndarray) -> np.ndarray:
    _, power = signal.welch(audio, fs=16000, nperseg=512)
    log = np.log(power + 1e-10)
    return log - log.mean()  # loudness is a nuisance: compare spectral shapes


def _leave_one_out_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Nearest-centroid classification of each sample against centroids made without it."""
    hits = 0
    for i in range(len(features)):
        others = np.arange(len(features)) != i
        centroids = np.stack([features[others & (labels == c)].mean(0) for c in CLASSES])
        hits += CLASSES[int(np.argmin(((centroids - features[i]) ** 2).sum(1)))] == labels[i]
    return hits / len(features)


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """4 congruent clips per class: labels (N,), middle frames, audio tracks."""
    labels, frames, audios = [], [], []
    for k, label in enumerate(CLASSES):
        for j in range(4):
            clip_frames, audio = render_clip(label, label, 1000 + 100 * k + j, CFG)
            labels.append(label)
            frames.append(clip_frames[len(clip_frames) // 2])
            audios.append(audio)
    return np.array(labels), frames, audios


def test_classes_are_separable_by_hue(samples):
    labels, frames, _ = samples
    hues = np.stack([_hue_vector(f) for f in frames])
    assert _leave_one_out_accuracy(hues, labels) >= 0.9
    angle = np.degrees(np.arctan2(hues[:, 1], hues[:, 0]))
    centres = {c: np.degrees(np.angle(np.exp(1j * np.radians(angle[labels == c])).mean())) for c in CLASSES}

    def gap(a: float, b: float) -> float:
        return abs((a - b + 180) % 360 - 180)

    within = max(gap(a, centres[c]) for a, c in zip(angle, labels, strict=True))
    between = min(gap(centres[a], centres[b]) for a in CLASSES for b in CLASSES if a != b)
    assert within < between / 2


def test_audio_is_learnable_but_varied(samples):
    labels, frames, audios = samples
    spectra = np.stack([_log_spectrum(a) for a in audios])
    accuracy = _leave_one_out_accuracy(spectra, labels)
    assert accuracy >= 0.6, accuracy
    # within a class, no two clips are the same picture or the same sound
    for c in CLASSES:
        idx = np.flatnonzero(labels == c)
        for i in idx:
            for j in idx[idx > i]:
                assert np.abs(frames[i].astype(int) - frames[j]).mean() > 5
                assert np.abs(spectra[i] - spectra[j]).mean() > 0.1
                assert np.corrcoef(audios[i], audios[j])[0, 1] < 0.9
