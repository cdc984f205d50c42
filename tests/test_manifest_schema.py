"""One manifest reader with one schema check for every command; unknown answers and failed rows in the items."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from avlens.analyses import counterfactual
from avlens.analyses.common import NOTHING, batches, items_from_manifest
from avlens.data import read_manifest
from avlens.data.builders import counterfactual as build_counterfactual
from avlens.errors import InputError

QUESTIONS = {"hear": "What do you hear?", "see": "What do you see?"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def clip_manifest(tmp_path, media):
    """A manifest whose media column is called ``clip``: it used to run text-only through ``avlens run``."""
    return _jsonl(
        tmp_path / "clip.jsonl",
        [{"id": "a", "clip": str(media["clip"]), "audio_label": "bell", "visual_label": "dog"}],
    )


def test_a_manifest_without_media_column_is_refused_by_every_reader(clip_manifest):
    messages = []
    for read in (
        lambda: read_manifest(clip_manifest, required=()),
        lambda: items_from_manifest(clip_manifest, QUESTIONS),  # avlens run, every analysis
        lambda: build_counterfactual(clip_manifest, clip_manifest.parent / "cf", pairs=[("bell", "dog")]),
    ):
        with pytest.raises(InputError) as caught:
            read()
        messages.append(str(caught.value))
    assert len(set(messages)) == 1, messages  # one check, one message
    message = messages[0]
    assert message.startswith(f"{clip_manifest}: no media column")
    assert "found: id, clip, audio_label, visual_label" in message
    assert "expected video, audio or image, or clips" in message
    assert "did you mean video (for 'clip')?" in message and "\n" not in message


def test_misspelt_and_missing_columns_are_named(tmp_path):
    typo = _jsonl(tmp_path / "t.jsonl", [{"vidoe": "x.mp4", "audio_label": "bell", "visual_label": "dog"}])
    with pytest.raises(InputError, match=r"did you mean video \(for 'vidoe'\)\?"):
        read_manifest(typo)
    labels = _jsonl(tmp_path / "l.jsonl", [{"video": "x.mp4", "audio_lable": "bell"}])
    missing = r"missing column 'audio_label' \(found: video, audio_lable\); did you mean audio_label"
    with pytest.raises(InputError, match=missing):
        read_manifest(labels)
    # A table built in memory gets the same check.
    with pytest.raises(InputError, match="no media column"):
        items_from_manifest(pd.DataFrame({"clip": ["x.mp4"]}), QUESTIONS)
    # Any one media column will do.
    for column in ("audio", "image"):
        ok = _jsonl(tmp_path / f"{column}.jsonl", [{column: "x"}])
        assert read_manifest(ok, required=())[column].tolist() == [str(tmp_path / "x")]


def test_unlabelled_rows_have_no_expected_answer(tmp_path, media):
    rows = [
        {"id": "labelled", "video": str(media["clip"]), "audio_label": "bell", "visual_label": "dog"},
        {"id": "unlabelled", "video": str(media["clip"])},
        {"id": "muted", "video": str(media["clip"]), "condition": "muted", "visual_label": "dog"},
        {"id": "given", "video": str(media["clip"]), "expect_hear": "rain"},
    ]
    items = {it.id: it for it in items_from_manifest(_jsonl(tmp_path / "m.jsonl", rows), QUESTIONS)}
    expected = {k: it.expected for k, it in items.items()}
    assert expected == {
        "labelled/hear": "bell",
        "labelled/see": "dog",
        "unlabelled/hear": None,  # unknown, not "nothing"
        "unlabelled/see": None,
        "muted/hear": NOTHING,  # the condition says nothing is heard
        "muted/see": "dog",
        "given/hear": "rain",
        "given/see": None,
    }
    assert all(it.problem is None for it in items.values())


def test_failed_rows_are_collected_with_file_and_reason(tmp_path, media, omni):
    rows = [
        {"id": "good", "video": str(media["short"])},
        {"id": "no_media", "video": None, "audio_label": "bell"},
        {"id": "missing", "video": str(media["missing"]), "audio_label": "bell"},
    ]
    items = items_from_manifest(_jsonl(tmp_path / "m.jsonl", rows), {"hear": "What do you hear?"})
    assert [it.problem is None for it in items] == [True, False, True]
    errors: list[dict] = []
    built = [it.id for chunk, _ in batches(omni, items, 8, errors) for it in chunk]
    assert built == ["good/hear"]
    failed = {e["id"]: e for e in errors}
    assert set(failed) == {"no_media/hear", "missing/hear"}
    assert failed["no_media/hear"]["file"] is None and "no media" in failed["no_media/hear"]["reason"]
    assert failed["missing/hear"]["file"] == str(media["missing"])
    assert "file not found" in failed["missing/hear"]["reason"]
    # Through an analysis: the unlabelled good row is answered but not scored, the others are its errors.
    out = counterfactual.collect(omni, items, counterfactual.Config(max_new_tokens=2))
    assert [(r["id"], r["expected"], r["correct"]) for r in out["answers"]] == [("good/hear", None, None)]
    assert {e["id"] for e in out["errors"]} == {"no_media/hear", "missing/hear"}


def test_zero_items_is_one_clear_error(tmp_path, media):
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "video": str(media["clip"])}])
    with pytest.raises(InputError) as caught:
        items_from_manifest(manifest, QUESTIONS, conditions=("swapped",))
    message = str(caught.value)
    assert message.startswith(str(manifest)) and "(swapped)" in message and "the manifest has: factual" in message


def test_a_world_manifests_congruent_clips_are_the_factual_condition(media, tmp_path):
    """`avlens organism world` writes condition "congruent" (or "swapped"): analyses asking for factual clips
    get the congruent ones, not "no row of the conditions asked"."""
    manifest = tmp_path / "world.jsonl"
    rows = [
        {"id": "a", "video": str(media["clip"]), "condition": "congruent", "audio_label": "dog", "visual_label": "dog"},
        {"id": "b", "video": str(media["clip"]), "condition": "swapped", "audio_label": "cat", "visual_label": "dog"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = items_from_manifest(manifest, {"hear": "What do you hear?"}, conditions=("factual",))
    assert [(it.id, it.condition, it.expected) for it in items] == [("a/hear", "factual", "dog")]


def test_a_table_given_in_memory_passes_the_same_schema_check(tmp_path):
    """Builders take a DataFrame as well as a file: it gets the file's schema check (no media column refused)."""
    table = pd.DataFrame({"id": ["a"], "clip": ["a.mp4"], "audio_label": ["dog"], "visual_label": ["dog"]})
    with pytest.raises(InputError, match=r"no media column.*did you mean video"):
        build_counterfactual(table, tmp_path / "cf", pairs=[("bell", "dog")])
