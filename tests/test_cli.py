"""The command line: output formats, exit status and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_av

from avlens.models.tiny import tiny_model


def avlens(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avlens", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tiny_model("qwen2.5-omni", layers=2, save_to=d / "model")
    write_av(d / "clip.mp4", seconds=3.0)
    write_av(d / "silent.mp4", seconds=2.0, audio=False)
    (d / "clip.xyz").write_text("not media")
    return d


def test_models_lists_the_families():
    out = avlens("models")
    assert out.returncode == 0
    for family in ("qwen2.5-omni", "qwen3-omni", "qwen2.5-vl"):
        assert family in out.stdout
    for name in ("organism", "organism:vl-base", "organism:av-vision-heavy", "organism:av-balanced"):
        assert name in out.stdout


def test_inspect_json_has_layout_and_answer(model):
    out = avlens(
        "inspect", str(model / "model"), "--video", str(model / "clip.mp4"), "--prompt", "What do you hear?", "--json"
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    groups = {g["group"]: g for g in data["layout"]}
    assert {"audio", "video", "question", "last", "chunk0", "chunk1"} <= set(groups)
    assert groups["audio"]["count"] == 75 and isinstance(data["answer"], str)
    # the media actually used: from the adapter's per-row report when it gives one, else the files' own
    media = data["media"]
    assert media and json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    used = media["clips"][0]
    assert used["video"]["seconds"] == pytest.approx(3.0, abs=0.2) and used["video"]["frames"] >= 1
    assert used["audio"]["sampling_rate"] == 16000 and used["audio"]["seconds_used"] == pytest.approx(3.0, abs=0.2)
    table = avlens("inspect", str(model / "model"), "--video", str(model / "clip.mp4"), "--prompt", "what do you hear")
    assert table.returncode == 0 and "chunk1" in table.stdout and "answer:" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--video", "{d}/missing.mp4"], "missing.mp4: file not found"),
        (["--video", "{d}/silent.mp4"], "silent.mp4: no audio track"),
        (["--audio", "{d}/clip.xyz"], "clip.xyz: unsupported"),
    ],
)
def test_inspect_bad_input_is_one_line_and_status_2(model, args, message):
    out = avlens("inspect", str(model / "model"), *[a.format(d=model) for a in args], "--prompt", "what do you hear")
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_inspect_unknown_model_is_one_line(model):
    out = avlens("inspect", str(model / "nowhere"), "--video", str(model / "clip.mp4"), "--prompt", "hi")
    assert out.returncode == 2 and "nowhere" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_silent_video_works_without_its_audio(model):
    out = avlens(
        "inspect",
        str(model / "model"),
        "--video",
        str(model / "silent.mp4"),
        "--prompt",
        "what do you see",
        "--no-audio",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert "audio" not in {g["group"] for g in json.loads(out.stdout)["layout"]}


def test_organism_world_and_counterfactual_data(tmp_path):
    out = avlens("organism", "world", "--out", str(tmp_path / "w"), "--n", "4", "--seed", "1")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "w" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"video", "audio", "audio_label", "visual_label"} <= set(rows[0])
    out = avlens(
        "data", "counterfactual", str(tmp_path / "w" / "manifest.jsonl"), str(tmp_path / "cf"), "--organism-groups"
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "cf" / "manifest.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in rows} == {"factual", "swapped", "muted", "blank_video", "audio_only", "video_only"}


def test_run_help_lists_every_analysis_of_the_registry():
    from avlens.analyses import BUILTIN

    out = avlens("run", "--help")
    assert out.returncode == 0, out.stderr
    for name in BUILTIN:
        assert name in out.stdout


def test_an_analysis_needing_a_base_without_one_is_one_line(model, tmp_path):
    """token_shift declares that it needs a base model; the check comes before any model is loaded."""
    out = avlens(
        "run",
        "token_shift",
        "--model",
        str(model / "model"),
        "--data",
        str(tmp_path / "m.jsonl"),
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "token_shift needs a base model" in lines[0], out.stderr
    assert not (tmp_path / "run.json").exists()
