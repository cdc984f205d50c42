"""Benchmarks users bring (AVHBench QA files, VGGSound's label CSV, AV-Odyssey and AV-SpeakerBench items) as
manifests, on small files written here in the documented formats; lettered multiple-choice prompts and the letter
read back."""

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


# ---------------------------------------------------------------------------------------------------------
# AV-Odyssey and AV-SpeakerBench
# ---------------------------------------------------------------------------------------------------------
def _png(path, seed=0):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(path)
    return path


def _wav(path, hz=440.0):
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
    return path


def _odyssey_root(tmp_path, clip):
    """AV-Odyssey's lmms-eval layout (media path lists) as JSON lines, and a part in the Parquet layout of the
    original release (image_1.., audio_1.., video_1 holding the files' bytes)."""
    import pandas as pd

    root = tmp_path / "AV_Odyssey"
    for i in range(1, 5):
        _png(root / "images" / f"{i}.png", seed=i)
    _wav(root / "audios" / "1.wav")
    (root / "videos").mkdir()
    shutil.copy(clip, root / "videos" / "v.mp4")
    four = ["[A] piano", "[B] violin", "[C] drum", "[D] flute"]
    base = {"question_type_id": 1, "subfield": "Timbre", "data_type": "image", "video_path": []}
    items = [
        # one image and one sound
        {
            **base,
            "question_id": "q1",
            "question": "[img1] [audio1] Which instrument in the picture makes this sound?",
            "options": four,
            "answer": "B",
            "image_path": ["images/1.png"],
            "audio_path": ["audios/1.wav"],
        },
        # several clips: the sound is named first, the images in the options
        {
            **base,
            "question_id": "q2",
            "question_type_id": 7,
            "subfield": "Space",
            "question": "Which image shows where [audio1] was recorded?",
            "options": [f"[{x}] [img{i}]" for i, x in enumerate("ABCD", 1)],
            "answer": "[C]",
            "image_path": [f"images/{i}.png" for i in range(1, 5)],
            "audio_path": ["audios/1.wav"],
        },
        # a video and its sound
        {
            **base,
            "question_id": "q3",
            "data_type": "video",
            "question": "[video1] [audio1] Does the sound belong to the video?",
            "options": ["[A] yes", "[B] no", "[C] only at the start", "[D] only at the end"],
            "answer": "A",
            "image_path": [],
            "video_path": ["videos/v.mp4"],
            "audio_path": ["audios/1.wav"],
        },
        # a missing media file
        {
            **base,
            "question_id": "q4",
            "question": "[img1] [audio1] Which?",
            "options": four,
            "answer": "A",
            "image_path": ["images/missing.png"],
            "audio_path": ["audios/1.wav"],
        },
        # malformed: no answer; a tag naming an image the item lacks; options lettered out of order
        {**base, "question_id": "q5", "question": "[img1] Which?", "options": four, "image_path": ["images/1.png"]},
        {
            **base,
            "question_id": "q6",
            "question": "[img2] [audio1] Which?",
            "options": four,
            "answer": "A",
            "image_path": ["images/1.png"],
            "audio_path": ["audios/1.wav"],
        },
        {
            **base,
            "question_id": "q7",
            "question": "[img1]?",
            "options": four[::-1],
            "answer": "A",
            "image_path": ["images/1.png"],
        },
    ]
    lines = [json.dumps(x) for x in items]
    lines.insert(3, "{not json")
    (root / "av_odyssey_part1.jsonl").write_text("\n".join(lines) + "\n")
    part = {
        "question_id": "p1",
        "question_type_id": 2,
        "subfield": "Tone",
        "data_type": "image",
        "question": "[img1] [audio1] Is this the instrument you hear?",
        "options": ["[A] yes", "[B] no", "[C] both", "[D] neither"],
        "answer": "D",
        "image_1": (root / "images" / "2.png").read_bytes(),
        "image_2": b"",
        "audio_1": (root / "audios" / "1.wav").read_bytes(),
        "audio_2": b"",
        "video_1": None,
    }
    pd.DataFrame([part]).to_parquet(root / "av_odyssey_part2.parquet")
    return root


