"""Benchmarks users bring (AVHBench QA files, VGGSound's label CSV) as manifests, on small files written here in
the documented formats; lettered multiple-choice prompts and the letter read back."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_av

import avlens
from avlens.analyses.common import items_from_manifest
from avlens.data import read_manifest
from avlens.data.formats import LETTERS, avhbench, mc_prompt, read_letter, vggsound


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    write_av(path, seconds=1.0, size=(64, 64))
    return path


def test_avhbench_qa_files_become_one_manifest_and_bad_entries_are_reported(tmp_path, clip):
    root = tmp_path / "AVHBench_v0"
    (root / "json").mkdir(parents=True)
    (root / "video").mkdir()
    for vid in ("00191", "00191_swap"):
        shutil.copy(clip, root / "video" / f"{vid}.mp4")
    audio, video = "Video-driven Audio Hallucination", "Audio-driven Video Hallucination"
    qa = [
        {"video_id": "00191", "task": audio, "text": "Is the couch making sound in the audio?", "label": "No"},
        {"video_id": "00191", "task": video, "text": "Is the sleeping man visible in the video?", "label": "Yes"},
        {"video_id": "00191", "task": "AV Captioning", "text": "Describe it.", "label": "A man snores."},
        {"video_id": "00191", "task": "AV Matching", "text": "Are the contexts of audio and visual content matching?"},
    ]
    (root / "json" / "00191.json").write_text(json.dumps(qa))
    swap = [{"video_id": "00191_swap", "task": "AV Matching", "text": "Are the contexts matching?", "label": "No"}]
    (root / "json" / "00191_swap.json").write_text(json.dumps(swap))
    (root / "json" / "00200.json").write_text(json.dumps([{**qa[0], "video_id": "00200"}]))  # no video
    (root / "json" / "broken.json").write_text("{not json")
    report = avhbench(root, tmp_path / "out")
    df = read_manifest(report.manifest)
    assert report.written == len(df) == 4
    assert list(df.kind) == ["hear_yn", "see_yn", "caption", "match"]
    assert list(df.expect_question) == ["no", "yes", "A man snores.", "no"]
    assert df.video.iloc[-1].endswith("00191_swap.mp4") and df.question.iloc[0].startswith("Is the couch")
    reasons = {p["id"]: p["reason"] for p in report.problems}
    assert "without label" in reasons["00191-3"] and reasons["00200-0"] == "video file not found"
    assert reasons["broken"].startswith("unreadable QA file")
    # each row asks its own question, scored against its own answer
    items = items_from_manifest(report.manifest, {"question": "{question}"})
    assert items[0].sample.prompt == "Is the couch making sound in the audio?" and items[0].expected == "no"
    with pytest.raises(avlens.InputError, match="no AVHBench QA files"):
        avhbench(tmp_path / "empty", tmp_path / "o2")


def test_vggsound_csv_becomes_lettered_20_way_multiple_choice(tmp_path, clip):
    labels = [f"class {i:02d}" for i in range(24)]
    lines = [f"vid{i:03d},{i * 10},{labels[i % 24]},{'test' if i % 3 else 'train'}" for i in range(30)]
    lines.append("badstart,xx,class 01,test")
    (tmp_path / "vggsound.csv").write_text("\n".join(lines) + "\n")
    videos = tmp_path / "clips"
    videos.mkdir()
    for i in range(30):
        if i != 5:  # one clip missing
            shutil.copy(clip, videos / f"vid{i:03d}_{i * 10:06d}.mp4")
    report = vggsound(tmp_path / "vggsound.csv", videos, tmp_path / "out", seed=1)
    df = read_manifest(report.manifest)
    tests = [i for i in range(30) if i % 3]
    assert report.written == len(df) == len(tests) - 1 and set(df.split) == {"test"}
    assert {p["reason"] for p in report.problems} == {"video file not found", "bad start_seconds 'xx'"}
    for _, r in df.iterrows():
        options = list(r.options)
        assert len(options) == 20 == len(set(options)) and r.audio_label in options
        assert LETTERS[options.index(r.audio_label)] == r.answer == r.expect_question
        assert r.question == mc_prompt("What is in this clip?", options)
        assert f"({r.answer}) {r.audio_label}" in r.question and r.question.endswith("single label letter.")
    # the right letter lands everywhere, not in one place
    assert df.answer.nunique() >= 5
    again = read_manifest(vggsound(tmp_path / "vggsound.csv", videos, tmp_path / "out2", seed=1).manifest)
    assert list(again.answer) == list(df.answer)  # deterministic for a seed
    with pytest.raises(avlens.InputError, match=r"21 options need 21 labels|n_options"):
        vggsound(tmp_path / "vggsound.csv", videos, tmp_path / "o3", n_options=21)


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("b", "B"), ("(C)", "C"), ("D.", "D"), ("Answer: E", "E"), ("(f) dog", "F"), ("I think it is G", "G")],
)
def test_a_letter_is_read_from_an_answer(text, letter):
    assert read_letter(text) == letter


def test_no_letter_or_one_outside_the_options_is_none():
    assert read_letter("a dog barking") is None  # the article "a" is not an answer
    assert read_letter("Z") is None and read_letter("E", labels="ABCD") is None
    with pytest.raises(avlens.InputError, match="2 to 20 options"):
        mc_prompt("q", ["only one"])


def test_a_row_without_the_question_its_prompt_asks_for_is_reported(tmp_path, clip):
    from avlens.data import write_manifest

    manifest = write_manifest(__import__("pandas").DataFrame([{"id": "r1", "video": str(clip)}]), tmp_path / "m.jsonl")
    (item,) = items_from_manifest(manifest, {"question": "{question}"})
    assert item.problem == "the prompt asks for {question} but the row has no question"


def test_the_commands_write_manifests_and_refuse_bad_input_in_one_line(tmp_path, clip):
    from test_cli import avlens as cli

    (tmp_path / "v").mkdir()
    shutil.copy(clip, tmp_path / "v" / "vid000_000000.mp4")
    rows = "\n".join(f"vid{i:03d},0,class {i},test" for i in range(4)) + "\n"
    (tmp_path / "vgg.csv").write_text(rows)
    out = cli("data", "vggsound", str(tmp_path / "vgg.csv"), str(tmp_path / "v"), str(tmp_path / "o"), "--options", "4")
    assert out.returncode == 0, out.stderr
    assert len(read_manifest(tmp_path / "o" / "manifest.jsonl")) == 1 and "skipped vid001_000000" in out.stderr
    missing = cli("data", "avhbench", str(tmp_path / "nothing"), str(tmp_path / "o2"))
    assert missing.returncode == 2 and "no AVHBench QA files" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
