"""`reproduce` end to end on a tiny model and a small organism set: records, summary, report, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import count_colour, screenshot

from avlens.analyses import Analysis, register, unregister
from avlens.errors import AvlensError
from avlens.models.tiny import tiny_model
from avlens.organism.world import CLASSES, LABEL_GROUPS, WorldConfig, write_world
from avlens.reproduce import execute, reproduce

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
    names = {"counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share"}  # P1
    names |= {"sinks", "causal_trace", "mitigate"}  # P2
    names |= {"flow", "route", "discard"}  # P3
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
        "sinks.positions",
        "causal_trace.items",
        "mitigate.probes",
        "flow.flow",
        "route.route",
        "discard.discard",
        "discard.latency",
    } <= set(results)
    # Tables an analysis's finalize computes from the records are results too, with the model beside each row.
    for table in ("probe.probes", "probe.skipped", "token_shift.positions"):
        assert table in results, table
        assert set(results[table]["model"]) <= {"tiny"}, table
    # (8 clips of 8 classes: too few per class to fit a probe; the skipped table says so, slice by slice.)
    assert len(results["probe.skipped"]) > 0 and set(results["probe.skipped"]["model"]) == {"tiny"}
    assert len(results["token_shift.positions"]) > 0
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


# ---------------------------------------------------------------------------------------------------------
# Resume: the run's identity is the manifest's content; what is saved and skipped is said (no model needed)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CountConfig:
    questions: dict = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple = ("factual",)
    batch_size: int = 2


@dataclass(frozen=True)
class CountSummary:
    n: int


class Stop:
    after: int | None = None  # raise KeyboardInterrupt in the collect call after this many
    calls = 0


def _count_collect(adapter, items, config):
    Stop.calls += 1
    if Stop.after is not None and Stop.calls > Stop.after:
        raise KeyboardInterrupt
    return {"items": [{"item": it.id, "audio_label": it.audio_label} for it in items]}


def _count_plot(tables):
    from matplotlib.figure import Figure

    return Figure(figsize=(2, 2))


COUNT = Analysis(
    name="count_items",
    title="Count",
    claim="Counts items",
    Config=CountConfig,
    Summary=CountSummary,
    headline="n",
    collect=_count_collect,
    summarize=lambda t: CountSummary(n=len(t["items"])),
    findings=lambda s: [],
    plot=_count_plot,
    paper="test",
    about="A model-free analysis for tests of resume.",
)


@pytest.fixture
def count(tmp_path):
    register(COUNT)
    Stop.after, Stop.calls = None, 0
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(9):
        (media / f"c{i}.mp4").write_bytes(b"x" * (i + 1))
        rows.append({"id": f"r{i}", "video": str(media / f"c{i}.mp4"), "audio_label": "bell", "visual_label": "cat"})
    yield rows
    unregister(COUNT.name)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _execute(out: Path, manifest, log=None, progress=None):
    config = {"models": {"m": "none"}, "analysis": "count_items", "data": str(manifest)}
    return execute(out, config, {}, {"count_items": CountConfig()}, {"m": None}, manifest, log=log, progress=progress)


def test_ctrl_c_says_what_was_saved_and_a_reordered_manifest_resumes_to_the_same_records(count, tmp_path):
    first = _write(tmp_path / "a" / "manifest.jsonl", count)
    out = tmp_path / "run"
    Stop.after = 2
    with pytest.raises(KeyboardInterrupt, match=rf"saved 2 of 5 units in {re.escape(str(out))}; re-run the same"):
        _execute(out, first)
    # the same rows in another order, in another directory, given by a relative path
    _write(tmp_path / "b" / "cf" / "manifest.jsonl", list(reversed(count)))
    Stop.after, said, seen = None, [], []
    cwd = os.getcwd()
    os.chdir(tmp_path / "b")
    try:
        _execute(out, Path("cf/manifest.jsonl"), log=said.append, progress=lambda *a: seen.append(a))
    finally:
        os.chdir(cwd)
    assert said == ["resuming: 2 of 5 units already done, skipped"]
    # a bar from the start, which counts the 4 items of the saved units at once
    assert seen[0] == ("count_items · m", 4, 9) and seen[-1] == ("count_items · m", 9, 9)
    items = pd.read_parquet(out / "results" / "count_items.items.parquet").item
    assert sorted(items) == sorted(f"r{i}/hear" for i in range(9)) and items.is_unique
    # absolute and relative spellings of the first manifest resume too
    assert _execute(out, first.resolve()).summary["count_items"]["m"].n == 9


def test_changed_rows_or_media_are_refused_saying_what_changed(count, tmp_path):
    manifest = _write(tmp_path / "a" / "manifest.jsonl", count)
    out = tmp_path / "run"
    _execute(out, manifest)
    changed = [*count[:7], {**count[7], "audio_label": "drum"}, {**count[0], "id": "new"}]
    with pytest.raises(AvlensError, match=r"rows differ from the run's \(1 added, 1 removed, 1 changed\)"):
        _execute(out, _write(tmp_path / "b" / "manifest.jsonl", changed))
    Path(count[3]["video"]).write_bytes(b"rewritten")
    with pytest.raises(AvlensError, match=rf"media file {re.escape(count[3]['video'])} changed since the run started"):
        _execute(out, manifest)