@pytest.mark.filterwarnings("ignore:.*outside tiny-qwen2.5-omni.s vocabulary")
def test_av_odyssey_items_become_clips_with_the_benchmarks_lettered_prompt(tmp_path, clip, omni):
    from avlens.data.builders import samples_from_multiclip
    from avlens.data.formats import AV_ODYSSEY_INSTRUCTION, av_odyssey

    root = _odyssey_root(tmp_path, clip)
    done = []
    report = av_odyssey(root, tmp_path / "out", progress=lambda n, total: done.append((n, total)))
    df = read_manifest(report.manifest)
    assert report.written == len(df) == 4 and list(df.id) == ["q1", "q2", "q3", "p1"]
    assert done[-1] == (8, 8)  # 7 items in the JSON lines (one line unreadable) and 1 in the Parquet part
    reasons = {p["id"]: (p["reason"], p["file"]) for p in report.problems}
    assert set(reasons) == {"av_odyssey_part1-3", "q4", "q5", "q6", "q7"}  # one line per unusable item
    assert reasons["q4"] == ("media file not found", str(root / "images" / "missing.png"))
    assert reasons["q5"][0] == "item without answer" and reasons["q5"][1].endswith("av_odyssey_part1.jsonl")
    assert reasons["q6"][0] == "the question names [img2] but the item has 1 image(s)"
    assert reasons["q7"][0] == "options lettered D, C, B, A, not A, B, C, D"
    assert reasons["av_odyssey_part1-3"][0].startswith("unreadable line 4")
    rows = {r.id: r for r in df.itertuples()}

    def kinds(row):
        return [next(k for k in ("video", "audio", "image") if c[k]) for c in row.clips]

    # one image and one sound; the prompt keeps the benchmark's letters and order
    q1 = rows["q1"]
    assert kinds(q1) == ["image", "audio"] and q1.clips[0]["image"] == str(root / "images" / "1.png")
    assert q1.question == mc_prompt(
        "Clip 1 Clip 2 Which instrument in the picture makes this sound?",
        ["piano", "violin", "drum", "flute"],
        AV_ODYSSEY_INSTRUCTION,
    )
    assert q1.expect_question == "B" and (q1.task_id, q1.subfield, q1.data_type) == ("1", "Timbre", "image")
    assert q1.source_question.startswith("[img1] [audio1]") and q1.source_file == "av_odyssey_part1.jsonl"
    # several clips in one item: in the order first named, the tags in the options naming clips too
    q2 = rows["q2"]
    assert kinds(q2) == ["audio", "image", "image", "image", "image"] and q2.expect_question == "C"
    assert [c["image"] for c in q2.clips[1:]] == [str(root / "images" / f"{i}.png") for i in range(1, 5)]
    assert list(q2.options) == ["Clip 2", "Clip 3", "Clip 4", "Clip 5"]
    assert q2.question.startswith("Which image shows where Clip 1 was recorded? (A) Clip 2 (B) Clip 3")
    assert kinds(rows["q3"]) == ["video", "audio"]
    # the Parquet part's bytes are written out as files
    p1 = rows["p1"]
    assert kinds(p1) == ["image", "audio"] and p1.expect_question == "D"
    assert p1.clips[0]["image"].endswith("media/p1_image1.png") and p1.clips[1]["audio"].endswith("p1_audio1.wav")
    assert (tmp_path / "out" / "media" / "p1_image1.png").read_bytes() == (root / "images" / "2.png").read_bytes()
    # the model takes the still images and sounds as clips
    sample = samples_from_multiclip(df.iloc[1].to_dict())
    assert [c.image is not None for c in sample.clips] == [False, True, True, True, True]
    inputs = omni.prepare([sample])
    used = inputs.media[0]["clips"]
    assert [u["image"] is not None for u in used] == [False, True, True, True, True] and used[0]["audio"]
    # ... also when a row's prompt is asked of it by an analysis, scored on its letter
    item = items_from_manifest(report.manifest, {"question": "{question}"})[1]
    assert [c.image is not None for c in item.sample.clips] == [False, True, True, True, True]
    assert item.sample.prompt == q2.question and item.expected == "C"
    # one item file as the root
    one = av_odyssey(root / "av_odyssey_part2.parquet", tmp_path / "one")
    assert one.written == 1 and not one.problems
    with pytest.raises(avlens.InputError, match="no AV-Odyssey item files"):
        av_odyssey(tmp_path / "nothing", tmp_path / "o2")


