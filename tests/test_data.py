"""Tests of manifests and dataset builders (avlens.data): counterfactual variants, multi-clip prompts; and of the
dominance splits (avlens.analyses.dominance), which ask a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import avlens.analyses.dominance as dominance_module
from avlens.analyses.dominance import dominance
from avlens.data import (
    CONDITIONS,
    article,
    counterfactual,
    first_label,
    multiclip,
    read_manifest,
    samples_from_multiclip,
    write_manifest,
)
from avlens.errors import InputError
from avlens.media import load_audio, load_video, probe
from avlens.models.tiny import WORDS, tiny_model
from avlens.organism.world import CLASSES, LABEL_GROUPS, unrelated, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """An 8-clip organism world (2 s, 112x112, 8 fps; congruent, as write_world makes by default); its manifest path."""
    return write_world(tmp_path_factory.mktemp("world"), n=8, seed=0)


@pytest.fixture(scope="module")
def source(world) -> pd.DataFrame:
    return read_manifest(world).set_index("id", drop=False)


@pytest.fixture(scope="module")
def cf(world, tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("cf")
    report = counterfactual(world, out, groups=LABEL_GROUPS, seed=0, progress=lambda d, t: calls.append((d, t)))
    return SimpleNamespace(report=report, out=out, table=read_manifest(report.manifest), calls=calls)


@pytest.fixture(scope="module")
def omni_words():
    """A tiny Qwen2.5-Omni whose vocabulary has every world label and the words of the test prompts."""
    extra = [c for c in CLASSES if c not in WORDS] + ["Which", "which?", "hear?", "1", "2"]
    return tiny_model("qwen2.5-omni", words=(*WORDS, *extra), seed=0, audio_chunk_seconds=4)


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_manifest_round_trip(tmp_path, ext):
    df = pd.DataFrame(
        {
            "id": ["007", "b"],
            "video": ["clips/a.mp4", "/abs/b.mp4"],
            "audio": ["sounds/a.wav", None],
            "audio_label": ["bell", "drum"],
            "visual_label": ["bell", "gong"],
            "seed": [12345678901, 2],
            "note": ["x", None],
        }
    )
    path = write_manifest(df, tmp_path / "sub" / f"m{ext}")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    back = read_manifest(path)
    assert list(back.columns) == list(df.columns)
    assert back["id"].tolist() == ["007", "b"]  # ids stay text
    root = path.parent.resolve()
    assert back["video"].tolist() == [str(root / "clips/a.mp4"), "/abs/b.mp4"]  # relative to the manifest
    assert back["audio"].tolist() == [str(root / "sounds/a.wav"), None]
    assert back["audio_label"].tolist() == ["bell", "drum"] and back["visual_label"].tolist() == ["bell", "gong"]
    assert back["seed"].tolist() == [12345678901, 2]
    assert back["note"].tolist() == ["x", None]
    assert back.attrs["path"] == str(path)


def test_manifest_errors_name_the_file_and_column(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("id,video,audio_label\n1,a.mp4,bell\n")
    with pytest.raises(InputError, match=r"m\.csv: missing column 'visual_label'"):
        read_manifest(bad)
    assert read_manifest(bad, required=("video",))["id"].tolist() == ["1"]
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"id": "a", "video": "x.mp4"}\n{"id": "a", "video": "y.mp4"}\n')
    with pytest.raises(InputError, match="duplicate id 'a'"):
        read_manifest(dup, required=("video",))
    no_id = tmp_path / "n.jsonl"
    no_id.write_text('{"video": "x.mp4"}\n{"video": "y.mp4"}\n')
    assert read_manifest(no_id, required=("video",))["id"].tolist() == ["0", "1"]
    with pytest.raises(InputError, match="file not found"):
        read_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="unknown manifest format"):
        read_manifest(tmp_path / "m.xlsx")
    with pytest.raises(InputError, match="unknown manifest format"):
        write_manifest(pd.DataFrame({"video": ["a"]}), tmp_path / "m.txt")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"g\.parquet: not a readable Parquet manifest"):
        read_manifest(garbage)


# ---------------------------------------------------------------------------------------------------------
# Counterfactual variants
# ---------------------------------------------------------------------------------------------------------
def test_counterfactual_writes_every_condition_with_the_expected_answers(cf, source):
    table, report = cf.table, cf.report
    assert report.problems == []
    assert report.written == len(table) == 8 * len(CONDITIONS)
    assert report.counts == dict.fromkeys(CONDITIONS, 8)
    assert cf.calls[-1] == (8, 8) and len(cf.calls) == 8
    for source_id, rows in table.groupby("source_id"):
        src = source.loc[source_id]
        heard, seen = src["audio_label"], src["visual_label"]
        by = rows.set_index("condition")
        assert sorted(by.index) == sorted(CONDITIONS)
        expect = {
            "factual": (heard, seen),
            "muted": ("nothing", seen),
            "blank_video": (heard, "nothing"),
            "audio_only": (heard, "nothing"),
            "video_only": ("nothing", seen),
        }
        for condition, (hear, see) in expect.items():
            row = by.loc[condition]
            assert (row["expect_hear"], row["expect_see"]) == (hear, see), (source_id, condition)
            assert row["audio_label"] == (None if hear == "nothing" else hear)
            assert row["visual_label"] == (None if see == "nothing" else see)
            assert row["original_audio_label"] is None and row["partner_id"] is None
        swapped = by.loc["swapped"]
        partner = source.loc[swapped["partner_id"]]
        assert swapped["partner_id"] != source_id
        assert swapped["expect_hear"] == swapped["audio_label"] == partner["audio_label"]
        assert swapped["expect_see"] == seen and swapped["original_audio_label"] == heard
        # the new sound belongs to neither the old sound's group nor the picture's
        assert unrelated(partner["audio_label"], heard) and unrelated(partner["audio_label"], seen)
        # media: audio_only has no video, video_only no audio, every other condition both
        assert by.loc["audio_only", "video"] is None and by.loc["video_only", "audio"] is None
        for condition in ("factual", "swapped", "muted", "blank_video"):
            assert by.loc[condition, "video"] is not None and by.loc[condition, "audio"] is not None
        assert rows["source_condition"].eq(src["condition"]).all()  # the world's own column, renamed


def test_counterfactual_media_decode_to_what_the_manifest_says(cf, source):
    table = cf.table.set_index("id")
    for source_id in source.index[:3]:
        src = source.loc[source_id]
        own, _ = sf.read(src["audio"], dtype="float32")
        original = load_video(src["video"])

        swapped = table.loc[f"{source_id}__swapped"]
        partner, _ = sf.read(source.loc[swapped["partner_id"], "audio"], dtype="float32")
        heard = load_audio(swapped["video"])
        n = len(own)
        assert _corr(heard[:n], partner[:n]) > 0.95 and abs(_corr(heard[:n], own[:n])) < 0.3
        wav, sr = sf.read(swapped["audio"], dtype="float32")
        assert sr == 16000 and len(wav) == n and _corr(wav, partner[:n]) > 0.99

        factual = table.loc[f"{source_id}__factual"]
        assert _corr(load_audio(factual["video"])[:n], own) > 0.95
        frames = load_video(factual["video"]).frames
        assert frames.shape == original.frames.shape
        assert np.abs(frames.astype(int) - original.frames).mean() < 3

        muted = table.loc[f"{source_id}__muted"]
        silence = load_audio(muted["video"])
        assert np.abs(silence).max() == 0 and abs(len(silence) - n) <= 1024  # AAC pads to whole frames
        assert np.array_equal(load_video(muted["video"]).frames, frames)  # same picture as factual

        blank = table.loc[f"{source_id}__blank_video"]
        black = load_video(blank["video"])
        assert black.frames.shape == original.frames.shape and black.duration == original.duration
        assert black.frames.max() <= 2
        assert _corr(load_audio(blank["video"])[:n], own) > 0.95

        audio_only = table.loc[f"{source_id}__audio_only"]
        assert audio_only["audio"].endswith(".wav") and _corr(sf.read(audio_only["audio"])[0], own) > 0.99

        video_only = table.loc[f"{source_id}__video_only"]
        info = probe(video_only["video"])
        assert info.has_video and not info.has_audio
        assert np.array_equal(load_video(video_only["video"]).frames, frames)


def test_counterfactual_manifest_is_relative_and_loads_with_datasets(cf):
    lines = [json.loads(x) for x in (cf.out / "manifest.jsonl").read_text().splitlines()]
    assert lines[0]["video"].startswith("clips/")  # relative: the directory can be moved
    ds = datasets.load_dataset("json", data_files=str(cf.out / "manifest.jsonl"), split="train")
    assert len(ds) == len(cf.table)
    for column in ("id", "source_id", "condition", "video", "audio", "expect_hear", "expect_see"):
        assert column in ds.column_names
    swapped = ds.filter(lambda r: r["condition"] == "swapped")
    assert all(r["original_audio_label"] is not None for r in swapped)
    assert ds.filter(lambda r: r["condition"] == "muted")["expect_hear"] == ["nothing"] * 8


def test_counterfactual_reports_bad_rows_and_writes_the_others(world, source, media, tmp_path):
    rows = source.to_dict("records")
    rows.append(dict(rows[0], id="gone", video=str(tmp_path / "gone.mp4"), audio=None))
    rows.append(dict(rows[1], id="unicorn", audio_label="unicorn"))
    rows.append(dict(rows[2], id="silent", video=str(media["silent"]), audio=None))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    rows.append(dict(rows[3], id="broken", video=str(broken)))
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "in.jsonl")

    report = counterfactual(manifest, tmp_path / "out", groups=LABEL_GROUPS)
    reasons = {p["id"]: p for p in report.problems}
    assert sorted(reasons) == ["broken", "gone", "silent", "unicorn"]
    assert "file not found" in reasons["gone"]["reason"] and reasons["gone"]["file"].endswith("gone.mp4")
    assert "unknown label 'unicorn'" in reasons["unicorn"]["reason"]
    assert reasons["silent"]["reason"].startswith("no audio track")
    assert reasons["silent"]["file"] == str(media["silent"])
    assert reasons["broken"]["file"] == str(broken)
    out = read_manifest(report.manifest)
    assert sorted(set(out["source_id"])) == sorted(source.index)
    assert report.written == len(source) * len(CONDITIONS)


def test_counterfactual_partners_and_conditions(world, source, tmp_path):
    rows = source[source["audio_label"] == source["visual_label"]].head(3)  # congruent clips
    manifest = write_manifest(rows, tmp_path / "in.parquet")
    # one big group: no label is unrelated to any other, so no row can be swapped
    report = counterfactual(manifest, tmp_path / "none", groups={"all": list(CLASSES)})
    assert report.written == 0 and sorted(p["id"] for p in report.problems) == sorted(rows["id"])
    assert all("unrelated" in p["reason"] for p in report.problems)
    # explicit pairs: only the paired labels are known; the pair swaps in both directions
    a, b, c = rows["audio_label"]
    report = counterfactual(manifest, tmp_path / "pairs", pairs=[(a, b)], conditions=("swapped",))
    out = read_manifest(report.manifest).set_index("source_id")
    assert sorted(out["audio_label"]) == sorted([a, b]) and out.loc[rows.index[0], "audio_label"] == b
    assert [p["id"] for p in report.problems] == [rows.index[2]] and f"unknown label {c!r}" in report.problems[0][
        "reason"
    ]
    with pytest.raises(InputError, match="groups= or pairs="):
        counterfactual(manifest, tmp_path / "x")
    with pytest.raises(InputError, match="unknown or no conditions"):
        counterfactual(manifest, tmp_path / "x", conditions=("reversed",))
    # without swapped no grouping is needed; the same input gives the same bytes
    one = counterfactual(manifest, tmp_path / "one", conditions=("factual", "blank_video"))
    counterfactual(manifest, tmp_path / "two", conditions=("factual", "blank_video"))
    assert one.written == 6 and one.counts == {"factual": 3, "blank_video": 3}
    files = sorted(p.name for p in (tmp_path / "one" / "clips").iterdir())
    assert len(files) == 9  # per row: factual mp4, blank mp4, one wav shared by both
    for name in files:
        assert (tmp_path / "one" / "clips" / name).read_bytes() == (tmp_path / "two" / "clips" / name).read_bytes()


def test_counterfactual_partner_choice_depends_on_the_seed_only(world, tmp_path):
    first = counterfactual(world, tmp_path / "a", groups=LABEL_GROUPS, seed=3, conditions=("swapped",))
    again = counterfactual(world, tmp_path / "b", groups=LABEL_GROUPS, seed=3, conditions=("swapped",))
    other = counterfactual(world, tmp_path / "c", groups=LABEL_GROUPS, seed=4, conditions=("swapped",))
    partners = [read_manifest(r.manifest)["partner_id"].tolist() for r in (first, again, other)]
    assert partners[0] == partners[1] and partners[0] != partners[2]


# ---------------------------------------------------------------------------------------------------------
# Dominance
# ---------------------------------------------------------------------------------------------------------
def test_first_label():
    labels = ["dog", "dog bark", "cat", "bell"]
    assert first_label("I hear a Cat and a dog.", labels) == "cat"
    assert first_label("a dog bark, then a bell", labels) == "dog bark"  # the longer label at the same place
    assert first_label("hotdog and bellows", labels) is None  # whole words only
    assert first_label("", labels) is None


class FakeAdapter:
    """A model whose answers are planted per clip: it "hears" and "sees" only what is not zeroed."""

    def __init__(self, modes: dict[str, str], unbuildable: str | None = None) -> None:
        self.modes, self.unbuildable = modes, unbuildable
        self.options = SimpleNamespace(fps=2.0, max_frames=8)

    def prepare(self, samples, **options):
        errors = [
            InputError("prompt too long", sample=s.id) for s in samples if s.meta["source_id"] == self.unbuildable
        ]
        kept = [s for s in samples if s.meta["source_id"] != self.unbuildable]
        return SimpleNamespace(samples=kept, errors=errors)

    def answer(self, sample) -> str:
        sees, hears = bool(sample.video.frames.any()), bool(np.any(sample.audio))
        mode = self.modes[sample.meta["source_id"]]
        if sees and hears:  # the joint answer follows the planted dominance
            return {"audio": "B", "video": "C", "agree": "B", "none": "no idea", "third": "A"}[mode]
        if hears:
            return "B"
        return "B" if mode == "agree" else "C"


def test_dominance_keeps_exactly_the_rows_that_satisfy_the_rule(world, source, monkeypatch, tmp_path):
    ids = source.index.tolist()
    modes = dict(zip(ids, ["audio", "video", "agree", "none", "third", "audio", "video", "audio"], strict=True))
    fake = FakeAdapter(modes, unbuildable=ids[7])
    calls = []

    def fake_generate(adapter, inputs, max_new_tokens):
        calls.append(len(inputs.samples))
        return SimpleNamespace(text=[adapter.answer(s) for s in inputs.samples])

    monkeypatch.setattr(dominance_module, "generate", fake_generate)
    rows = [*source.to_dict("records"), dict(source.iloc[0], id="gone", video=str(tmp_path / "gone.mp4"))]
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "in.csv")
    progress = []
    report = dominance(
        fake,
        manifest,
        tmp_path / "dom",
        question="A, B or C?",
        labels=["A", "B", "C"],
        answer_of=lambda text, labels: text if text in labels else None,
        batch_size=3,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert calls == [9, 9, 3]  # three prompts per loadable clip; the missing file never reaches the model
    assert progress == [(3, 9), (6, 9), (9, 9)]
    assert sorted(p["id"] for p in report.problems) == sorted(["gone", ids[7]])
    assert {p["id"]: p["reason"] for p in report.problems}[ids[7]] == "prompt too long"
    assert report.counts == {"audio_dominant": 2, "video_dominant": 2}
    audio = read_manifest(report.files["audio_dominant"])
    video = read_manifest(report.files["video_dominant"])
    assert audio["id"].tolist() == [ids[0], ids[5]] and video["id"].tolist() == [ids[1], ids[6]]
    assert Path(audio["video"][0]) == Path(source.loc[ids[0], "video"])  # still a usable manifest
    answers = read_manifest(report.manifest).set_index("id")
    assert report.written == len(answers) == 7
    assert answers.loc[ids[0], ["answer_joint", "answer_audio_only", "answer_video_only"]].tolist() == ["B", "B", "C"]
    assert answers.loc[ids[3], "text_joint"] == "no idea" and answers.loc[ids[3], "answer_joint"] is None
    assert answers["dominant"].tolist() == ["audio", "video", None, None, None, "audio", "video"]


def test_dominance_runs_on_a_tiny_model(world, source, omni_words, monkeypatch, tmp_path):
    seen, real = [], dominance_module.generate

    def spy(adapter, inputs, max_new_tokens):
        seen.append(inputs)
        return real(adapter, inputs, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(dominance_module, "generate", spy)
    manifest = write_manifest(source.head(4), tmp_path / "in.jsonl")
    labels = list(CLASSES)
    report = dominance(
        omni_words, manifest, tmp_path / "dom", question="what do you hear?", labels=labels, batch_size=2
    )
    assert report.problems == [] and report.written == 4
    answers = read_manifest(report.manifest)
    for _, row in answers.iterrows():
        picked = [row[f"answer_{v}"] for v in ("joint", "audio_only", "video_only")]
        assert all(a is None or a in labels for a in picked)
        assert all(isinstance(row[f"text_{v}"], str) for v in ("joint", "audio_only", "video_only"))
        assert row["dominant"] == dominance_module.dominant_of(
            dict(zip(("joint", "audio_only", "video_only"), picked, strict=True))
        )
    # the three variants of a clip are the same prompt: same tokens, only the zeroed media differ
    inputs = seen[0]
    assert [s.meta["variant"] for s in inputs.samples[:3]] == ["joint", "audio_only", "video_only"]
    ids = inputs.input_ids
    assert all(ids[0].tolist() == ids[k].tolist() for k in (1, 2))
    audio_only, video_only = inputs.samples[1], inputs.samples[2]
    assert not audio_only.video.frames.any() and np.any(audio_only.audio)
    assert video_only.video.frames.any() and not np.any(video_only.audio)


# ---------------------------------------------------------------------------------------------------------
# Multi-clip prompts
# ---------------------------------------------------------------------------------------------------------
def test_multiclip_prompts_and_samples(world, source, omni_words, tmp_path):
    report = multiclip(world, tmp_path / "mc", n_clips=3, n_prompts=6, seed=1)
    assert report.written == 6 and report.problems == []
    ds = datasets.load_dataset("json", data_files=str(report.manifest), split="train")
    assert len(ds) == 6
    table = read_manifest(report.manifest)
    targets = []
    for _, row in table.iterrows():
        assert len(row["clips"]) == 3 and len(set(row["labels"])) == 3
        k = int(row["answer"]) - 1
        assert row["target_label"] == row["labels"][k] and row["target_label"] in row["question"]
        # each clip plays the sound its label says, and its files exist
        for clip, label, source_id in zip(row["clips"], row["labels"], row["source_ids"], strict=True):
            assert source.loc[source_id, "audio_label"] == label
            assert Path(clip["video"]) == Path(source.loc[source_id, "video"]) and Path(clip["audio"]).is_file()
        targets.append(k)
    assert len(set(targets)) > 1  # the target is not always in the same place
    again = multiclip(world, tmp_path / "mc2", n_clips=3, n_prompts=6, seed=1)
    assert again.manifest.read_text() == report.manifest.read_text()

    sample = samples_from_multiclip(table.iloc[0])
    assert len(sample.clips) == 3 and sample.prompt == table.iloc[0]["question"]
    inputs = omni_words.prepare([sample])
    layout = inputs.layout
    assert [n for n in layout.names if n.startswith("clip")] == ["clip0", "clip1", "clip2"]
    for k in range(3):
        assert layout.mask(f"clip{k}&audio").sum() > 0 and layout.mask(f"clip{k}&video").sum() > 0
    assert int(layout.positions("clip0", 0)[-1]) < int(layout.positions("clip1", 0)[0])


def test_multiclip_reports_and_refuses(world, source, media, tmp_path):
    silent = dict(source.iloc[3], id="silent", video=str(media["silent"]), audio=None)
    rows = [*source.head(3).to_dict("records"), silent]
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "in.jsonl")
    report = multiclip(manifest, tmp_path / "mc", n_clips=2)
    assert [p["id"] for p in report.problems] == ["silent"] and report.written == 3  # one prompt per usable clip
    assert all("silent" not in ids for ids in read_manifest(report.manifest)["source_ids"])
    with pytest.raises(InputError, match="distinct audio labels"):
        multiclip(manifest, tmp_path / "mc", n_clips=4)
    sample = samples_from_multiclip(
        {"id": "p", "question": "which?", "clips": [{"video": "a.mp4", "audio": None}, {"video": "/b.mp4"}]},
        root=tmp_path,
    )
    assert [c.video for c in sample.clips] == [str(tmp_path / "a.mp4"), "/b.mp4"]
    assert [c.audio for c in sample.clips] == [None, None]
    for bad in ("Which clip has {x}?", "Which clip has {label} {kind}?", "Which clip has {label?"):
        with pytest.raises(InputError, match="question_template must contain"):
            multiclip(manifest, tmp_path / "mc", question_template=bad)
    own = multiclip(manifest, tmp_path / "own", question_template="Where is {label}?")
    assert read_manifest(own.manifest)["question"].str.fullmatch(r"Where is [a-z ]+\?").all()


def test_multiclip_questions_carry_the_article_of_their_label(world, tmp_path):
    table = read_manifest(multiclip(world, tmp_path / "mc", n_clips=2, n_prompts=8, seed=3).manifest)
    for question, label in zip(table["question"], table["target_label"], strict=True):
        assert question == f"Which clip has the sound of {'an' if label[0] in 'aeiou' else 'a'} {label}?"
    assert [article(w) for w in ("owl", "Elephant", "bell", "")] == ["an", "an", "a", "a"]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_moved_output_directory_still_resolves(cf, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(cf.out, moved)
    table = read_manifest(moved / "manifest.jsonl")
    videos = [v for v in table["video"] if v is not None]
    assert all(v.startswith(str(moved)) and Path(v).is_file() for v in videos)
