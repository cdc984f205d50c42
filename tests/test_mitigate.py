"""Hallucination mitigation (P2): the steering no-ops, the probes built from a clip's labels, the dev/test split
and the choice on dev, P2's guidance schedule on hand-made attention, and the analysis on the organism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import samples_for
from test_report import documented_columns

import avlens
from avlens import Steer, generate, run, run_conditions
from avlens.analyses import mitigate as mt
from avlens.analyses.common import Item, items_from_manifest


@pytest.fixture(scope="module")
def batch(models):
    adapter = models["qwen2.5-omni"]
    return adapter, adapter.prepare(samples_for(adapter, 5, 2))


def test_alpha_zero_and_an_empty_set_change_nothing_bit_for_bit(batch):
    adapter, inputs = batch
    n = adapter.n_layers
    base = run(adapter, inputs).logits
    none = torch.zeros_like(inputs.layout.valid)
    grouped = replace(inputs, layout=inputs.layout.with_group("mit_cross", none))
    out = run_conditions(
        adapter,
        grouped,
        {
            "alpha0": [Steer("video", layers=range(n), alpha=0.0, query="last")],
            "empty": [Steer("mit_cross", layers=range(n), alpha=1.0, query="last")],
        },
    )
    assert torch.equal(out["alpha0"].logits, base) and torch.equal(out["empty"].logits, base)
    plain = generate(adapter, inputs, max_new_tokens=5)
    for steer in (Steer("mit_cross", layers=range(n), alpha=1.0), Steer("video", layers=range(n), alpha=0.0)):
        steered = generate(adapter, grouped, [steer], max_new_tokens=5)
        assert torch.equal(plain.tokens, steered.tokens)
        assert torch.equal(plain.step_logits.nan_to_num(), steered.step_logits.nan_to_num())


def _item(clip: str, heard: str | None, seen: str | None) -> Item:
    return Item(f"{clip}/describe", avlens.Sample("describe"), "factual", "describe", heard, seen, None)


def test_probes_ask_present_and_absent_classes_in_both_directions():
    config = mt.Config()
    vocab = ["bell", "dog", "owl", "drum"]
    swapped = {k: (p, e) for k, p, e in mt.probes_of(_item("c1", "dog", "bell"), config, vocab)}
    assert swapped["hear_present"] == ("Is there a sound of a dog?", "yes")
    assert swapped["see_present"] == ("Do you see a bell?", "yes")
    assert swapped["hear_seen_only"] == ("Is there a sound of a bell?", "no")
    assert swapped["see_heard_only"] == ("Do you see a dog?", "no")
    neither = swapped["hear_neither"][0].split()[-1].rstrip("?")
    assert neither in ("owl", "drum") and swapped["see_neither"][0].endswith(f"{neither}?")
    assert "an owl" in mt.probes_of(_item("c1", "owl", "owl"), config, vocab)[0][1]
    # a congruent clip has no cross-modal absent probe; a silent one no hearing probe
    congruent = {k for k, _, _ in mt.probes_of(_item("c2", "dog", "dog"), config, vocab)}
    assert congruent == {"hear_present", "see_present", "hear_neither", "see_neither"}
    silent = {k for k, _, _ in mt.probes_of(_item("c3", None, "dog"), config, vocab)}
    assert "hear_present" not in silent and "see_present" in silent


def test_the_modal_scorer_reads_which_modality_each_label_is_claimed_for():
    item = _item("c1", "dog", "bell")  # heard dog, seen bell
    vocab = ["bell", "dog", "owl", "fire truck"]
    assert mt.modal_scorer("i see a bell and hear a dog", item, vocab) == (["bell", "dog"], [])
    assert mt.modal_scorer("i see a bell and hear a bell", item, vocab) == (["bell", "bell"], ["bell"])
    assert mt.modal_scorer("A dog barks; the video shows an owl.", item, vocab) == (["dog", "owl"], ["owl"])
    assert mt.modal_scorer("I hear a fire truck", item, vocab) == (["fire truck"], ["fire truck"])
    assert mt.labels_scorer("i see a bell and hear a bell", item, vocab) == (["bell"], [])
    assert mt.labels_scorer("an owl", item, vocab) == (["owl"], ["owl"])


def test_the_setting_is_chosen_on_dev_and_reported_on_test():
    rows = []
    for clip in (f"c{i}" for i in range(40)):
        split = mt.split_of(clip)
        for setting, right_on in (("a", "dev"), ("b", "test")):
            for probe in ("hear_present", "hear_seen_only"):
                rows.append(
                    {
                        "item": clip,
                        "probe": probe,
                        "method": "steer_cross",
                        "setting": setting,
                        "split": split,
                        "correct": split == right_on,
                    }
                )
            rows.append(
                {
                    "item": clip,
                    "probe": "hear_present",
                    "method": "plain",
                    "setting": "-",
                    "split": split,
                    "correct": True,
                }
            )
            rows.append(
                {
                    "item": clip,
                    "probe": "hear_seen_only",
                    "method": "plain",
                    "setting": "-",
                    "split": split,
                    "correct": False,
                }
            )
    probes = pd.DataFrame(rows)
    assert {mt.split_of(f"c{i}") for i in range(40)} == {"dev", "test"}
    assert mt.chosen_settings(probes) == {"steer_cross": "a", "plain": "-"}  # right on dev, whatever test says
    s = mt.summarize({"probes": probes})
    assert s.chosen["steer_cross"] == "a" and s.balanced["steer_cross"] == 0.0 and s.balanced["plain"] == 0.5
    assert s.gain["steer_cross"][0] == pytest.approx(-0.5) and s.cross_gain == pytest.approx(-0.5)


def test_p2s_schedule_on_hand_made_attention():
    sched = mt.P2Schedule(0.5, layers=[0])

    def mass(cross, sinks, after):  # (R=1, H=2, G=3), the same on both heads
        return {"guidance_mass": {0: torch.tensor([[[cross, sinks, after]] * 2])}}

    prev = torch.zeros(1)
    # w = 1 (all sink attention on cross-modal sinks), little text: target = min(0.6, 0.5) = 0.5, s = 0.25
    s1 = sched.weight(0, mass(0.2, 0.2, 0.1), prev)
    assert s1.item() == pytest.approx(0.25)
    assert sched.weight(1, mass(0.2, 0.2, 0.1), s1).item() == pytest.approx(0.375)  # 0.5 * 0.25 + 0.5 * 0.5
    # w = 0.3 < 0.6: target = 0.15 * (0.3 / 0.6)^2
    assert sched.weight(0, mass(0.03, 0.1, 0.1), prev).item() == pytest.approx(0.5 * 0.15 * 0.25)
    # T = 0.5: tapered by 0.5 (1 + cos(pi / 2)) = 0.5; T >= 0.6: tapered to 0
    assert sched.weight(0, mass(0.2, 0.2, 0.5), prev).item() == pytest.approx(0.5 * 0.5 * 0.5)
    assert sched.weight(0, mass(0.2, 0.2, 0.7), prev).item() == pytest.approx(0.0, abs=1e-7)
    # no attention to sinks at all: no guidance
    assert sched.weight(0, mass(0.0, 0.0, 0.1), prev).item() == 0.0
    assert mt.guidance_layers(mt.Config(), 28) == list(range(18, 26))
    assert mt.guidance_layers(mt.Config(), 4) == [2, 3]


def test_unknown_options_are_refused_in_one_line():
    with pytest.raises(avlens.InputError, match="unknown method 'beam'"):
        mt.Config(methods=("plain", "beam"))
    with pytest.raises(avlens.InputError, match="unknown scorer 'judge'"):
        mt.Config(scorer="judge")


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    from avlens.organism.world import CLASSES
    from avlens.reproduce import _organism_data

    manifest = _organism_data(tmp_path_factory.mktemp("mit"), 8, 0, None)
    config = replace(mt.Config(), labels=tuple(CLASSES), alphas=(1.0,), starts=(0.25,), bases=(0.5,))
    items = items_from_manifest(manifest, config.questions, conditions=("factual", "swapped"))
    adapter = avlens.load("organism:av-vision-heavy")
    return {k: pd.DataFrame(v) for k, v in mt.collect(adapter, items, config).items()}, items


def test_on_the_vision_heavy_organism(organism_run):
    """The vision-heavy organism hears what it sees on swapped clips: plain decoding says yes to the seen-only
    sound; every table has every probe and method, records agree with themselves, and columns are documented."""
    tables, items = organism_run
    probes, desc = tables["probes"], tables["descriptions"]
    assert set(probes.method) == set(mt.METHODS) and set(desc.method) == set(mt.METHODS)
    plain = probes[probes.method == "plain"]
    seen_only = plain[(plain.probe == "hear_seen_only") & (plain.condition == "swapped")]
    assert len(seen_only) > 0 and (seen_only.answer == "yes").mean() >= 0.75  # the hallucination to mitigate
    assert (plain.correct == (plain.answer == plain.expected)).all()
    assert ((probes.p_yes > 0.5) == (probes.answer == "yes")).all()
    n_items = len(items)
    assert desc.groupby("method").size().eq(n_items).all()
    # hallucinated labels are among the named ones; plain decoding on swapped clips hears what it sees
    for _, r in desc.iterrows():
        named, wrong = set(filter(None, r.named.split(","))), set(filter(None, r.hallucinated.split(",")))
        assert wrong <= named
    plain_swapped = desc[(desc.method == "plain") & (desc.condition == "swapped")]
    heard_seen = [r.visual_label in r.hallucinated.split(",") for _, r in plain_swapped.iterrows()]
    assert np.mean(heard_seen) >= 0.75
    s = mt.summarize(tables)
    assert set(s.chosen) == set(mt.METHODS) and s.cost["plain"] == 1.0 and s.cost["guided"] > 1.0
    assert s.n_test == probes[probes.split == "test"].item.nunique() > 0
    assert np.isfinite(s.balanced["plain"])
    (table,) = mt.tables({"vision-heavy": s})
    assert ("vision-heavy", "steer_cross") in table.index
    assert len(mt.findings({"vision-heavy": s})) == 2
    docs = documented_columns()
    for name in ("probes", "descriptions", "sets", "costs"):
        missing = set(tables[name].columns) - docs[f"mitigate.{name}"] - docs["common"] - {"model"}
        assert not missing, f"mitigate.{name}: columns {sorted(missing)} are not documented"