def test_av_speakerbench_table_becomes_lettered_questions_over_each_clip(tmp_path, clip):
    import pandas as pd

    from avlens.data.formats import AV_SPEAKERBENCH_INSTRUCTION, av_speakerbench

    root = tmp_path / "AV-SpeakerBench"
    for name in ("av/a.mp4", "av/b.mp4", "visual/c.mp4"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, root / name)
    _wav(root / "audio" / "c.wav")
    choices = str(["A. the man in grey", "B. the woman in black", "C. the child", "D. nobody"])  # as released
    rows = [
        {"question_id": "s1", "task_id": "speaker_detection", "category": "speaker", "sub_category": "who",
         "question": "Who says 'red line' first?", "choices": choices, "answer": "B", "audio_visual_path": "av/a.mp4"},
        {"question_id": "s2", "task_id": "speech_rate", "category": "speech", "sub_category": "rate",
         "question": "Who speaks fastest?", "choices": choices, "answer": "D", "audio_visual_path": "av/b.mp4"},
        # a video and its sound as separate files: one clip playing both
        {"question_id": "s3", "task_id": "visual_counting", "category": "visual", "sub_category": "count",
         "question": "How many people are visible after she says 'hello'?", "choices": choices, "answer": "A",
         "audio_visual_path": "", "visual_path": "visual/c.mp4", "audio_path": "audio/c.wav"},
        # a missing clip; malformed: choices not lettered in order, an answer outside the letters, a repeated id
        {"question_id": "s4", "question": "Who?", "choices": choices, "answer": "A", "audio_visual_path": "av/x.mp4"},
        {"question_id": "s5", "question": "Who?", "choices": str(["A. x", "C. y"]), "answer": "A",
         "audio_visual_path": "av/a.mp4"},
        {"question_id": "s6", "question": "Who?", "choices": choices, "answer": "E", "audio_visual_path": "av/a.mp4"},
        {"question_id": "s1", "question": "Who?", "choices": choices, "answer": "A", "audio_visual_path": "av/a.mp4"},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "test.csv", index=False)
    report = av_speakerbench(root, tmp_path / "out")
    df = read_manifest(report.manifest)
    assert report.written == len(df) == 3 and list(df.id) == ["s1", "s2", "s3"]
    reasons = [(p["id"], p["reason"]) for p in report.problems]
    assert reasons == [
        ("s4", "media file not found"),
        ("s5", "options lettered A, C, not A, B"),
        ("s6", "answer 'E' is none of the option letters A, B, C, D"),
        ("s1", "question id 's1' repeats an earlier item's"),
    ]
    assert report.problems[0]["file"] == str(root / "av" / "x.mp4")
    s1 = df.iloc[0]
    texts = ["the man in grey", "the woman in black", "the child", "nobody"]
    assert s1.question == mc_prompt("Who says 'red line' first?", texts, AV_SPEAKERBENCH_INSTRUCTION)
    assert s1.video == str(root / "av" / "a.mp4") and list(s1.options) == texts
    assert (s1.task_id, s1.category, s1.sub_category, s1.source_file) == (
        "speaker_detection",
        "speaker",
        "who",
        "test.csv",
    )
    assert df.iloc[2].clips == [
        {"video": str(root / "visual" / "c.mp4"), "audio": str(root / "audio" / "c.wav"), "image": None}
    ]
    # each row asks its own question, scored against its own letter
    items = items_from_manifest(report.manifest, {"question": "{question}"})
    assert [i.expected for i in items] == ["B", "D", "A"] and items[0].sample.prompt == s1.question
    assert items[0].sample.video.endswith("a.mp4")
    (clip3,) = items[2].sample.clips
    assert clip3.video.endswith("c.mp4") and clip3.audio.endswith("c.wav")


def test_the_av_odyssey_and_speakerbench_commands_write_manifests_and_refuse_a_missing_root(tmp_path, clip):
    import pandas as pd
    from test_cli import avlens as cli

    root = _odyssey_root(tmp_path, clip)
    out = cli("data", "av-odyssey", str(root), str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert len(read_manifest(tmp_path / "o" / "manifest.jsonl")) == 4 and "skipped q4: " in out.stderr
    (tmp_path / "sb").mkdir()
    shutil.copy(clip, tmp_path / "sb" / "a.mp4")
    row = {
        "question_id": "s1",
        "question": "Who?",
        "choices": "['A. x', 'B. y']",
        "answer": "A",
        "audio_visual_path": "a.mp4",
    }
    pd.DataFrame([row]).to_parquet(tmp_path / "sb" / "test.parquet")
    out = cli("data", "av-speakerbench", str(tmp_path / "sb"), str(tmp_path / "o2"))
    assert out.returncode == 0, out.stderr
    assert read_manifest(tmp_path / "o2" / "manifest.jsonl").expect_question.tolist() == ["A"]
    for command, name in (("av-odyssey", "AV-Odyssey"), ("av-speakerbench", "AV-SpeakerBench")):
        missing = cli("data", command, str(tmp_path / "nothing"), str(tmp_path / "o3"))
        assert missing.returncode == 2 and f"no {name} item files (no such file or folder)" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr
