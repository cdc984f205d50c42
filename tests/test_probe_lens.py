"""Linear probes and the logit lens: proved on planted cases and reference computations on a tiny random model,
then the probe on the shipped organism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import avlens
from avlens.analyses import logit_lens, probe
from avlens.analyses.common import Item, items_from_manifest
from avlens.models import Sample
from avlens.organism.world import WorldConfig, render_clip
from avlens.trace import engine

SMALL = WorldConfig(height=56, width=56, fps=2)  # 4 frames at the models' 2 fps, 2 s of audio


def _item(i: int, seen: str, heard: str | None, condition: str) -> Item:
    """An in-memory clip of the organism's world showing ``seen`` and playing ``heard`` (None: no audio)."""
    frames, wave = render_clip(seen, heard or seen, seed=i, cfg=SMALL)
    sample = Sample("What do you hear?", video=frames, audio=wave if heard else None, video_audio=False)
    sample.id = f"clip{i}__{condition}/hear"
    return Item(sample.id, sample, condition, "hear", heard, seen, heard or "nothing")


# Labels that are words of the tiny models' vocabulary (avlens.models.tiny.WORDS).
ITEMS = [
    _item(0, "bird", "bird", "factual"),
    _item(1, "drum", "drum", "factual"),
    _item(2, "bird", "engine", "swapped"),
    _item(3, "drum", "frog", "swapped"),
]


# ---------------------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------------------
def test_probe_features_are_the_residual_means_of_each_site(omni):
    items = [*ITEMS, _item(4, "bell", None, "video_only")]
    out = probe.collect(omni, items, probe.Config(batch_size=8))
    f = pd.DataFrame(out["features"])
    assert out["errors"] == []
    layers = omni.n_layers + 1
    # every item at every layer for the video and last sites; the item without audio has no audio rows
    assert f.groupby("site").size().to_dict() == {"audio": 4 * layers, "video": 5 * layers, "last": 5 * layers}
    assert set(f[f.site == "audio"].id) == {it.id for it in ITEMS}
    assert all(v.shape == (omni.hidden_size,) for v in f.vector)
    # Layer 0 is the decoder's input: the site's mean equals the mean of the merged input embeddings there.
    inputs = omni.prepare([it.sample for it in ITEMS])
    embeds = omni.embed(inputs).embeds
    for b, it in enumerate(ITEMS):
        for site in ("audio", "video", "last"):
            ref = embeds[b, inputs.layout.mask(site)[b]].mean(0)
            got = f[(f.id == it.id) & (f.site == site) & (f.layer == 0)].vector.item()
            assert np.allclose(got, ref.numpy(), atol=1e-5)


def _planted_features(signal_layer: int, layers: int = 4, seed: int = 0) -> pd.DataFrame:
    """60 swapped items of 3 audio classes (+ a class of 3 items, too rare for 5 folds); the audio label is
    written into the vectors of ``signal_layer`` only, the visual label nowhere."""
    rng = np.random.default_rng(seed)
    heard = np.array(["bird", "drum", "bell"] * 20 + ["frog"] * 3)
    seen = rng.choice(["siren", "cat", "dog"], len(heard))
    rows = []
    for i, (a, v) in enumerate(zip(heard, seen, strict=True)):
        for layer in range(layers):
            x = rng.standard_normal(16).astype(np.float32)
            if layer == signal_layer:
                x[["bird", "drum", "bell", "frog"].index(a)] += 5.0
            rows.append(
                {
                    "id": f"c{i:03d}",
                    "condition": "swapped",
                    "question": "hear",
                    "audio_label": a,
                    "visual_label": v,
                    "site": "audio",
                    "layer": layer,
                    "vector": x,
                }
            )
    return pd.DataFrame(rows)


