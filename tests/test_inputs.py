"""Inputs and layouts: placeholder expansion against transformers' processors, token groups, bad input, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, av_samples, samples_for

import avlens
from avlens.errors import InputError, ModelNotFoundError
from avlens.media import load_audio
from avlens.models import Clip, Sample
from avlens.models.tiny import tiny_model
from avlens.trace import run


def _spans(ids: list[int], start: int, end: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < len(ids):
        if ids[i] == start:
            j = ids.index(end, i)
            out.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return out


def _check_layout(adapter, inputs):
    sid, lay = adapter.special_ids, inputs.layout
    ids = inputs.input_ids
    for name, tok in (("audio", sid.audio), ("video", sid.video), ("image", sid.image)):
        if tok is not None:
            assert torch.equal(lay.mask(name), (ids == tok) & lay.valid), name
    for b in range(inputs.batch_size):
        row = ids[b].tolist()
        assert lay.positions("last", b).tolist() == [len(row) - 1]
        media = [i for i, t in enumerate(row) if t in sid.media_ids()]
        clips = sorted(n for n in lay.names if n.startswith("clip"))
        covered = sorted(int(p) for n in clips for p in lay.positions(n, b))
        assert covered == media  # the clips cover exactly the media spans, markers included
        question = lay.positions("question", b)
        words = adapter.tokenizer.decode(ids[b, question])
        assert inputs.samples[b].prompt.lower().rstrip("?").split()[0] in words


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_covers_exactly_the_placeholders(models, family):
    adapter = models[family]
    inputs = adapter.prepare(samples_for(adapter, 0, 3))
    _check_layout(adapter, inputs)
    counts = inputs.layout.counts(0)
    merge = adapter.vision.merge_size**2
    assert counts["video"] == int(inputs.tensors["video_grid_thw"][0].prod()) // merge
    if adapter.has_audio:
        n_frames = int(inputs.tensors["feature_attention_mask"][0].sum())
        assert counts["audio"] == adapter.audio_token_count(n_frames)


def _hf_processor(family, adapter):
    """transformers' own processor object, for its placeholder methods (its video processor needs torchvision,
    so the object is assembled by hand with the attributes those methods read)."""
    from types import SimpleNamespace

    from transformers import Qwen2_5OmniProcessor, Qwen3OmniMoeProcessor

    cls = Qwen2_5OmniProcessor if family == "qwen2.5-omni" else Qwen3OmniMoeProcessor
    proc = object.__new__(cls)
    tok = adapter.tokenizer
    proc.video_processor = SimpleNamespace(merge_size=adapter.vision.merge_size)
    proc.audio_bos_token, proc.audio_eos_token = tok.audio_bos_token, tok.audio_eos_token
    proc.video_token, proc.audio_token = tok.video_token, tok.audio_token
    return proc


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen3-omni"])
def test_interleaved_layout_equals_transformers_processor(models, family, media):
    adapter = models[family]
    inputs = adapter.prepare([Sample("what do you hear?", video=media["clip"])], fps=2.0)
    assert inputs.tensors["use_audio_in_video"] is True
    grid = inputs.tensors["video_grid_thw"][0].numpy()
    n_audio = int(inputs.layout.counts(0)["audio"])
    spg = float(inputs.tensors["video_second_per_grid"][0])
    proc = _hf_processor(family, adapter)
    text = proc.replace_video_with_audio_token(
        {"video_grid_thw": [grid], "video_second_per_grid": [spg]},
        0,
        {"num_audio_tokens": [n_audio]},
        0,
        position_id_per_seconds=adapter.position_id_per_second,
        seconds_per_chunk=2.0,
    )
    expected = adapter.tokenizer.encode(text, add_special_tokens=False)
    sid = adapter.special_ids
    row = inputs.input_ids[0].tolist()
    start = row.index(sid.audio_start)
    assert row[start : start + len(expected)] == expected
    assert row[start - 1] == sid.vision_start and row[start + len(expected)] == sid.vision_end
    # Chunks partition the span's video and audio tokens; in each, video comes before audio.
    lay = inputs.layout
    chunks = [n for n in lay.names if n.startswith("chunk")]
    assert len(chunks) >= 3  # a 5 s clip
    union = torch.stack([lay.mask(c) for c in chunks]).sum(0)
    assert torch.equal(union, (lay.mask("audio") | lay.mask("video")).long())
    for c in chunks:
        pos = lay.positions(c, 0)
        kinds = ["v" if row[p] == sid.video else "a" for p in pos.tolist()]
        assert kinds == sorted(kinds, reverse=True), c  # v...v a...a
        assert pos.tolist() == list(range(int(pos[0]), int(pos[-1]) + 1))
    _check_layout(adapter, inputs)
    # The model accepts the layout (its own rope index and placeholder checks run in the forward).
    assert torch.isfinite(run(adapter, inputs).logits).all()


def test_separate_spans_when_audio_is_a_separate_file(omni, media):
    inputs = omni.prepare([Sample("what do you hear?", video=media["short"], audio=media["wav"])])
    assert "use_audio_in_video" not in inputs.tensors
    assert not [n for n in inputs.layout.names if n.startswith("chunk")]
    _check_layout(omni, inputs)
    audio, video = inputs.layout.positions("audio", 0), inputs.layout.positions("video", 0)
    assert int(video[-1]) < int(audio[0])


def test_multi_clip_prompt_has_one_group_per_clip(omni):
    rng = np.random.default_rng(0)
    clips = [
        Clip(
            video=rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8),
            audio=(0.1 * rng.standard_normal(16000)).astype(np.float32),
        )
        for _ in range(3)
    ]
    inputs = omni.prepare([Sample("which clip has the sound of a bell?", clips=clips)])
    lay = inputs.layout
    assert [n for n in lay.names if n.startswith("clip")] == ["clip0", "clip1", "clip2"]
    for k in range(3):
        assert lay.mask(f"clip{k}&audio").sum() == 25 and lay.mask(f"clip{k}&video").sum() > 0
    assert int(lay.positions("clip0", 0)[-1]) < int(lay.positions("clip1", 0)[0])
    _check_layout(omni, inputs)


def test_image_inputs(models):
    adapter = models["qwen2.5-vl"]
    rng = np.random.default_rng(0)
    inputs = adapter.prepare([Sample("what do you see?", image=rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))])
    assert inputs.layout.counts(0)["image"] == int(inputs.tensors["image_grid_thw"][0].prod()) // 4
    _check_layout(adapter, inputs)
    assert torch.isfinite(run(adapter, inputs).logits).all()


def test_group_expressions(omni):
    lay = omni.prepare(av_samples(0, 2)).layout
    assert torch.equal(lay.mask("last+question"), lay.mask("last") | lay.mask("question"))
    assert torch.equal(lay.mask("clip0&audio"), lay.mask("audio"))
    assert torch.equal(lay.mask("all"), lay.valid)
    assert lay.extend(3).mask("generated")[:, -3:].all()


# -- bad input -------------------------------------------------------------------------------------------------
def test_bad_samples_are_reported_and_the_rest_is_built(omni, media):
    samples = [
        Sample("what do you hear?", video=media["missing"], id="missing"),
        Sample("what do you hear?", video=media["truncated"], id="truncated"),
        Sample("what do you hear?", video=media["silent"], id="silent"),
        Sample("what do you hear?", audio=media["empty_wav"], id="empty"),
        Sample("what do you hear?", video=media["unsupported"], id="unsupported"),
        Sample("what do you hear?", video=media["short"], id="good"),
    ]
    inputs = omni.prepare(samples)
    assert [s.id for s in inputs.samples] == ["good"]
    errors = {e.sample: str(e) for e in inputs.errors}
    assert set(errors) == {"missing", "truncated", "silent", "empty", "unsupported"}
    assert "missing.mp4" in errors["missing"] and "not found" in errors["missing"]
    assert "truncated.mp4" in errors["truncated"]
    assert "silent.mp4" in errors["silent"] and "no audio track" in errors["silent"]
    assert "empty.wav" in errors["empty"] and "empty" in errors["empty"].split("empty.wav")[-1]
    assert "notes.xyz" in errors["unsupported"] and "unsupported" in errors["unsupported"]
    for e in inputs.errors:
        assert "\n" not in str(e) and str(e).startswith(f"sample {e.sample}: ")
    # A silent video is fine when its audio is not asked for.
    ok = omni.prepare([Sample("what do you see?", video=media["silent"], video_audio=False)])
    assert ok.layout.counts(0)["audio"] == 0 and not ok.errors


def test_prompt_longer_than_the_context(media):
    adapter = tiny_model("qwen2.5-omni", layers=1)
    adapter.text_config.max_position_embeddings = 64
    inputs = adapter.prepare([Sample("describe", video=media["short"]), Sample("what do you see?", video_audio=False)])
    assert len(inputs.errors) == 1 and "longer than the model's context (64)" in str(inputs.errors[0])
    with pytest.raises(InputError, match="longer than the model's context"):
        adapter.prepare([Sample("describe", video=media["short"])])


def test_unknown_words_are_warned_about(omni):
    with pytest.warns(UserWarning, match="outside .* vocabulary: zebras"):
        omni.prepare([Sample("what do zebras hear?", audio=np.ones(8000, dtype=np.float32) * 0.1)])


# -- loading -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_through_the_registry(family, tmp_path):
    made = tiny_model(family, layers=2, save_to=tmp_path / family)
    loaded = avlens.load(tmp_path / family)
    assert type(loaded) is type(made) and loaded.family == family
    assert loaded.special_ids == made.special_ids
    assert loaded.n_layers == 2 and loaded.hidden_size == 64 and loaded.n_kv_heads == 2
    assert [i for i, _ in loaded.attention_modules] == [0, 1]
    samples = samples_for(made, 0, 1)
    a, b = made.prepare(samples), loaded.prepare(samples)
    assert torch.equal(a.input_ids, b.input_ids)
    assert (run(made, a).logits - run(loaded, b).logits).abs().max() <= 1e-5


def test_full_omni_checkpoint_uses_its_thinker(tmp_path):
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    thinker = tiny_model("qwen2.5-omni", layers=2, save_to=tmp_path / "thinker")
    config = Qwen2_5OmniConfig(thinker_config=thinker.model.config.to_dict(), enable_audio_output=False)
    full = Qwen2_5OmniForConditionalGeneration(config)
    full.thinker.load_state_dict(thinker.model.state_dict())
    full.save_pretrained(tmp_path / "full", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "full" / f).write_bytes((tmp_path / "thinker" / f).read_bytes())
    for f in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (tmp_path / "full" / f).write_bytes((tmp_path / "thinker" / f).read_bytes())
    loaded = avlens.load(tmp_path / "full")
    assert type(loaded.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    inputs = loaded.prepare(av_samples(0, 1))
    expected = run(thinker, thinker.prepare(av_samples(0, 1))).logits
    assert (run(loaded, inputs).logits - expected).abs().max() <= 1e-5


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such/model-xyz"):
        avlens.load("no-such/model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a loadable checkpoint"):
        avlens.load(tmp_path / "empty")


# -- audio longer than the feature extractor's window ------------------------------------------------------------
WINDOW = 10  # seconds: the organism's chunk_length


@pytest.fixture(scope="module")
def windowed():
    """family -> a tiny Omni model whose feature extractor has the organism's 10 s window."""
    return {f: tiny_model(f, layers=2, hidden=64, seed=1, audio_chunk_seconds=WINDOW) for f in FAMILIES[:2]}


