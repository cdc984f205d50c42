"""Figures that must mean what their names say: what an answer follows (both labels, congruent clips), swapped
clips that stay swapped through the counterfactual builder, headline names, the probe's dropped classes, the
KL verdict and missing figures as null with n = 0."""

from __future__ import annotations

import numpy as np
import pandas as pd

from avlens.analyses import counterfactual, knockout, probe, token_shift
from avlens.analyses.common import Item, follows, token_follows
from avlens.data import counterfactual as build_counterfactual
from avlens.data import read_manifest
from avlens.models.base import Sample
from avlens.organism.world import LABEL_GROUPS, WorldConfig, write_world


def item(heard: str | None, seen: str | None, condition: str = "factual") -> Item:
    return Item("x/hear", Sample("What do you hear?"), condition, "hear", heard, seen, heard or "nothing")


# ---------------------------------------------------------------------------------------------------------
# 9: follows
# ---------------------------------------------------------------------------------------------------------
def test_follows_names_both_labels_and_congruent_clips():
    swapped = item("bell", "dog", "swapped")
    assert follows("bell", swapped) == "audio"
    assert follows("a dog", swapped) == "visual"
    assert follows("a dog and a bell", swapped) == "both"
    assert follows("a cat", swapped) == "neither"
    congruent = item("dog", "dog")  # sound and picture of one class: naming it follows both
    assert follows("dog", congruent) == "both"
    assert follows("cat", congruent) == "neither"
    assert follows("dog", item("dog", None, "blank_video")) == "audio"


def test_knockout_factual_level_counts_congruent_answers():
    """A congruent clip answered with its one label names the sound: the factual level is 100%, not 0%."""
    assert token_follows(7, 7, 7) == "both"
    assert token_follows(7, 7, 8) == "audio" and token_follows(8, 7, 8) == "visual"
    assert token_follows(9, 7, 8) == "neither"
    rows = []
    for i, cond in enumerate(["factual"] * 2 + ["swapped"] * 2):
        for s in range(3):
            base = "both" if cond == "factual" else "visual"
            rows.append(
                {
                    "id": str(i),
                    "condition": cond,
                    "edge": "answer->video",
                    "window_start": s,
                    "window_end": s + 2,
                    "delta_audio": 0.0,
                    "delta_visual": 0.0,
                    "dp_expected": 0.0,
                    "follows": base if s < 2 else ("both" if cond == "factual" else "audio"),
                    "follows_base": base,
                    "correct": True,
                    "correct_base": True,
                }
            )
    s = knockout.summarize({"knockout": pd.DataFrame(rows)})
    assert s.factual_follows_audio_base == 1.0
    assert s.swapped_follows_audio_base == 0.0 and s.swapped_follows_audio_after_video_knockout == 1.0
    assert "factual level 100%" in knockout.findings({"m": s})[0].measured


def test_counterfactual_summary_counts_both_and_n():
    answers = pd.DataFrame(
        [
            {"condition": "factual", "question": "hear", "correct": True, "follows": "both"},
            {"condition": "swapped", "question": "hear", "correct": False, "follows": "visual"},
            {"condition": "swapped", "question": "hear", "correct": True, "follows": "both"},
            {"condition": "swapped", "question": "describe", "correct": None, "follows": "neither"},
        ]
    )
    s = counterfactual.summarize({"answers": answers})
    assert s.follows_vision_rate == 0.5 and s.follows_both_rate == 0.5 and s.follows_audio_rate == 0.0
    assert s.n_swapped_hear == 2 and s.n["hear"] == {"factual": 1, "swapped": 2}
    # 4: a figure with no data is None with n = 0, never 0.0
    assert s.accuracy["describe"]["swapped"] is None and s.n["describe"]["swapped"] == 0


# ---------------------------------------------------------------------------------------------------------
# 10: a world's swapped clips stay swapped
# ---------------------------------------------------------------------------------------------------------
def test_a_worlds_swapped_clips_stay_swapped_through_the_builder(tmp_path):
    cfg = WorldConfig(duration=0.5, height=32, width=48, fps=8)
    world = write_world(tmp_path / "world", 6, seed=3, cfg=cfg, swapped_share=0.5, workers=1)
    source = read_manifest(world).set_index("id", drop=False)
    assert set(source.condition) == {"congruent", "swapped"}
    report = build_counterfactual(world, tmp_path / "cf", groups=LABEL_GROUPS, seed=0)
    out = read_manifest(report.manifest)
    assert report.problems == []
    for source_id, rows in out.groupby("source_id"):
        src = source.loc[source_id]
        by = rows.set_index("condition")
        swapped = by.loc["swapped"]
        if src.condition == "swapped":
            assert "factual" not in by.index  # its own clip is not factual
            assert swapped["audio_label"] == swapped["expect_hear"] == src.audio_label  # the sound it plays
            assert swapped["visual_label"] == src.visual_label != src.audio_label
            assert swapped["partner_id"] is None
        else:
            assert by.loc["factual", "audio_label"] == by.loc["factual", "visual_label"] == src.audio_label
            assert swapped["partner_id"] is not None and swapped["audio_label"] != src.audio_label
    factual = out[out.condition == "factual"]
    assert (factual.audio_label == factual.visual_label).all()
    n_swapped_sources = int((source.condition == "swapped").sum())
    assert report.counts["factual"] == len(source) - n_swapped_sources
    assert report.counts["swapped"] == len(source)