def test_probe_finds_a_planted_label_and_its_control_does_not():
    config = probe.Config()
    p = probe.finalize({"features": _planted_features(signal_layer=2)}, config)["probes"]
    assert len(p) == 4 * 2 * 2  # layers x targets x control
    real, control = p[~p.control].set_index(["target", "layer"]), p[p.control].set_index(["target", "layer"])
    assert real.loc[("audio_label", 2)].accuracy >= 0.95
    assert real.loc[("audio_label", 2)].ci_low > 0.8
    for layer in (0, 1, 3):
        assert real.loc[("audio_label", layer)].accuracy < 0.6  # chance is 1/3
    assert (real.loc["visual_label"].accuracy < 0.6).all()
    assert (control.accuracy < 0.6).all()
    audio = p[p.target == "audio_label"]
    assert (audio.n == 60).all() and (audio.n_classes == 3).all() and (audio.dropped == "frog (3)").all()
    assert np.allclose(audio.chance, 1 / 3) and np.allclose(audio.majority, 1 / 3)
    assert ((p.ci_low <= p.accuracy) & (p.accuracy <= p.ci_high)).all()

    summary = probe.summarize({"probes": p})
    assert summary.slices["hear/swapped/audio/audio_label"].best_layer == 2
    assert summary.slices["hear/swapped/audio/audio_label"].middle_decodable == 0.5  # layers 1 and 2 of 0..3
    assert summary.slices["hear/swapped/audio/visual_label"].middle_decodable == 0.0
    assert probe.findings({"m": summary})[0].verdict == "agrees"
    # Decodable only at the input embeddings, not in middle layers: P1's claim holds only partly.
    early = probe.finalize({"features": _planted_features(signal_layer=0)}, config)["probes"]
    assert probe.findings({"m": probe.summarize({"probes": early})})[0].verdict == "partly"


# ---------------------------------------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------------------------------------
def _lens(omni, **options) -> pd.DataFrame:
    out = logit_lens.collect(omni, ITEMS, logit_lens.Config(batch_size=8, **options))
    assert out["errors"] == []
    return pd.DataFrame(out["lens"])


def test_lens_at_the_last_layer_is_the_models_own_output(omni):
    lens = _lens(omni)
    layers, targets = omni.n_layers + 1, 3
    assert len(lens) == len(ITEMS) * layers * 2 * targets
    inputs = omni.prepare([it.sample for it in ITEMS])
    with torch.no_grad():
        logits = omni.model(**omni.model_inputs(inputs)).logits[:, -1].float()  # (B, V), Hugging Face's forward
    probs = logits.softmax(-1)
    final = lens[(lens.layer == omni.n_layers) & (lens.site == "last")].set_index(["id", "target"])
    for b, it in enumerate(ITEMS):
        answer = omni.decode([int(logits[b].argmax())])
        for target in logit_lens.TARGETS:
            row = final.loc[(it.id, target)]
            tok = logit_lens.first_token(omni, row.label)
            assert row["rank"] == 1 + int((logits[b] > logits[b, tok]).sum())
            assert row.prob == pytest.approx(float(probs[b, tok]), abs=1e-5)
            assert row.answer == answer
    # Without the final norm the lens reads other values (P1's variant).
    raw = _lens(omni, norm=False)
    raw_final = raw[(raw.layer == omni.n_layers) & (raw.site == "last")].set_index(["id", "target"])
    assert not np.allclose(raw_final.prob.to_numpy(), final.prob.reindex(raw_final.index).to_numpy(), atol=1e-4)


def test_lens_control_label_is_neither_heard_nor_seen(omni):
    lens = _lens(omni)
    labels = lens.pivot_table(index="id", columns="target", values="label", aggfunc="first")
    assert (labels.control != labels.audio).all() and (labels.control != labels.visual).all()
    assert labels.control.equals(
        _lens(omni).pivot_table(index="id", columns="target", values="label", aggfunc="first").control
    )


def test_lens_finds_a_planted_label(omni, monkeypatch):
    """At one layer, one audio token of every clip is set to the audio label's unembedding direction and the last
    position to the visual label's: there the lens must rank them first, at that very audio position."""
    layer, position = 1, 3
    weight = omni.lm_head.weight.detach()  # (V, D)
    real_run, planted = engine.run, {}

    def run_with_plant(adapter, inputs, *args, **kwargs):
        trace = real_run(adapter, inputs, *args, **kwargs)
        residual = trace.captures["residual"][layer]  # (B, L, D)
        for b, sample in enumerate(inputs.samples):
            it = next(i for i in ITEMS if i.id == sample.id)
            p = int(inputs.layout.positions("audio", b)[position])
            residual[b, p] = 1000 * weight[logit_lens.first_token(adapter, it.audio_label)]
            residual[b, -1] = 1000 * weight[logit_lens.first_token(adapter, it.visual_label)]
            planted[it.id] = residual[b, p].clone()
        return trace

    monkeypatch.setattr(logit_lens, "run", run_with_plant)
    lens = _lens(omni, norm=False).set_index(["id", "layer", "site", "target"])
    for it in ITEMS:
        tok = torch.tensor([[logit_lens.first_token(omni, it.audio_label)]])
        rank, prob = logit_lens.token_ranks(omni, planted[it.id][None], tok, norm=False)
        assert int(rank) == 1 and float(prob) > 0.99
        audio = lens.loc[(it.id, layer, "audio", "audio")]
        assert audio["rank"] == 1 and audio.prob == pytest.approx(float(prob), abs=1e-6)
        assert lens.loc[(it.id, layer, "last", "visual")]["rank"] == 1
        if it.condition == "swapped":  # the last position holds the visual label, not the heard one
            assert lens.loc[(it.id, layer, "last", "audio")]["rank"] > 1


