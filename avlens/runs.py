"""The run directory: a run's config and provenance, its records as Parquet shards, and resume.

A long run (``avlens reproduce``) may be killed at any instant, by Ctrl-C or SIGKILL, and re-run with the
same ``--out``: it then skips the work already finished and ends with exactly the records an uninterrupted
run would have written, none lost, none twice. A different config into the same directory is refused.

    run = RunDir.open(out, config, meta={"model_sha256": ..., "seed": 0})
    for batch in batches:
        unit = f"counterfactual/{split}/batch-{batch.index:03d}"
        if run.done(unit):
            continue
        run.write_many(unit, {"logits": logit_records, "heads": head_records})
    run.consolidate()
    df = run.table("logits")

Layout::

    <out>/run.json                        config, its hash, versions, start time, meta, resumes
    <out>/units/<unit>/<table>.parquet    the records of one unit, one shard per table
    <out>/results/<table>.parquet         every shard of a table in one file (written by consolidate)
    <out>/<name>.json                     write_json (summary.json...)
    <out>/failed/<unit>.json              a unit that failed after its retry: its reason (tried again on resume)

Why a unit is a directory: the shards of a unit must appear all together or not at all. They are written
into a temporary directory ``units/.tmp-*``, each file fsynced, and the directory is then renamed to
``units/<unit>`` in one ``rename(2)``, which POSIX makes atomic. So at any instant a unit directory either
does not exist (the unit is redone) or holds every shard of the unit; the directory's existence *is* the
"done" mark, and there is no separate index that could disagree with the files. A kill before the rename
leaves only a ``.tmp-*`` directory, which is never read and is deleted by the next ``open``. The fsyncs
(of the files before the rename, of ``units/`` after it) make the same hold after a power loss, not only
after a killed process. The same temp-file-then-``os.replace`` step makes run.json, consolidated tables and
write_json files atomic.

One process writes a run directory at a time: ``open`` takes an exclusive lock on ``<out>/.lock`` (released
by ``close``, or by the operating system when the process dies) and refuses a second writer, because the
second one's clean-up would delete the first one's unfinished temporary directories.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import AvlensError
from .jsonvalues import jsonable

TMP_PREFIX = ".tmp-"
_MISSING = object()
_VERSIONED = ("torch", "transformers", "avlens", "numpy")


def config_hash(config: dict) -> str:
    """The canonical hash of a config: sha256 of ``json.dumps(config, sort_keys=True)`` (hex).

    Values that JSON cannot represent (paths...) are hashed as their ``str``.
    """
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, default=str, allow_nan=False)


def _versions() -> dict[str, str | None]:
    # importlib.metadata reads the installed metadata without importing torch or transformers.
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a file's fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkstemp(prefix: str, directory: Path) -> tuple[int, str]:
    """``tempfile.mkstemp``, but the file gets the mode any new file gets (0666 less the umask), not 0600:
    the temporary file becomes the result file, and results are shared like any other file a tool writes."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _mkdtemp(prefix: str, directory: Path) -> Path:
    """``tempfile.mkdtemp`` with the mode of any new directory (0777 less the umask), not 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _atomic_write_bytes(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temp file beside it, fsync, then ``os.replace`` it in."""
    fd, tmp = _mkstemp(f"{TMP_PREFIX}{path.name}-", path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


def unit_key(unit: str) -> str:
    """The directory name of a unit: percent-encoded, so that it is one path component and can be decoded.

    ``"counterfactual/vision-heavy/batch-003"`` -> ``"counterfactual%2Fvision-heavy%2Fbatch-003"``.
    """
    if not unit:
        raise ValueError("a unit name must not be empty")
    key = quote(unit, safe="")
    if key.startswith("."):  # ".", ".." and names that would look like our temp directories
        key = "%2E" + key[1:]
    if len(key) > 200:  # file names are limited to 255 bytes, and the temp name adds a prefix and suffix
        raise ValueError(f"unit name too long ({len(key)} characters once encoded, at most 200): {unit!r}")
    return key


def _check_table_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise ValueError(f"bad table name {name!r}: use a plain file name such as 'logits'")


def _records_to_arrow(table: str, records: list[dict]) -> pa.Table:
    """Records (all with the same keys) as an Arrow table, types inferred per column."""
    columns = list(records[0])
    expected = set(columns)
    for i, record in enumerate(records):
        if set(record) != expected:
            missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
            raise ValueError(
                f"table {table!r}: record {i} has different columns from record 0 "
                f"(missing {missing}, extra {extra}); give every record the same keys, None where empty"
            )
    try:
        return pa.table({c: pa.array([r[c] for r in records]) for c in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"table {table!r}: cannot store the records as Parquet: {e}") from e


def data_change(old: dict, new: dict) -> str | None:
    """What differs between two data contents (see :meth:`RunDir.bind_data`), in words; None if nothing."""
    if old.get("sha256") == new.get("sha256"):
        return None
    rows_old, rows_new = old.get("rows", {}), new.get("rows", {})
    added = len(rows_new.keys() - rows_old.keys())
    removed = len(rows_old.keys() - rows_new.keys())
    changed = sum(rows_old[k] != rows_new[k] for k in rows_old.keys() & rows_new.keys())
    if added or removed or changed:
        parts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
        return f"the manifest's rows differ from the run's ({', '.join(parts)})"
    media_old, media_new = old.get("media", {}), new.get("media", {})
    moved = sorted(k for k in media_old.keys() | media_new.keys() if media_old.get(k) != media_new.get(k))
    if moved:
        more = f" (and {len(moved) - 1} more)" if len(moved) > 1 else ""
        return f"media file {moved[0]} changed since the run started{more}"
    return "the data differs from the run's"


class RunDir:
    """A run directory, opened to write with :meth:`open` or to read with :meth:`load` (not the constructor).

    Attributes:
        path: the directory.
        info: the contents of run.json (config, config_hash, versions, started, meta, resumes).
        config: the run's config (as stored in run.json: JSON values).
        config_hash: its canonical hash, see :func:`config_hash`.
    """

    def __init__(self, path: Path, info: dict, lock_fd: int | None) -> None:
        self.path = path
        self.info = info
        self.config: dict = info["config"]
        self.config_hash: str = info["config_hash"]
        self._lock_fd = lock_fd
        self._columns: dict[str, list[str]] = {}  # table -> its columns, once known (see _check_columns)

    # -- opening -------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, config: dict, *, meta: dict | None = None, data: dict | None = None
    ) -> RunDir:
        """Start a run in ``path``, or resume the run there if it has the same config.

        Args:
            path: the run directory (``--out``); created if missing.
            config: everything that determines the results (JSON-able dict; other values are stored as str).
            meta: provenance such as model hashes and the seed, stored in run.json. On resume, a meta that
                differs from the stored one in a key both have is refused like a changed config, since a
                different model or seed would mix two experiments' records in one directory.
            data: what the data holds (``avlens.data.manifest.manifest_content``: a digest, rows and media);
                see :meth:`bind_data`, which this calls.

        Raises:
            AvlensError: the directory holds a run of another config (or meta), is not a run directory, or
                is in use by another process.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            info = cls._start_or_resume(path, config, meta, data)
            run = cls(path, info, lock_fd)
            if data is not None:
                run.bind_data(data)
            run._clean_temporaries()
        except BaseException:
            os.close(lock_fd)
            raise
        return run

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunDir:
        """Open an existing run directory to read it (report, inspection): no config check, no lock.

        Reading while another process writes is safe, since shards appear atomically; :meth:`write` and
        :meth:`write_many` are refused.
        """
        path = Path(path)
        info_path = path / "run.json"
        if not info_path.is_file():
            raise AvlensError(f"{path} is not a run directory (no run.json)")
        return cls(path, json.loads(info_path.read_text()), None)

    @staticmethod
    def _start_or_resume(path: Path, config: dict, meta: dict | None, data: dict | None = None) -> dict:
        info_path = path / "run.json"
        new_hash = config_hash(config)
        versions = _versions()
        if not info_path.exists():
            if any(p.name != ".lock" and not p.name.startswith(TMP_PREFIX) for p in path.iterdir()):
                raise AvlensError(f"{path} is not empty and holds no run.json: not a run directory; use another --out")
            info = {
                "config": json.loads(_canonical_json(config)),
                "config_hash": new_hash,
                "versions": versions,
                "started": _now(),
                "meta": meta or {},
                "resumes": [],
            }
            _atomic_write_json(info_path, info)
            return info

        info = json.loads(info_path.read_text())
        # The data first: its digest is part of the config, but what changed in it is worth saying in words.
        change = data_change(info["data"], data) if data is not None and info.get("data") is not None else None
        if change is not None:
            raise AvlensError(f"{path}: {change}. Use another --out, or delete the directory to start again.")
        if info["config_hash"] != new_hash:
            old, new = info["config"], json.loads(_canonical_json(config))
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))
            raise AvlensError(
                f"{path} holds a run of another config (stored {info['config_hash'][:12]}, "
                f"given {new_hash[:12]}; differing keys: {', '.join(keys) or '(nested values)'}). "
                "Use another --out, or delete the directory to start again."
            )
        new_meta = json.loads(_canonical_json(meta or {}))
        changed = sorted(k for k in new_meta.keys() & info["meta"].keys() if new_meta[k] != info["meta"][k])
        if changed:
            raise AvlensError(
                f"{path} holds a run with other {', '.join(changed)} "
                f"(stored {[info['meta'][k] for k in changed]}, given {[new_meta[k] for k in changed]}). "
                "Use another --out, or delete the directory to start again."
            )
        # Resuming: keep the original provenance, and add when and with which versions each resume ran.
        info["meta"] = {**info["meta"], **new_meta}
        info["resumes"].append({"time": _now(), "versions": versions})
        _atomic_write_json(info_path, info)
        return info

    def bind_data(self, data: dict) -> None:
        """Record what the run's data holds, or, on resume, refuse data whose content changed.

        The run's identity is the content of its manifest, not the path it was given by: the same rows by
        another path resume, while changed rows or media files would mix two datasets' records in one
        directory and are refused with one line saying what changed.

        Args:
            data: ``{"sha256": digest, "rows": {id: row digest}, "media": {path: identity}}``.

        Raises:
            AvlensError: the stored data differs.
        """
        stored = self.info.get("data")
        if stored is None:
            self.info["data"] = data
            _atomic_write_json(self.path / "run.json", self.info)
            return
        change = data_change(stored, data)
        if change is not None:
            raise AvlensError(f"{self.path}: {change}. Use another --out, or delete the directory to start again.")

    def _clean_temporaries(self) -> None:
        """Delete what a killed run left half-written: it is never read, and would pile up otherwise."""
        for folder in (self.path, self.path / "units", self.path / "results", self.path / "failed"):
            if not folder.is_dir():
                continue
            for p in folder.glob(TMP_PREFIX + "*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the directory's lock. Later writes are refused; reads still work."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, config {self.config_hash[:12]}, {len(self.units())} units done)"

    # -- units ---------------------------------------------------------------------------------------------

    def done(self, unit: str) -> bool:
        """Whether ``unit``'s records have all been written."""
        return (self.path / "units" / unit_key(unit)).is_dir()

    def units(self) -> list[str]:
        """The names of the finished units, sorted."""
        folder = self.path / "units"
        if not folder.is_dir():
            return []
        return sorted(unquote(p.name) for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def write(self, unit: str, table: str, records: list[dict]) -> None:
        """Write ``unit``'s records of one table, and mark the unit done. See :meth:`write_many`."""
        self.write_many(unit, {table: records})

    def write_many(self, unit: str, tables: dict[str, list[dict]]) -> None:
        """Write ``unit``'s records of several tables at once, and mark the unit done.

        All or nothing: after a crash at any point the unit is either done with every shard, or not done
        and without any (see the module docstring for how). An empty list of records writes no shard but
        still marks the unit done.

        Args:
            unit: the unit's name, e.g. ``"counterfactual/vision-heavy/batch-003"``.
            tables: table name -> records, one dict per row; values may be str, int, float, bool, None or
                lists of floats. Every record of a table has the same keys, in every unit.

        Raises:
            AvlensError: the unit is already done, or the run was opened read-only or closed.
            ValueError: records with inconsistent columns or values Parquet cannot hold.
        """
        if self._lock_fd is None:
            raise AvlensError(f"{self.path} is not open for writing: use RunDir.open(path, config)")
        key = unit_key(unit)
        units = self.path / "units"
        final = units / key
        if final.exists():
            raise AvlensError(f"unit {unit!r} is already done in {self.path}; check run.done(unit) first")
        # Convert and check everything before touching the disk, so that a bad record writes nothing.
        arrow = {}
        for table, records in tables.items():
            _check_table_name(table)
            if records:
                arrow[table] = _records_to_arrow(table, records)
                self._check_columns(table, arrow[table])

        units.mkdir(exist_ok=True)
        tmp = _mkdtemp(f"{TMP_PREFIX}{key}-", units)
        try:
            for table, data in arrow.items():
                with open(tmp / f"{table}.parquet", "wb") as f:
                    pq.write_table(data, f)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)  # the commit point: atomic, and the unit is done from here on
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(units)
        (self.path / "failed" / f"{key}.json").unlink(missing_ok=True)  # an earlier failure is now done

    def fail(self, unit: str, reason: str, detail: str = "") -> None:
        """Record that ``unit`` failed (after its retries), with a one-line ``reason`` and a ``detail`` such as
        a traceback, in ``failed/<unit>.json``. The unit stays not done: a resumed run tries it again, and a
        success removes the record."""
        if self._lock_fd is None:
            raise AvlensError(f"{self.path} is not open for writing: use RunDir.open(path, config)")
        folder = self.path / "failed"
        folder.mkdir(exist_ok=True)
        _atomic_write_json(folder / f"{unit_key(unit)}.json", {"unit": unit, "reason": reason, "detail": detail})

    def failures(self) -> dict[str, dict]:
        """The units recorded as failed and not done since: unit -> {"unit", "reason", "detail"}, by unit name."""
        folder = self.path / "failed"
        if not folder.is_dir():
            return {}
        found = [json.loads(p.read_text()) for p in folder.glob("*.json") if not p.name.startswith(".")]
        return {f["unit"]: f for f in sorted(found, key=lambda f: f["unit"]) if not self.done(f["unit"])}

    def _check_columns(self, table: str, data: pa.Table) -> None:
        """Refuse records whose columns differ from the table's other shards (a table is one tidy frame)."""
        if table not in self._columns:
            existing = next(iter(self._shards(table)), None)
            if existing is None:
                self._columns[table] = data.column_names
                return
            self._columns[table] = pq.read_schema(existing).names
        if data.column_names != self._columns[table]:
            raise ValueError(
                f"table {table!r}: columns {data.column_names} differ from those already written {self._columns[table]}"
            )

    # -- reading -------------------------------------------------------------------------------------------

    def table_names(self) -> list[str]:
        """The names of the tables that have at least one shard, sorted."""
        return sorted({p.stem for p in self._shards("*")})

    def table(self, name: str) -> pd.DataFrame:
        """Every record of table ``name``, in the order of the sorted unit names (empty DataFrame if none)."""
        data = self._arrow_table(name)
        return pd.DataFrame() if data is None else data.to_pandas()

    def _shards(self, table: str) -> list[Path]:
        # Skip the ".tmp-*" directories of unfinished units (pathlib's "*" matches hidden names too).
        shards = (self.path / "units").glob(f"*/{table}.parquet")
        return sorted((p for p in shards if not p.parent.name.startswith(".")), key=lambda p: p.parent.name)

    def _arrow_table(self, name: str) -> pa.Table | None:
        _check_table_name(name)
        shards = [pq.read_table(p) for p in self._shards(name)]
        if not shards:
            return None
        try:
            # "permissive" unifies a column that is all None in one shard (null type) with its type in the
            # others, and ints with floats.
            return pa.concat_tables(shards, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise AvlensError(f"{self.path}: the shards of table {name!r} have incompatible types: {e}") from e

    def consolidate(self) -> dict[str, Path]:
        """Write each table as one file, ``results/<table>.parquet`` (atomically), for users.

        Returns:
            table name -> path of its file.
        """
        results = self.path / "results"
        results.mkdir(exist_ok=True)
        written = {}
        for name in self.table_names():
            data = self._arrow_table(name)
            out = results / f"{name}.parquet"
            _atomic_write_bytes(out, lambda f, data=data: pq.write_table(data, f))
            written[name] = out
        return written

    def write_result(self, name: str, df: pd.DataFrame) -> Path:
        """Write a table computed from the records (not itself recorded by units) as ``results/<name>.parquet``,
        atomically. Returns the path."""
        _check_table_name(name)
        if name in self.table_names():
            raise ValueError(f"table {name!r} is recorded by units; consolidate writes it")
        results = self.path / "results"
        results.mkdir(exist_ok=True)
        out = results / f"{name}.parquet"
        data = pa.Table.from_pandas(df, preserve_index=False)
        _atomic_write_bytes(out, lambda f: pq.write_table(data, f))
        return out

    # -- small files ---------------------------------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as ``<run>/<name>`` (".json" added if missing), atomically. Returns the path."""
        path = self._json_path(name)
        if path.name == "run.json":
            raise ValueError("run.json belongs to the run directory itself")
        _atomic_write_json(path, obj)
        return path

    def read_json(self, name: str) -> Any:
        """Read a file written by :meth:`write_json`."""
        return json.loads(self._json_path(name).read_text())

    def _json_path(self, name: str) -> Path:
        _check_table_name(name)
        return self.path / (name if name.endswith(".json") else f"{name}.json")


def _lock(path: Path) -> int:
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AvlensError(
            f"{path} is in use by another avlens process (or another RunDir in this one: close it first)"
        ) from None
    return fd
