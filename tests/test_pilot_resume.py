"""The text-skills pilot is resumable: a run stopped and resumed from its checkpoint is the run straight through
(the same losses, bit-equal weights), and its float16 weights export continues with a fresh optimizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pilot_text_skills.py"
SMALL = ["--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "64"]
FLAGS = [*SMALL, "--steps", "8", "--batch", "4", "--warmup", "2", "--curriculum", "--options-min", "2"]
FLAGS += ["--which-share", "0.2", "--choice-share", "0.3", "--lookup-share", "0.3", "--letters", "v2"]
FLAGS += ["--eval-every", "2", "--eval-n-during", "4", "--eval-n", "4", "--save-every", "3"]


@pytest.fixture(scope="module")
def pilot():
    spec = importlib.util.spec_from_file_location("pilot_text_skills", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(pilot, *extra: str):
    p = pilot.parser()
    return pilot.resolve(p.parse_args([*FLAGS, *extra] if "--resume" not in extra else list(extra)), p)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _curve(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def test_stopped_and_resumed_run_is_the_run_straight_through(pilot, tmp_path):
    straight = pilot.run(_args(pilot, "--ckpt", str(tmp_path / "a"), "--log", str(tmp_path / "a.jsonl")), say=str)
    # 8 steps as 3 + 2 + 3: one stop on a save step (3), one between saves (5)
    first = pilot.run(
        _args(pilot, "--ckpt", str(tmp_path / "b"), "--log", str(tmp_path / "b.jsonl"), "--stop-after", "3"), say=str
    )
    assert first["stopped"]["step"] == 3 and "accuracy" not in first
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 3
    log = str(tmp_path / "b.jsonl")
    second = pilot.run(_args(pilot, "--resume", str(tmp_path / "b"), "--log", log, "--stop-after", "2"), say=str)
    assert second["stopped"]["step"] == 5
    third = pilot.run(_args(pilot, "--resume", str(tmp_path / "b"), "--log", log), say=str)
    assert third["loss"] == straight["loss"] and len(straight["loss"]) == 8
    assert third["accuracy"] == straight["accuracy"]
    a, b = _weights(tmp_path / "a" / "state.pt"), _weights(tmp_path / "b" / "state.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the learning curve is the same too (one line per eval step, no step measured twice)
    ca, cb = _curve(tmp_path / "a.jsonl"), _curve(tmp_path / "b.jsonl")
    assert [r["step"] for r in cb] == [0, 2, 4, 6, 8]
    assert [(r["step"], r["loss"], r["accuracy"]) for r in ca] == [(r["step"], r["loss"], r["accuracy"]) for r in cb]


def test_resume_refuses_other_settings(pilot, tmp_path):
    pilot.run(_args(pilot, "--ckpt", str(tmp_path / "c"), "--stop-after", "1"), say=str)
    p = pilot.parser()
    with pytest.raises(SystemExit):
        pilot.resolve(p.parse_args(["--resume", str(tmp_path / "c"), "--lr", "0.01"]), p)
    ok = pilot.resolve(p.parse_args(["--resume", str(tmp_path / "c"), "--threads", "1"]), p)
    assert ok.hidden == 32 and ok.steps == 8 and ok.letters == "v2"


def test_float16_export_continues_with_a_fresh_optimizer(pilot, tmp_path):
    pilot.run(_args(pilot, "--ckpt", str(tmp_path / "d"), "--stop-after", "4"), say=str)
    p = pilot.parser()
    args = pilot.resolve(p.parse_args(["--resume", str(tmp_path / "d")]), p)
    path = pilot.export_weights(tmp_path / "d" / "state.pt", tmp_path / "w", args)
    info = json.loads((tmp_path / "w" / "pilot.json").read_text())
    assert info["step"] == 4 and info["dtype"] == "float16" and info["config"]["hidden"] == 32
    from safetensors.torch import load_file

    saved = _weights(tmp_path / "d" / "state.pt")
    half = load_file(str(path))
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], saved[k].half()) for k in saved)
    cont = pilot.resolve(p.parse_args(["--from-weights", str(tmp_path / "w"), "--ckpt", str(tmp_path / "e")]), p)
    record = pilot.run(cont, say=str)
    assert len(record["loss"]) == 4 and record["steps_done"] == 8  # steps 5-8 of the same schedule
    state = torch.load(tmp_path / "e" / "state.pt", weights_only=False)
    assert state["step"] == 8 and state["log"]["loss_from"] == 4


def test_sigterm_and_ctrl_c_stop_between_steps(pilot, tmp_path):
    """SIGTERM (or SIGINT) during a step only asks the loop to stop after it: the run stops with its state saved."""
    import os
    import signal

    with pilot.Stopper() as stopper:
        assert not stopper()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper() and stopper.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stopper._signal  # handlers restored

    calls = []

    def say(text: str) -> None:
        calls.append(text)
        if text.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGINT)

    record = pilot.run(_args(pilot, "--ckpt", str(tmp_path / "f"), "--report-every", "1"), say=say)
    assert record["stopped"] == {"step": 2, "reason": "SIGINT"}
    assert torch.load(tmp_path / "f" / "state.pt", weights_only=False)["step"] == 2
