"""Manifests: tables of clips with their labels, stored as CSV, JSONL or Parquet.

A manifest has one row per clip with the columns

- ``id``: the clip's name (optional: the row number is used when absent; must be unique),
- ``video``: a video file (with or without its own audio track),
- ``audio``: optional, a separate audio file for the clip (used instead of the video's own track),
- ``audio_label``, ``visual_label``: what is heard and what is seen,

plus any other columns, which are kept. Every manifest needs at least one media column (:data:`MEDIA_COLUMNS`:
``video``, ``audio``, ``image``, or ``clips``); one without is refused, with the columns found and, for a name
that looks like a misspelt or renamed media column (``clip``, ``vidoe``), the one meant.

Relative paths are relative to the manifest's directory, so a directory holding a manifest and its clips can be
moved as a whole; :func:`read_manifest` returns them resolved. A ``clips`` column (multi-clip prompts: a list of
``{"video", "audio"}``) is resolved the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = [
    "FORMATS",
    "MEDIA_COLUMNS",
    "PATH_COLUMNS",
    "REQUIRED",
    "check_columns",
    "read_manifest",
    "relative_path",
    "with_none",
    "write_manifest",
]

FORMATS = (".csv", ".jsonl", ".parquet")
"""Manifest file extensions (``.json`` is read as JSON lines too)."""

REQUIRED = ("video", "audio_label", "visual_label")
"""Columns a manifest must have unless a reader asks for fewer."""

PATH_COLUMNS = ("video", "audio", "image")
"""Columns holding file paths, resolved against the manifest's directory."""

MEDIA_COLUMNS = ("video", "audio", "image", "clips")
"""A manifest has at least one of these (``clips``: multi-clip prompts)."""

# Column names people use for a media column, and the one they mean (misspellings are caught by difflib).
_MEDIA_ALIASES = {
    **dict.fromkeys(
        ("clip", "clip_path", "video_path", "video_file", "videos", "mp4", "movie", "file", "path"), "video"
    ),
    **dict.fromkeys(("media", "filename", "file_name", "filepath"), "video"),
    **dict.fromkeys(("wav", "sound", "audio_path", "audio_file", "audios"), "audio"),
    **dict.fromkeys(("img", "picture", "image_path", "image_file", "images", "frame"), "image"),
}

# Columns read as text whatever they look like: an id "007" must not become the number 7.
_TEXT_COLUMNS = ("id", "video", "audio", "image", "audio_label", "visual_label")


