"""Analyses are plugins: a toy analysis defined in this file, registered at run time, shows up in
``avlens run --help``, runs through ``reproduce`` and ``avlens run`` (the one orchestration), and appears in the
report, without any other file of the package touched. Summaries are typed (a typo is an error, not NaN),
specs are checked, and summary.json is strict JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from typer.testing import CliRunner

import avlens
from avlens.analyses import Analysis, Finding, Needs, get, names, register, strict_json, unregister, verdict
from avlens.analyses.common import Item, batches, first_token
from avlens.models.tiny import tiny_model
from avlens.organism.world import CLASSES, LABEL_GROUPS, WorldConfig, write_world
from avlens.reproduce import reproduce

WORDS = (*CLASSES, "what", "do", "you", "hear", "see", "nothing", "describe", "and", "i", "a")
TOY_TITLE = "Toy: probability of the audio label at the answer position"
TOY_CLAIM = "A toy claim: the answer position gives the heard label some probability"


# ---------------------------------------------------------------------------------------------------------
# The toy analysis: everything it is, in this file
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual",)
    batch_size: int = 8


@dataclass(frozen=True)
class ToySummary:
    mean_p_audio: float | None
    n_items: int
    undefined: float  # always NaN here: summary.json must still be strict JSON


def toy_collect(adapter, items: list[Item], config: ToyConfig) -> dict[str, list[dict]]:
    """One engine forward per batch (the public API); the audio label's probability at the last position."""
    rows, errors = [], []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        probs = torch.softmax(avlens.run(adapter, inputs).logits.float(), -1)  # (B, V)
        for b, it in enumerate(chunk):
            p = float(probs[b, first_token(adapter, it.audio_label)]) if it.audio_label else float("nan")
            rows.append(it.record(p_audio=p))
    return {"probs": rows, "errors": errors}


def toy_summarize(tables: dict[str, pd.DataFrame]) -> ToySummary:
    p = tables["probs"].p_audio
    return ToySummary(mean_p_audio=float(p.mean()) if len(p) else None, n_items=len(p), undefined=float("nan"))


def toy_findings(summaries: dict[str, ToySummary]) -> list[Finding]:
    calls = [
        None if s.mean_p_audio is None else "agrees" if s.mean_p_audio > 0 else "disagrees" for s in summaries.values()
    ]
    measured = "; ".join(
        f"{m}: toy mean p(audio) {s.mean_p_audio:.2e} over {s.n_items} items" for m, s in summaries.items()
    )
    return [Finding(TOY_CLAIM, "some probability", measured, verdict(calls))]