def test_a_world_is_congruent_by_default(tmp_path):
    cfg = WorldConfig(duration=0.5, height=32, width=48, fps=8)
    source = read_manifest(write_world(tmp_path, 4, seed=1, cfg=cfg, workers=1))
    assert set(source.condition) == {"congruent"}


# ---------------------------------------------------------------------------------------------------------
# 12: the probe says what it dropped and shows n
# ---------------------------------------------------------------------------------------------------------
def probe_features(counts: dict[str, int], layers: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    labels = [label for label, n in counts.items() for _ in range(n)]
    for i, label in enumerate(labels):
        for layer in range(layers):
            rows.append(
                {
                    "id": f"{i:03d}/hear",
                    "question": "hear",
                    "condition": "swapped",
                    "site": "audio",
                    "layer": layer,
                    "audio_label": label,
                    "visual_label": None,
                    "vector": rng.normal(size=8).astype(np.float32),
                }
            )
    return pd.DataFrame(rows)


def test_probe_reports_what_it_dropped_and_why():
    config = probe.Config(folds=4)
    # one class with enough clips, two with fewer than the folds: no probe can be fitted, and it says so
    tables = probe.finalize({"features": probe_features({"dog": 6, "cat": 3, "bell": 2})}, config)
    assert tables["probes"].empty
    skipped = tables["skipped"]
    assert len(skipped) == 1 and skipped.iloc[0].n == 11 and skipped.iloc[0].dropped == "bell (2), cat (3)"
    s = probe.summarize(tables)
    assert s.swapped_last_audio_accuracy is None and s.swapped_last_audio_n == 0
    why = s.skipped["hear/swapped/audio/audio_label"]
    assert "kept dog (6)" in why and "bell (2), cat (3)" in why and "n = 11" in why
    assert "bell (2), cat (3)" in probe.findings({"m": s})[0].measured
    # two classes kept: fitted, with n and what was dropped in the summary and the finding
    tables = probe.finalize({"features": probe_features({"dog": 6, "cat": 5, "bell": 2})}, config)
    s = probe.summarize(tables)
    p = s.slices["hear/swapped/audio/audio_label"]
    assert (p.n, p.n_classes, p.dropped) == (11, 2, "bell (2)")
    assert "n = 11" in probe.findings({"m": s})[0].measured and "bell (2)" in probe.findings({"m": s})[0].measured


# ---------------------------------------------------------------------------------------------------------
# 13: the KL verdict is not driven by the answer template's fixed words
# ---------------------------------------------------------------------------------------------------------
def test_kl_verdict_rests_on_content_tokens_and_template_tokens_are_marked():
    rows = []
    words = ["i", "see", "X", "and", "hear", "Y"]
    for i in range(20):
        for pos, w in enumerate(words):
            content = w in ("X", "Y")
            token_id = 100 + i % 5 if content else pos  # content words vary between answers, template words do not
            kl = 0.2 if content else (10.0 if w in ("and", "hear") else 0.01)
            rows.append(
                {"id": f"{i}/describe", "condition": "factual", "position": pos, "token_id": token_id, "token": w,
                 "rank": 1, "shift": "unshifted", "kl": kl, "audio_word": w == "Y"}
            )  # fmt: skip
    tables = token_shift.finalize({"tokens": pd.DataFrame(rows)}, token_shift.Config())
    assert tables["tokens"].template.sum() == 20 * 4
    pos = tables["positions"].set_index("position")
    assert list(pos.template) == [True, True, False, True, True, False] and pos.loc[3, "kl_median"] == 10.0
    s = token_shift.summarize(tables)
    assert s.mean_kl > 3 and s.median_kl == 0.2  # the mean is the template's
    assert s.content_mean_kl == 0.2 and s.n_content_tokens == 40 and s.n_template_tokens == 80
    assert s.template_tokens == {0: "i", 1: "see", 3: "and", 4: "hear"}
    assert s.median_kl_by_position[3] == 10.0
    kl = token_shift.findings({"m": s})[1]
    assert kl.verdict == "agrees" and "'and'" in kl.measured and "median" in kl.measured