@pytest.fixture(scope="module")
def long_media(tmp_path_factory):
    import soundfile as sf
    from conftest import write_av

    d = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    out = {"clip12": write_av(d / "clip12.mp4", seconds=12.0, fps=4, size=(56, 56), seed=4)}
    for seconds in (10, 40):
        out[f"wav{seconds}"] = d / f"speech{seconds}.wav"
        sf.write(out[f"wav{seconds}"], (0.1 * rng.standard_normal(22050 * seconds)).astype(np.float32), 22050)
    return out


def _reference_audio_tokens(family: str, waveform: np.ndarray) -> int:
    """Audio tokens as transformers' processor counts them when it keeps the whole audio (Qwen3-Omni's call of
    the extractor: padding to the longest, no truncation) with that family's length rule."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths as rule25
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths as rule3

    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=WINDOW)
    out = extractor([waveform], sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True)
    frames = torch.as_tensor(out["attention_mask"]).sum(-1)
    return int(rule25(frames)[0] if family == "qwen2.5-omni" else rule3(frames, 50)[0])


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen3-omni"])
def test_audio_longer_than_the_window_reaches_every_chunk(windowed, long_media, family):
    adapter = windowed[family]
    inputs = adapter.prepare([Sample("what do you hear?", video=long_media["clip12"])])
    assert inputs.tensors["use_audio_in_video"] is True
    used = inputs.media[0]["clips"][0]
    assert used["audio"]["seconds_used"] == used["audio"]["seconds_total"] == pytest.approx(12.0, abs=0.1)
    assert used["video"]["seconds"] == pytest.approx(12.0, abs=0.3) and used["video"]["frames"] == 24
    lay = inputs.layout
    chunks = [n for n in lay.names if n.startswith("chunk")]
    assert len(chunks) >= 6
    with_audio = [c for c in chunks if int(lay.mask(f"{c}&audio").sum()) > 0]
    if family == "qwen2.5-omni":  # the clip's end keeps its sound (cut at 10 s, the last chunk had none)
        assert with_audio == chunks
    else:
        # The tiny Qwen3 config keeps 25 position ids a second while its audio gives 13 tokens a second, so
        # only the first half of the 1 s chunks can hold audio, cut or not; the count below is what matters.
        assert len(with_audio) == 7
    audio = load_audio(long_media["clip12"])
    assert int(lay.counts(0)["audio"]) == _reference_audio_tokens(family, audio)
    assert torch.isfinite(run(adapter, inputs).logits).all()  # the model's own placeholder and rope checks


@pytest.mark.parametrize("family", ["qwen2.5-omni", "qwen3-omni"])
def test_long_wav_is_processed_in_full(windowed, long_media, family):
    adapter = windowed[family]
    samples = [Sample("what do you hear?", audio=long_media[k], id=k) for k in ("wav10", "wav40")]
    inputs = adapter.prepare(samples)
    n10, n40 = (int(inputs.layout.counts(i)["audio"]) for i in range(2))
    assert n40 > 3.9 * n10
    for i, key in enumerate(("wav10", "wav40")):
        waveform = load_audio(long_media[key])
        assert int(inputs.layout.counts(i)["audio"]) == _reference_audio_tokens(family, waveform)
        audio = inputs.media[i]["clips"][0]["audio"]
        seconds = 10.0 if key == "wav10" else 40.0
        assert audio["seconds_used"] == audio["seconds_total"] == pytest.approx(seconds, abs=0.01)
        assert (audio["sampling_rate"], audio["source_rate"], audio["from_video"]) == (16000, 22050, False)
        assert audio["file"] == str(long_media[key])
    assert inputs.media[0]["clips"][0]["video"] is None
    assert torch.isfinite(run(adapter, inputs).logits).all()
