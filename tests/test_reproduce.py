"""`reproduce` end to end on a tiny model and a small organism set: records, summary, report, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import count_colour, screenshot

from avlens.models.tiny import tiny_model
from avlens.organism.world import CLASSES, LABEL_GROUPS, WorldConfig, write_world
from avlens.reproduce import reproduce

WORDS = (*CLASSES, "what", "do", "you", "hear", "see", "nothing", "describe", "and", "i", "a")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model (also used as the base) and a counterfactual set of 8 organism-world clips."""
    from avlens.data import counterfactual

    root = tmp_path_factory.mktemp("repro")
    tiny_model("qwen2.5-omni", layers=3, words=WORDS, save_to=root / "model", seed=4)
    write_world(root / "world", 8, 0, cfg=WorldConfig(height=112, width=112))
    counterfactual(root / "world" / "manifest.jsonl", root / "cf", groups={k: list(v) for k, v in LABEL_GROUPS.items()})
    return root


def _run(setup: Path, out: Path, analyses=None):
    return reproduce(
        out,
        models={"tiny": str(setup / "model")},
        base=str(setup / "model"),
        data=setup / "cf" / "manifest.jsonl",
        analyses=analyses,
    )


def _refuse(constant: str):
    raise ValueError(f"summary.json is not strict JSON: {constant}")


def test_every_analysis_runs_and_reports(setup, tmp_path):
    result = _run(setup, tmp_path / "out")
    out = result.out
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse)  # strict JSON: no NaN
    names = {"counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share"}
    assert set(summary["headline"]) == names
    for name, h in summary["headline"].items():
        assert set(h["models"]) == {"tiny"} and h["figure"], name
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["models"] == {"tiny": str(setup / "model")} and len(run["meta"]["model_sha256"]["tiny"]) == 64
    results = {p.stem: pd.read_parquet(p) for p in (out / "results").glob("*.parquet")}
    assert {
        "counterfactual.answers",
        "probe.features",
        "logit_lens.lens",
        "knockout.knockout",
        "token_shift.tokens",
        "attention_share.shares",
    } <= set(results)
    answers = results["counterfactual.answers"]
    assert set(answers.condition) == {"factual", "swapped", "muted", "blank_video", "audio_only", "video_only"}
    assert len(answers) == 8 * 6 * 2
    tokens = results["token_shift.tokens"]
    assert (tokens["rank"] >= 1).all() and set(tokens["shift"]) <= {"unshifted", "marginal", "shifted"}
    # Knockout sweep: a record for every edge and window (3 layers, windows of 2: starts 0 and 1).
    ko = results["knockout.knockout"]
    assert set(ko.window_start) == {0, 1} and ko.edge.nunique() == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "http://" not in html and "https://" not in html


def test_a_resumed_run_equals_an_uninterrupted_one(setup, tmp_path):
    """Kill a run (SIGKILL) while it is writing records, re-run into the same directory, compare."""
    full = _run(setup, tmp_path / "full", analyses=["counterfactual", "knockout", "attention_share"]).out
    killed = tmp_path / "killed"
    here = str(Path(__file__).parent)
    script = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {here!r}); from test_reproduce import _run; "
        f"_run(Path({str(setup)!r}), Path({str(killed)!r}), ['counterfactual', 'knockout', 'attention_share'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        units = list((killed / "units").glob("*")) if (killed / "units").exists() else []
        if len([u for u in units if not u.name.startswith(".")]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()  # it really was stopped part way
    _run(setup, killed, analyses=["counterfactual", "knockout", "attention_share"])
    for table in (full / "results").glob("*.parquet"):
        a = pd.read_parquet(table)
        b = pd.read_parquet(killed / "results" / table.name)
        key = [c for c in ("model", "id", "layer", "key", "edge", "window_start") if c in a]
        a = a.sort_values(key).reset_index(drop=True)
        b = b.sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)


def test_a_changed_config_is_refused(setup, tmp_path):
    from avlens.errors import AvlensError

    _run(setup, tmp_path / "out", analyses=["attention_share"])
    with pytest.raises(AvlensError, match="config"):
        _run(setup, tmp_path / "out", analyses=["counterfactual"])


def test_report_renders_in_chromium(setup, tmp_path):
    """A headless-Chromium screenshot of the report shows its figures (coloured plot pixels, not just text)."""
    result = _run(setup, tmp_path / "out", analyses=["counterfactual", "attention_share"])
    stripped = tmp_path / "no-figures.html"
    stripped.write_text(re.sub(r"<img [^>]*>", "", result.report.read_text()))

    def coloured(path: Path) -> int:
        """Pixels in the figures' audio and video colours (#1b9e77, #d95f02), which nothing else uses."""
        img = screenshot(path, tmp_path, height=4000)
        return sum(count_colour(img, c, tolerance=12) for c in ((27, 158, 119), (217, 95, 2)))  # disjoint colours

    with_figures, without = coloured(result.report), coloured(stripped)
    assert with_figures > 2000 and without == 0