def read_manifest(path: str | Path, *, required: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet manifest (chosen by extension) with its paths resolved.

    Args:
        path: the manifest file.
        required: columns that must be present (``id`` never is: row numbers stand in for a missing one).
            Default: :data:`REQUIRED`, or ``clips`` and ``question`` for a multi-clip manifest (one with a
            ``clips`` column).

    Returns:
        one row per clip, with a string ``id`` column first, ``video``/``audio`` as absolute path strings
        (None where empty), labels as strings (None where empty), other columns as read.
        ``df.attrs["path"]`` is the manifest's path.

    Raises:
        InputError: missing or unreadable file, unknown extension, no rows, a missing required column, or
            duplicate ids.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in (*FORMATS, ".json"):
        raise InputError(f"unknown manifest format {ext!r} (use {', '.join(FORMATS)})", path=str(p))
    if not p.is_file():
        raise InputError("file not found", path=str(p))
    try:
        if ext == ".csv":
            df = pd.read_csv(p, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False, na_values=[""])
        elif ext == ".parquet":
            df = pd.read_parquet(p)
        else:
            # dtype=False: keep values as written (no guessing of dates or numbers in text columns)
            df = pd.read_json(p, lines=True, dtype=False)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        kind = {".csv": "CSV", ".parquet": "Parquet"}.get(ext, "JSON lines")
        raise InputError(f"not a readable {kind} manifest ({_one_line(e)})", path=str(p)) from e
    if df.empty:
        raise InputError("manifest has no rows", path=str(p))
    check_columns(df, required, path=str(p))

    df = with_none(df)
    for column in _TEXT_COLUMNS:
        if column in df.columns:
            df[column] = _objects((_text(v) for v in df[column]), df.index)
    if "id" not in df.columns:
        df.insert(0, "id", _objects((str(i) for i in range(len(df))), df.index))
    elif df.columns[0] != "id":
        df.insert(0, "id", df.pop("id"))
    missing_ids = df.index[df["id"].isna()].tolist()
    if missing_ids:
        raise InputError(f"row {missing_ids[0]} has no id", path=str(p))
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise InputError(f"duplicate id {dup.iloc[0]!r}", path=str(p))

    root = p.resolve().parent
    for column in PATH_COLUMNS:
        if column in df.columns:
            df[column] = _objects((_resolve(v, root) for v in df[column]), df.index)
    if "clips" in df.columns:
        df["clips"] = _objects((_resolve_clips(v, root) for v in df["clips"]), df.index)
    df = df.reset_index(drop=True)
    df.attrs["path"] = str(p)
    return df


def check_columns(df: pd.DataFrame, required: Iterable[str] | None = None, *, path: str | None = None) -> None:
    """The schema check of every manifest (:func:`read_manifest` runs it; call it on a table built in memory).

    Args:
        df: the manifest's table.
        required: columns that must be present besides a media column (None: :data:`REQUIRED`, or ``clips`` and
            ``question`` for a multi-clip manifest).
        path: the manifest's file, for the message.

    Raises:
        InputError: no media column (:data:`MEDIA_COLUMNS`), or a missing required column; the message names
            the columns found and what was expected, and suggests a media column a name may stand for.
    """
    columns = [str(c) for c in df.columns]
    found = ", ".join(columns) or "none"
    if required is None:
        required = ("clips", "question") if "clips" in columns else REQUIRED
    if not any(c in columns for c in MEDIA_COLUMNS):
        raise InputError(
            f"no media column (found: {found}; expected video, audio or image, or clips for multi-clip prompts)"
            + _suggestion(columns, MEDIA_COLUMNS),
            path=path,
        )
    for column in required:
        if column not in columns:
            raise InputError(f"missing column '{column}' (found: {found})" + _suggestion(columns, (column,)), path=path)


def _suggestion(columns: list[str], wanted: Iterable[str]) -> str:
    """A hint, "; did you mean video (for 'clip')?", for columns that look like one of ``wanted`` (a name
    people use for it, or a misspelling); "" if none does."""
    import difflib

    wanted = [w for w in wanted if w not in columns]
    hints = []
    for c in columns:
        key = c.strip().lower()
        meant = _MEDIA_ALIASES.get(key)
        if meant is None:
            close = difflib.get_close_matches(key, wanted, n=1, cutoff=0.75)
            meant = close[0] if close else None
        if meant in wanted and meant != c:
            hints.append(f"{meant} (for '{c}')")
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest as JSONL, Parquet or CSV (by extension), atomically.

    The table is written to a temporary file next to ``path`` and moved into place, so a reader never sees
    a half-written manifest. Paths are written as they are in ``df`` (see :func:`relative_path`). In CSV,
    list columns (``clips``, ``labels``) become their text form; prefer JSONL or Parquet for them.

    Returns:
        ``path``.

    Raises:
        InputError: unknown extension.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in FORMATS:
        raise InputError(f"unknown manifest format {ext!r} (use {', '.join(FORMATS)})", path=str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        if ext == ".jsonl":
            records = with_none(df).to_dict("records")
            with tmp.open("w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, default=_json_default, ensure_ascii=False) + "\n")
        elif ext == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def relative_path(path: str | Path | None, root: str | Path) -> str | None:
    """How a manifest in directory ``root`` should refer to ``path``: relative (POSIX) when the file is
    inside ``root``, so the directory stays movable; absolute otherwise."""
    if path is None:
        return None
    p, r = Path(path).resolve(), Path(root).resolve()
    return p.relative_to(r).as_posix() if p.is_relative_to(r) else str(p)


def with_none(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` whose non-numeric columns hold Python objects with None for missing values.

    pandas 3 reads text as its "str" dtype, whose missing value is NaN, which would reach users as the path
    or label "nan" and is not JSON.
    """
    out = df.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]) or out[column].isna().all():
            out[column] = _objects((None if _missing(v) else v for v in out[column]), out.index)
    return out


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _objects(values: Iterable[Any], index: pd.Index) -> pd.Series:
    """A column of Python objects (None stays None)."""
    return pd.Series(list(values), dtype=object, index=index)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a label column that a reader took for numbers: 3.0 -> "3"
    text = str(value)
    return text if text.strip() else None


def _resolve(value: Any, root: Path) -> str | None:
    text = _text(value)
    if text is None:
        return None
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else root / p)


def _resolve_clips(value: Any, root: Path) -> Any:
    """Resolve the paths of a multi-clip row's clips (a list of dicts; Parquet gives an array of them)."""
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if not isinstance(value, list | tuple | np.ndarray):
        return value
    return [
        {k: _resolve(v, root) if k in PATH_COLUMNS else v for k, v in c.items()} if isinstance(c, dict) else c
        for c in value
    ]


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (Parquet round trips give arrays for list cells) as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def manifest_content(path: str | Path) -> dict[str, Any]:
    """What a manifest holds, for a run's identity: its rows and its media files, not the path it was given by.

    Rows are read with :func:`read_manifest` (so paths are resolved: the same file named by a relative or an
    absolute path gives the same content), each hashed as canonical JSON and keyed by its id, so the order of
    the rows does not matter (runs take items in the order of their ids). A media file is identified by its
    size and modification time (``st_mtime_ns``), which is cheap for long videos and changes when a file is
    rewritten.

    Returns:
        ``{"sha256": hex digest of all of it, "rows": {id: row digest}, "media": {path: [size, mtime_ns] or
        None if missing}}``; digests of rows are shortened to 16 hex digits.
    """
    import hashlib

    df = read_manifest(path, required=())
    rows: dict[str, str] = {}
    media: dict[str, list[int] | None] = {}
    for row in with_none(df).to_dict("records"):
        text = json.dumps(row, sort_keys=True, default=_json_default)
        rows[str(row["id"])] = hashlib.sha256(text.encode()).hexdigest()[:16]
        files = [row.get(c) for c in PATH_COLUMNS]
        clips = row.get("clips")
        if isinstance(clips, list | tuple | np.ndarray):
            files += [c.get(k) for c in clips if isinstance(c, dict) for k in PATH_COLUMNS]
        for f in files:
            if isinstance(f, str) and f not in media:
                try:
                    st = os.stat(f)
                    media[f] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    media[f] = None
    rows = dict(sorted(rows.items()))
    media = dict(sorted(media.items()))
    digest = hashlib.sha256(json.dumps({"rows": rows, "media": media}, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "rows": rows, "media": media}
