"""Dataset builders: counterfactual variants of clips, multi-clip prompts, and the answer matching that
unimodal-dominance splits use (the splits themselves ask a model: :mod:`avlens.analyses.dominance`).

Each builder reads a manifest (see :mod:`avlens.data.manifest`), checks every row, writes what it can and
reports the rest: a row with a missing or unreadable file, no audio track where one is needed, or an unknown
label lands in :attr:`BuildReport.problems` with its reason, and every other row is written.

Media are written like the organism's clips (:func:`avlens.organism.world.write_clip`): H.264 (libx264,
yuv420p, single-threaded, no macroblock-tree) + AAC mono at 16 kHz in a bit-exact mp4, and 16-bit PCM wav.
Paths in the manifests written here are relative to the manifest when the file is inside its directory and
absolute otherwise.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import soundfile as sf

from ..errors import InputError, MediaError
from ..media import load_audio, probe
from ..models.base import Clip, Sample
from .manifest import check_columns, read_manifest, relative_path, with_none, write_manifest

__all__ = [
    "CONDITIONS",
    "NOTHING",
    "BuildReport",
    "counterfactual",
    "first_label",
    "multiclip",
    "samples_from_multiclip",
]

CONDITIONS = ("factual", "swapped", "muted", "blank_video", "audio_only", "video_only")
"""The counterfactual variants :func:`counterfactual` can build."""

NOTHING = "nothing"
"""The expected answer when a modality carries nothing (a silent track, black frames, no track)."""

SAMPLING_RATE = 16000  # what the models' audio encoders take; every audio written here is mono at this rate

Progress = Callable[[int, int], None]
"""Called with (done, total) as a builder goes."""

# The organism's encoder settings (world.write_clip): the same input gives the same bytes.
_X264 = {"threads": "1", "x264-params": "mbtree=0", "crf": "18", "preset": "fast"}
_AAC_BIT_RATE = 64000
_AAC_FRAME = 1024
_AV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


@dataclass
class BuildReport:
    """What a builder did.

    Attributes:
        written: rows written to ``manifest``.
        problems: one dict per row left out: ``id`` (the source row's id), ``file`` (the file concerned, or the
            manifest for a label problem), ``reason``.
        manifest: the main output table.
        files: every table written, by name (e.g. ``{"answers": ..., "audio_dominant": ...}``).
        counts: sizes of the parts of the output (e.g. rows per condition, or per dominance set).
    """

    written: int
    problems: list[dict]
    manifest: Path
    files: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Counterfactual variants
# ---------------------------------------------------------------------------------------------------------
def counterfactual(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    pairs: Iterable[tuple[str, str]] | None = None,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
    progress: Progress | None = None,
) -> BuildReport:
    """Write counterfactual variants of every clip of a manifest (P1's factual / swapped clips and more).

    Per source row and condition:

    ============ ========================================== ============== ==============
    condition    media                                      expect_hear    expect_see
    ============ ========================================== ============== ==============
    factual      its video with its audio                   audio label    visual label
    swapped      its video with a partner row's audio       partner's      visual label
    muted        its video with an all-zero audio track     "nothing"      visual label
    blank_video  black frames (same size, fps, length)      audio label    "nothing"
                 with its audio
    audio_only   its audio alone (a wav)                    audio label    "nothing"
    video_only   its video without any audio track          "nothing"      visual label
    ============ ========================================== ============== ==============

    A swap partner is another row whose audio label is unrelated to this row's audio label: in no common
    group of ``groups``, or one of ``pairs`` (unordered); it must also differ from this row's visual label
    (and be unrelated to it when that label is known), so that the sound never matches the picture. Partners
    are drawn at random (by ``seed``) over the allowed labels, and round-robin within a label so that donors
    are used evenly. The partner's audio is cut or looped to the length of the row's own audio.

    A source row whose sound already disagrees with its picture (``condition`` "swapped", as in a world written
    with ``swapped_share`` > 0) stays swapped: it has no factual variant, and its swapped variant is the clip as
    it is (its own sound and labels, no partner); its other variants are built as for any row.

    Output, under ``out_dir``: ``clips/`` with the media and ``manifest.jsonl`` with one line per (source row,
    condition) and the columns ``id`` (``<source_id>__<condition>``), ``source_id``, ``condition``, ``video``
    (mp4, or null), ``audio`` (a wav of what the clip plays, the same samples as the mp4's audio track; null
    when it has no audio), ``audio_label`` (of what is heard; null when nothing is), ``visual_label`` (null
    when nothing is seen), ``expect_hear``, ``expect_see``, ``original_audio_label`` and ``partner_id``
    (swapped rows only, else null), then the source row's other columns (a name the output already uses gets
    the prefix ``source_``, e.g. the organism's ``condition`` becomes ``source_condition``).

    A source row is written with all its conditions (those it can have) or not at all (reported), so the
    conditions stay balanced. Loadable with
    ``datasets.load_dataset("json", data_files=str(out_dir / "manifest.jsonl"))``.

    Args:
        manifest: a manifest file or a table from :func:`~avlens.data.read_manifest`; needs ``video``,
            ``audio_label``, ``visual_label`` (and ``audio`` for clips whose sound is a separate file).
        groups: group name -> audio labels; labels in different groups are unrelated.
        pairs: label pairs that count as unrelated (in addition to ``groups``).
        seed: seed of the partner choice.
        conditions: which of :data:`CONDITIONS` to build.
        progress: called with (source rows done, source rows to build).

    Raises:
        InputError: an unreadable manifest, an unknown condition, or ``swapped`` without ``groups``/``pairs``.
    """
    conditions = tuple(dict.fromkeys(conditions))
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise InputError(f"unknown or no conditions {unknown or list(conditions)}; choose from {', '.join(CONDITIONS)}")
    relation = None
    if "swapped" in conditions:
        if not groups and not pairs:
            raise InputError("the swapped condition needs groups= or pairs= to tell which audio labels are unrelated")
        relation = _Relation(groups or {}, pairs or ())
    df = manifest_table(manifest, ("video", "audio_label", "visual_label"))
    where = df.attrs.get("path")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)

    problems: list[dict] = []
    rows: list[_Row] = []
    for i, row in enumerate(df.to_dict("records")):
        try:
            for column in ("audio_label", "visual_label"):
                if row.get(column) is None:
                    raise InputError(f"no {column}", path=where)
            if relation is not None and not relation.known(row["audio_label"]):
                raise InputError(f"unknown label {row['audio_label']!r} (in no group or pair)", path=where)
            _check_media(row, need_audio=True)
        except InputError as e:
            problems.append(problem_row(row["id"], e))
        else:
            rows.append(_Row(i, row))

    partners: dict[str, _Row] = {}
    if relation is not None:
        partners = _choose_partners(rows, relation, seed)
        for r in rows:
            if r.id not in partners and not _already_swapped(r.row):
                problems.append(
                    {
                        "id": r.id,
                        "file": where,
                        "reason": f"no other row has an audio label unrelated to {r.row['audio_label']!r}"
                        f" (and to the visual label {r.row['visual_label']!r})",
                    }
                )
        rows = [r for r in rows if r.id in partners or _already_swapped(r.row)]

    records: list[dict] = []
    for done, r in enumerate(rows, 1):
        stem = out_dir / "clips" / f"{r.index:06d}_{_safe(r.id)}"
        written: list[Path] = []
        own = _conditions_of(r.row, conditions)
        partner = None if _already_swapped(r.row) else partners.get(r.id)
        try:
            files = _write_variants(r.row, partner, stem, own, written)
        except InputError as e:
            for p in written:  # leave no half-built row behind
                p.unlink(missing_ok=True)
            problems.append(problem_row(r.id, e))
        else:
            records += _variant_records(r.row, partner, files, own, out_dir)
        if progress is not None:
            progress(done, len(rows))

    table = with_columns(pd.DataFrame.from_records(records), _CF_COLUMNS)
    path = write_manifest(table, out_dir / "manifest.jsonl")
    counts = {c: int((table["condition"] == c).sum()) for c in conditions}
    return BuildReport(len(table), problems, path, files={"manifest": path}, counts=counts)


_CF_COLUMNS = (
    "id",
    "source_id",
    "condition",
    "video",
    "audio",
    "audio_label",
    "visual_label",
    "expect_hear",
    "expect_see",
    "original_audio_label",
    "partner_id",
)


@dataclass
class _Row:
    index: int  # position in the source manifest (keeps file names unique whatever the ids look like)
    row: dict

    @property
    def id(self) -> str:
        return self.row["id"]


class _Relation:
    """Which audio labels are unrelated, from groups (different groups) and explicit pairs."""

    def __init__(self, groups: Mapping[str, Sequence[str]], pairs: Iterable[tuple[str, str]]) -> None:
        self.groups_of: dict[str, set[str]] = defaultdict(set)
        for name, labels in groups.items():
            if isinstance(labels, str):
                raise InputError(f"group {name!r} must be a list of labels, got the string {labels!r}")
            for label in labels:
                self.groups_of[label].add(name)
        self.pairs = set()
        for pair in pairs:
            a, b = pair
            self.pairs.add(frozenset((a, b)))
        self.labels = set(self.groups_of) | {label for pair in self.pairs for label in pair}

    def known(self, label: str) -> bool:
        return label in self.labels

    def unrelated(self, a: str, b: str) -> bool:
        if a == b:
            return False
        if frozenset((a, b)) in self.pairs:
            return True
        ga, gb = self.groups_of.get(a), self.groups_of.get(b)
        return bool(ga and gb and not ga & gb)


def _already_swapped(row: dict) -> bool:
    """A source clip whose sound already disagrees with its picture (a world's ``condition`` "swapped", as
    :func:`avlens.organism.world.write_world` marks them): its own clip is a swapped clip, never a factual one."""
    return row.get("condition") == "swapped"


def _conditions_of(row: dict, conditions: tuple[str, ...]) -> tuple[str, ...]:
    """The conditions a source row is built in: an already swapped clip has no factual variant, and its swapped
    variant is the clip as it is (its own sound: no second swap)."""
    if _already_swapped(row):
        return tuple(c for c in conditions if c != "factual")
    return conditions


def _choose_partners(rows: list[_Row], relation: _Relation, seed: int) -> dict[str, _Row]:
    """Row id -> the row whose audio it gets in its swapped variant (rows without any candidate are left out)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_label[r.row["audio_label"]].append(r)
    # donors of a label are taken in a shuffled round-robin, so that each is used about equally often
    queues = {label: [members[j] for j in rng.permutation(len(members))] for label, members in by_label.items()}
    turn = dict.fromkeys(queues, 0)
    labels = sorted(by_label)
    out = {}
    for r in rows:
        if _already_swapped(r.row):
            continue  # swapped already: it plays its own sound
        heard, seen = r.row["audio_label"], r.row["visual_label"]
        allowed = [
            p
            for p in labels
            if relation.unrelated(p, heard) and (not relation.known(seen) or relation.unrelated(p, seen))
        ]
        if not allowed:
            continue
        label = allowed[int(rng.integers(len(allowed)))]
        queue = queues[label]
        out[r.id] = queue[turn[label] % len(queue)]
        turn[label] += 1
    return out


def _write_variants(
    row: dict, partner: _Row | None, stem: Path, conditions: tuple[str, ...], written: list[Path]
) -> dict[str, tuple[Path | None, Path | None]]:
    """Write the media of one source row's variants; condition -> (video path, audio path).

    Every path is appended to ``written`` before it is created, so that the caller can clean up on failure.
    """
    own = audio_of(row)
    sounds: dict[str, np.ndarray | None] = {}  # condition -> the audio its clip plays (None: no track)
    for c in conditions:
        if c == "swapped" and partner is not None:
            try:
                sounds[c] = _fit(audio_of(partner.row), len(own))
            except InputError as e:
                raise InputError(f"swap partner {partner.id}: {e.problem}", path=e.path) from e
        elif c == "muted":
            sounds[c] = np.zeros_like(own)
        elif c == "video_only":
            sounds[c] = None
        else:
            sounds[c] = own

    files: dict[str, tuple[Path | None, Path | None]] = {}
    wavs: dict[str, Path] = {}  # one wav per distinct sound: factual, blank_video and audio_only share one
    for c, sound in sounds.items():
        wav = None
        if sound is not None:
            key = "swapped" if c == "swapped" and partner is not None else "muted" if c == "muted" else "own"
            if key not in wavs:
                wavs[key] = stem.with_name(stem.name + ("" if key == "own" else f"__{key}") + ".wav")
                written.append(wavs[key])
                sf.write(wavs[key], sound, SAMPLING_RATE, subtype="PCM_16")
            wav = wavs[key]
        files[c] = (None, wav)

    videos = {
        c: (stem.with_name(f"{stem.name}__{c}.mp4"), sounds[c], c == "blank_video")
        for c in conditions
        if c != "audio_only"
    }
    written += [path for path, _, _ in videos.values()]
    _transcode(row["video"], list(videos.values()))
    for c, (path, _, _) in videos.items():
        files[c] = (path, files[c][1])
    return files


def _variant_records(
    row: dict,
    partner: _Row | None,
    files: dict[str, tuple[Path | None, Path | None]],
    conditions: tuple[str, ...],
    out_dir: Path,
) -> list[dict]:
    heard, seen = row["audio_label"], row["visual_label"]
    extras = {}
    for k, v in row.items():
        if k not in ("id", "video", "audio", "audio_label", "visual_label"):
            extras[f"source_{k}" if k in _CF_COLUMNS else k] = v
    out = []
    for c in conditions:
        video, audio = files[c]
        audio_label = {"swapped": partner.row["audio_label"] if partner else heard, "muted": None, "video_only": None}
        visual_label = {"blank_video": None, "audio_only": None}
        a = audio_label.get(c, heard)
        v = visual_label.get(c, seen)
        record = {
            "id": f"{row['id']}__{c}",
            "source_id": row["id"],
            "condition": c,
            "video": relative_path(video, out_dir),
            "audio": relative_path(audio, out_dir),
            "audio_label": a,
            "visual_label": v,
            "expect_hear": a if a is not None else NOTHING,
            "expect_see": v if v is not None else NOTHING,
            "original_audio_label": heard if c == "swapped" and partner else None,
            "partner_id": partner.id if c == "swapped" and partner else None,
        }
        out.append(record | extras)
    return out


def audio_of(row: dict) -> np.ndarray:
    """The clip's sound: its separate audio file if it has one, else the video's own track (mono, 16 kHz)."""
    return load_audio(row.get("audio") or row["video"], sampling_rate=SAMPLING_RATE)


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    """``audio`` cut or looped to ``n`` samples."""
    return np.resize(audio, n) if len(audio) != n else audio


def _transcode(src: str, outputs: list[tuple[Path, np.ndarray | None, bool]]) -> None:
    """Decode ``src``'s video once and write one mp4 per (path, audio or None for no track, black frames?).

    Frames keep the source's size (rounded down to even numbers, which yuv420p needs: an odd-sized frame is
    rescaled by one pixel), frame rate and count.

    Raises:
        MediaError: the video cannot be decoded.
    """
    try:
        with av.open(str(src)) as container, ExitStack() as stack:
            streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            if not streams:
                raise MediaError("no video track", path=src)
            stream = streams[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise MediaError("cannot determine the video's frame rate", path=src)
            width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
            if width < 2 or height < 2:
                raise MediaError(f"video frames too small ({width}x{height})", path=src)
            black = np.full((height * 3 // 2, width), 128, np.uint8)  # limited-range YUV black: Y 16, U = V 128
            black[:height] = 16
            writers = [stack.enter_context(_Mp4Writer(p, Fraction(rate), width, height, a)) for p, a, _ in outputs]
            n = 0
            for frame in container.decode(stream):
                yuv = frame.reformat(format="yuv420p", width=width, height=height).to_ndarray()
                for writer, (_, _, blank) in zip(writers, outputs, strict=True):
                    writer.add_frame(black if blank else yuv)
                n += 1
            if n == 0:
                raise MediaError("no decodable video frames", path=src)
            for writer in writers:
                writer.finish()
    except _AV_ERRORS as e:
        raise MediaError(f"cannot transcode the video ({' '.join(str(e).split())})", path=src) from e


class _Mp4Writer:
    """One output mp4: H.264 frames streamed in, then the whole audio track (if any) at the end."""

    def __init__(self, path: Path, rate: Fraction, width: int, height: int, audio: np.ndarray | None) -> None:
        self.path, self.audio, self.n = path, audio, 0
        self.container = av.open(str(path), "w", format="mp4", container_options={"fflags": "+bitexact"})
        self.video = self.container.add_stream("libx264", rate=rate, options=_X264)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.sound = None
        if audio is not None:
            self.sound = self.container.add_stream("aac", rate=SAMPLING_RATE, layout="mono")
            self.sound.bit_rate = _AAC_BIT_RATE

    def __enter__(self) -> _Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def add_frame(self, yuv: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self.n
        self.n += 1
        self.container.mux(self.video.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.video.encode(None))
        if self.sound is not None:
            audio = np.asarray(self.audio, np.float32)
            for start in range(0, len(audio), _AAC_FRAME):
                frame = av.AudioFrame.from_ndarray(
                    audio[None, start : start + _AAC_FRAME], format="fltp", layout="mono"
                )
                frame.sample_rate, frame.pts = SAMPLING_RATE, start
                self.container.mux(self.sound.encode(frame))
            self.container.mux(self.sound.encode(None))


# ---------------------------------------------------------------------------------------------------------
# Answer matching (for dominance splits, avlens.analyses.dominance)
# ---------------------------------------------------------------------------------------------------------
def first_label(text: str, labels: Sequence[str]) -> str | None:
    """The label that occurs first (as a whole word or phrase) in the lower-cased ``text``, else None.

    At the same position the longer label wins ("dog bark" over "dog").
    """
    text = text.lower()
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text)
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), label)
    return None if best is None else best[2]


# ---------------------------------------------------------------------------------------------------------
# Multi-clip prompts
# ---------------------------------------------------------------------------------------------------------
def article(word: str) -> str:
    """The indefinite article of ``word`` by its first letter: "an" before a vowel, else "a" ("an owl", "a bell")."""
    return "an" if word[:1].lower() in tuple("aeiou") else "a"


def multiclip(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    *,
    n_clips: int = 2,
    n_prompts: int | None = None,
    seed: int = 0,
    question_template: str = "Which clip has the sound of {a} {label}?",
    progress: Progress | None = None,
) -> BuildReport:
    """Write prompts that each hold ``n_clips`` clips with distinct audio labels and ask which one has a sound.

    Each prompt draws ``n_clips`` different audio labels at random (by ``seed``), a clip of each, in random
    order, and one of them as the target. Output: ``out_dir/manifest.jsonl`` with the columns ``id``,
    ``clips`` (a list of ``{"video", "audio"}``; ``audio`` null means the video's own track), ``question``,
    ``target_label``, ``answer`` (the 1-based position of the target clip, as text: "1", "2"...), ``labels``
    and ``visual_labels`` (of each clip, in order) and ``source_ids``. Build a model input from a row with
    :func:`samples_from_multiclip`.

    Args:
        manifest: a manifest file or table; needs ``video`` and ``audio_label``.
        n_clips: clips per prompt (at least 2).
        n_prompts: prompts to write (default: one per usable clip).
        seed: seed of the draws.
        question_template: the question, with ``{label}`` for the target's audio label and ``{a}`` for its
            indefinite article ("a" or "an", see :func:`article`).
        progress: called with (prompts done, prompts).

    Raises:
        InputError: fewer than ``n_clips`` distinct audio labels among the usable rows, or bad arguments.
    """
    if n_clips < 2:
        raise InputError(f"n_clips must be at least 2, got {n_clips}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(question_template) if f is not None}
    except ValueError:  # an unmatched brace
        fields = set()
    if "label" not in fields or not fields <= {"label", "a"}:
        raise InputError(f"question_template must contain {{label}} and may contain {{a}}, got {question_template!r}")
    df = manifest_table(manifest, ("video", "audio_label"))
    out_dir = Path(out_dir)
    problems: list[dict] = []
    by_label: dict[str, list[dict]] = defaultdict(list)
    usable = 0
    for row in df.to_dict("records"):
        try:
            if row.get("audio_label") is None:
                raise InputError("no audio_label", path=df.attrs.get("path"))
            _check_media(row, need_audio=True)
        except InputError as e:
            problems.append(problem_row(row["id"], e))
        else:
            by_label[row["audio_label"]].append(row)
            usable += 1
    if len(by_label) < n_clips:
        raise InputError(
            f"prompts of {n_clips} clips need {n_clips} distinct audio labels; the usable rows have {len(by_label)}",
            path=df.attrs.get("path"),
        )
    n_prompts = usable if n_prompts is None else n_prompts
    if n_prompts < 1:
        raise InputError(f"n_prompts must be at least 1, got {n_prompts}")

    rng = np.random.default_rng(seed)
    labels = sorted(by_label)
    records = []
    for k in range(n_prompts):
        chosen = [labels[j] for j in rng.choice(len(labels), size=n_clips, replace=False)]
        rows = [by_label[label][int(rng.integers(len(by_label[label])))] for label in chosen]
        target = int(rng.integers(n_clips))
        records.append(
            {
                "id": f"prompt_{k:06d}",
                "clips": [
                    {"video": relative_path(r["video"], out_dir), "audio": relative_path(r.get("audio"), out_dir)}
                    for r in rows
                ],
                "question": question_template.format(label=chosen[target], a=article(chosen[target])),
                "target_label": chosen[target],
                "answer": str(target + 1),
                "labels": chosen,
                "visual_labels": [r.get("visual_label") for r in rows],
                "source_ids": [r["id"] for r in rows],
            }
        )
        if progress is not None:
            progress(k + 1, n_prompts)
    path = write_manifest(pd.DataFrame.from_records(records), out_dir / "manifest.jsonl")
    return BuildReport(len(records), problems, path, files={"manifest": path}, counts={"prompts": len(records)})


def samples_from_multiclip(row: Mapping[str, Any], *, root: str | Path | None = None) -> Sample:
    """The model input of one :func:`multiclip` row: its question over one :class:`Clip` per clip (a clip's
    ``video``, ``audio`` and ``image``, as the manifest's ``clips`` hold them).

    Args:
        row: a row of the multiclip manifest (a dict, a pandas row or a ``datasets`` row).
        root: directory that relative clip paths are relative to (the manifest's directory; not needed for
            rows from :func:`~avlens.data.read_manifest`, whose paths are resolved).
    """
    clips = []
    for c in row["clips"]:
        video, audio, image = (_under(c.get(k), root) for k in ("video", "audio", "image"))
        clips.append(Clip(video=video, audio=audio, image=image))
    meta = {k: row[k] for k in ("target_label", "answer", "labels") if k in row}
    return Sample(str(row["question"]), clips=clips, id=str(row.get("id") or ""), meta=meta)


# ---------------------------------------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------------------------------------
def manifest_table(manifest: str | Path | pd.DataFrame, required: tuple[str, ...]) -> pd.DataFrame:
    """A manifest as a table with string ids, read from a file or given in memory; both pass the one schema
    check (:func:`avlens.data.manifest.check_columns`)."""
    if isinstance(manifest, pd.DataFrame):
        check_columns(manifest, required, path=manifest.attrs.get("path"))
        df = manifest.copy()
        if "id" not in df.columns:
            df.insert(0, "id", [str(i) for i in range(len(df))])
        df["id"] = [str(i) for i in df["id"]]
        return with_none(df)
    return read_manifest(manifest, required=required)


def _check_media(row: dict, *, need_audio: bool) -> None:
    """Raise MediaError unless the row's video (and, if needed, its sound) exists and opens (no decoding)."""
    if row.get("video") is None:
        raise InputError("no video file given")
    info = probe(row["video"])
    if not info.has_video:
        raise MediaError("no video track", path=row["video"])
    if not need_audio:
        return
    if row.get("audio") is not None:
        if not probe(row["audio"]).has_audio:
            raise MediaError("no audio track", path=row["audio"])
    elif not info.has_audio:
        raise MediaError("no audio track (and no separate audio file)", path=row["video"])


def problem_row(row_id: str, e: InputError) -> dict:
    """A row of a build's problems list: the sample, the file at fault and the reason."""
    return {"id": row_id, "file": e.path, "reason": e.problem}


def _safe(name: str) -> str:
    """A file-name-safe version of an id."""
    return re.sub(r"[^\w.-]+", "_", name)[:80]


def _under(path: str | None, root: str | Path | None) -> str | None:
    if path is None or root is None or Path(path).is_absolute():
        return path
    return str(Path(root) / path)


def with_columns(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``table`` with at least ``columns`` (first, in that order), also when it has no rows."""
    for c in columns:
        if c not in table.columns:
            table[c] = pd.Series(dtype=object)
    rest = [c for c in table.columns if c not in columns]
    return table[[*columns, *rest]]