def test_lens_summary_counts_latent_audio():
    """Four swapped clips: decoded + follows vision, decoded + follows audio, not decoded + follows vision,
    neither; and a control label that is never decoded."""
    rows = []
    cases = {"a": (True, "visual"), "b": (True, "audio"), "c": (False, "visual"), "d": (False, "neither")}
    for item, (decoded, follows) in cases.items():
        for layer in range(3):
            for site in logit_lens.SITES:
                for target in ("audio", "control"):
                    hit = decoded and target == "audio" and layer == 1 and site == "audio"
                    rows.append(
                        {
                            "id": item,
                            "condition": "swapped",
                            "layer": layer,
                            "site": site,
                            "target": target,
                            "rank": 1 if hit else 9,
                            "prob": 0.5 if hit else 0.01,
                            "in_top_k": hit,
                            "follows": follows,
                        }
                    )
    s = logit_lens.summarize({"lens": pd.DataFrame(rows)})
    assert s.audio_decoded_swapped == 0.5 and s.control_decoded_swapped == 0.0 and s.n_swapped == 4
    assert s.audio_decoded_while_answer_follows_vision == 0.25
    assert s.audio_decoded_given_follows_vision == 0.5 and s.n_follows_vision == 2
    assert logit_lens.SPEC.headline == "audio_decoded_swapped"
    assert s.conditions["swapped"].audio_decoded == 0.5 and s.conditions["swapped"].control_decoded == 0.0
    assert s.conditions["swapped"].audio_decoded_at["last"] == 0.0
    assert s.conditions["swapped"].best_layer["audio"] == 1 and s.conditions["swapped"].best_layer_share["audio"] == 0.5
    assert s.follows_vision_rate == 0.5 and s.follows_audio_rate == 0.25
    # decoded (50%) above both the control (0%) and the answers that follow the audio (25%)
    assert logit_lens.findings({"m": s})[0].verdict == "agrees"


def test_plots_draw_every_model(omni):
    lens = {"lens": _lens(omni)}
    assert len(logit_lens.plot({"a": lens, "b": lens}).axes) == 2 * 2 * len(logit_lens.SITES)
    probes = {"probes": probe.finalize({"features": _planted_features(2)}, probe.Config(folds=3))["probes"]}
    assert len(probe.plot({"a": probes}).axes) == 1  # the planted table has one site


# ---------------------------------------------------------------------------------------------------------
# The organism
# ---------------------------------------------------------------------------------------------------------
def organism_probe(adapter, directory) -> pd.DataFrame:
    """Audio-token probes of the audio label on swapped clips of a fresh organism world (36 clips, 3 folds)."""
    from avlens.data import counterfactual
    from avlens.organism.data import WORLD
    from avlens.organism.world import LABEL_GROUPS, write_world

    world = write_world(directory / "world", 36, seed=123, cfg=WORLD, swapped_share=0.0)
    built = counterfactual(world, directory / "cf", groups=LABEL_GROUPS, conditions=("swapped",))
    items = items_from_manifest(built.manifest, {"hear": "What do you hear?"}, conditions=("swapped",))
    config = probe.Config(sites=("audio",), folds=3)
    features = pd.DataFrame(probe.collect(adapter, items, config)["features"])
    return probe.finalize({"features": features}, config)["probes"]


def test_organism_audio_probe_beats_its_shuffled_control(tmp_path):
    adapter = avlens.load("organism")
    audio = probe.against_control(organism_probe(adapter, tmp_path))
    audio = audio[audio.target == "audio_label"]
    assert len(audio) == adapter.n_layers + 1
    assert audio.decodable.any(), audio[["layer", "accuracy", "ci_low", "control_accuracy", "chance"]]