def toy_plot(tables: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.bar(list(tables), [t["probs"].p_audio.mean() for t in tables.values()], color="#1b9e77")
    fig.suptitle("Toy probability")
    return fig


TOY = Analysis(
    name="toy_prob",
    title=TOY_TITLE,
    claim=TOY_CLAIM,
    Config=ToyConfig,
    Summary=ToySummary,
    headline="mean_p_audio",
    collect=toy_collect,
    summarize=toy_summarize,
    findings=toy_findings,
    plot=toy_plot,
    needs=Needs(),
    paper="toy",
    about="A toy analysis defined in tests/test_plugins.py.",
)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister(TOY.name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny saved model and a counterfactual set of 4 organism-world clips (the toy asks about the factual)."""
    from avlens.data import counterfactual

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plugins")
    tiny_model("qwen2.5-omni", layers=2, words=WORDS, save_to=root / "model", seed=4)
    write_world(root / "world", 4, 0, cfg=WorldConfig(height=112, width=112))
    counterfactual(
        root / "world" / "manifest.jsonl",
        root / "cf",
        groups={k: list(v) for k, v in LABEL_GROUPS.items()},
        conditions=("factual", "swapped"),
    )
    return root


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity."""

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------
# Registry and command line
# ---------------------------------------------------------------------------------------------------------
def test_registered_analysis_is_listed_and_found(toy):
    assert names()[-1] == "toy_prob" and get("toy_prob") is toy
    assert names()[:6] == ["counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share"]
    with pytest.raises(ValueError, match="already registered"):
        register(toy)
    unregister("toy_prob")
    assert "toy_prob" not in names()
    with pytest.raises(avlens.InputError, match="unknown analysis 'toy_prob'"):
        get("toy_prob")


def test_run_help_lists_the_registered_analysis(toy):
    from avlens.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "toy_prob" in result.output and "token_shift" in result.output
    unregister("toy_prob")
    assert "toy_prob" not in CliRunner().invoke(app, ["run", "--help"], terminal_width=400).output


def test_avlens_run_runs_the_toy(toy, setup, tmp_path):
    from avlens.cli import app

    out = tmp_path / "run"
    args = ["run", "toy_prob", "--model", str(setup / "model"), "--data", str(setup / "cf" / "manifest.jsonl")]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = strict_loads((out / "summary.json").read_text())
    assert summary["headline"]["toy_prob"] == {
        "figure": "mean_p_audio",
        "models": {"model": pytest.approx(summary["details"]["toy_prob"]["model"]["mean_p_audio"])},
    }
    assert (
        summary["details"]["toy_prob"]["model"]["n_items"] == 4
        and summary["details"]["toy_prob"]["model"]["undefined"] is None
    )
    assert TOY_TITLE in (out / "report.html").read_text()
    # the run directory refuses a changed config, as reproduce's does
    again = CliRunner().invoke(app, [*args, "--out", str(out), "--question", "hear=What is heard?"])
    assert again.exit_code == 2 and "config" in again.output


# ---------------------------------------------------------------------------------------------------------
# reproduce and the report
# ---------------------------------------------------------------------------------------------------------
def test_reproduce_runs_the_toy_into_records_summary_and_report(toy, setup, tmp_path):
    result = reproduce(
        tmp_path / "out",
        models={"tiny": str(setup / "model")},
        base=None,
        data=setup / "cf" / "manifest.jsonl",
        analyses=["toy_prob"],
    )
    s = result.summary["toy_prob"]["tiny"]
    assert isinstance(s, ToySummary) and s.n_items == 4 and s.mean_p_audio > 0
    records = pd.read_parquet(result.out / "results" / "toy_prob.probs.parquet")
    assert len(records) == 4 and set(records.condition) == {"factual"} and np.isfinite(records.p_audio).all()
    assert s.mean_p_audio == pytest.approx(records.p_audio.mean())
    summary = strict_loads((result.out / "summary.json").read_text())
    assert set(summary["headline"]) == {"toy_prob"}
    assert summary["details"]["toy_prob"]["tiny"] == {"mean_p_audio": s.mean_p_audio, "n_items": 4, "undefined": None}
    html = result.report.read_text()
    assert TOY_TITLE in html and TOY_CLAIM in html and "toy mean p(audio)" in html
    assert html.count("data:image/png;base64,") == 1


# ---------------------------------------------------------------------------------------------------------
# Typed summaries, checked specs, strict JSON
# ---------------------------------------------------------------------------------------------------------
def test_a_typo_in_a_summary_is_an_error_not_nan():
    from avlens.analyses import knockout

    s = toy_summarize({"probs": pd.DataFrame({"p_audio": [0.25, 0.75]})})
    assert s.mean_p_audio == 0.5
    with pytest.raises(AttributeError):
        _ = s.mean_p_audoi  # the typo is the point
    with pytest.raises(AttributeError):
        _ = knockout.Summary().swapped_follows_audio_after_video_knockut
    with pytest.raises(TypeError):
        knockout.Summary(swaped_follows_audio_base=0.5)
    # every built-in headline is a field of its summary type
    for name in ("counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share"):
        spec = get(name)
        assert spec.headline in spec.Summary.__dataclass_fields__


def test_a_headline_that_is_not_a_summary_field_is_refused():
    with pytest.raises(ValueError, match="headline 'mean_p_audoi' is not a field of ToySummary"):
        Analysis(
            "bad", "t", "c", ToyConfig, ToySummary, "mean_p_audoi", toy_collect, toy_summarize, toy_findings, toy_plot
        )
    with pytest.raises(TypeError, match="default_config"):
        Analysis(
            "bad",
            "t",
            "c",
            ToyConfig,
            ToySummary,
            "n_items",
            toy_collect,
            toy_summarize,
            toy_findings,
            toy_plot,
            default_config=object(),
        )


def test_strict_json_turns_nan_and_infinities_into_null():
    data = {"a": float("nan"), "b": [float("inf"), -float("inf"), np.float32(0.5)], "c": ToySummary(None, 2, np.nan)}
    out = strict_json(data)
    assert out == {"a": None, "b": [None, None, 0.5], "c": {"mean_p_audio": None, "n_items": 2, "undefined": None}}
    assert strict_loads(json.dumps(out, allow_nan=False)) == out


def test_token_shift_declares_its_base_and_it_is_checked():
    from avlens.reproduce import check_needs

    assert get("token_shift").needs.base and not get("knockout").needs.base
    with pytest.raises(avlens.InputError, match="token_shift needs a base model"):
        check_needs(get("token_shift"), base=None)
