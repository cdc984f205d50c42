"""An on-disk store of activations: one safetensors shard per unit of samples, read lazily.

Capturing the residual of every layer at a few sites over thousands of clips gives more vectors than memory
holds comfortably (Qwen2.5-Omni-7B: 29 layers x 3 sites x 3584 floats = 1.2 MB per item in float32). The
store keeps them on disk, written by workers in parallel (each worker writes the shards of its own units) and
read back one array at a time, so that an analysis such as the probe fits a layer's probe from that layer's
vectors without loading the others.

    store = ActivationStore.open(directory, model_sha256=adapter.sha256, dtype="float16")
    shard = store.shard("probe/vision-heavy/32-0003")
    if not shard.exists:
        shard.write(rows, {"audio/12": vectors})   # vectors: (len(rows of audio at layer 12), D)
    x = store.read("audio/12")                     # (rows of every shard, D) float32, only that tensor read

Layout::

    <dir>/store.json                      {"model_sha256", "dtype", "version": 1}
    <dir>/shards/<unit key>.safetensors   one unit: its arrays (one tensor per site and layer, "site/layer")
                                          and, in the header's metadata, its rows and meta as JSON

"Chunked by layer and sample": a shard holds one unit of samples, and within it one tensor per
(site, layer), so that reading a layer's vectors touches only that tensor's bytes in each shard (safetensors
files are memory-mapped, and ``get_tensor`` copies just the one tensor).

Why a shard is one file: it must appear complete or not at all, so that its existence *is* the "done" mark
(as a unit directory is in :mod:`avlens.runs`). It is written to a temporary file ``shards/.tmp-*`` beside
it, fsynced, and renamed into place with ``os.replace`` (atomic on POSIX); the directory is fsynced after.
A worker killed before the rename leaves only a ``.tmp-*`` file, never listed as a shard; since several
workers may be writing at once, temporaries are not deleted on :meth:`ActivationStore.open` (that could
delete a running worker's file) but by :meth:`ActivationStore.remove_temporaries`, called when no one writes.

Two workers given the same unit would both write it, and the second ``os.replace`` would win; the
orchestration gives each unit to one worker, and the two files would hold the same vectors anyway.

float16 halves the size; vectors come back as float32 either way, rounded to float16's precision (about 3
significant digits: a relative error up to 2**-11), so results computed from them differ slightly from the
float32 ones. A value beyond float16's range (65504) is refused rather than stored as infinity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import AvlensError
from .jsonvalues import jsonable
from .runs import _fsync_dir, _mkstemp, unit_key  # one atomic-file recipe and one name encoding for both

VERSION = 1
DTYPES = ("float32", "float16")
TMP_PREFIX = ".tmp-"
SUFFIX = ".safetensors"
_FORMAT = "avlens-activations"


def estimate_bytes(n_samples: int, n_arrays_per_sample: int, hidden: int, dtype: str) -> int:
    """The bytes of tensor data a store of ``n_samples`` samples takes, each with ``n_arrays_per_sample``
    vectors of ``hidden`` floats (the probe: sites x (layers + 1) per item).

    The shards' headers (the rows as JSON, some 200 bytes a row) come on top of it.
    """
    return int(n_samples) * int(n_arrays_per_sample) * int(hidden) * np.dtype(_check_dtype(dtype)).itemsize


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise AvlensError(f"store dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(temp_path)`` into a temporary file beside it, fsync, then ``os.replace``."""
    fd, tmp = _mkstemp(f"{TMP_PREFIX}{path.name}-", path.parent)  # the mode of any new file: stores are shared
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class ActivationStore:
    """A store directory, opened to write with :meth:`open` or to read with :meth:`load` (not the constructor).

    Attributes:
        path: the directory.
        model_sha256: the hash of the model whose activations it holds.
        dtype: "float32" or "float16", how the arrays are stored on disk.
    """

    def __init__(self, path: Path, info: dict) -> None:
        self.path = path
        self.model_sha256: str = info["model_sha256"]
        self.dtype: str = _check_dtype(info["dtype"])

    @classmethod
    def open(cls, path: str | os.PathLike, *, model_sha256: str, dtype: str = "float32") -> ActivationStore:
        """Create the store ``path``, or reopen it to add shards.

        Raises:
            AvlensError: the store there holds another model's activations or another dtype (one line naming
                the path and what differs), or ``path`` is a non-empty directory that is not a store.
        """
        path = Path(path)
        _check_dtype(dtype)
        given = {"model_sha256": model_sha256, "dtype": dtype, "version": VERSION}
        info_path = path / "store.json"
        if info_path.is_file():
            stored = json.loads(info_path.read_text())
            differs = [
                f"{k} {stored.get(k)!r} (given {given[k]!r})"
                for k in ("model_sha256", "dtype", "version")
                if stored.get(k) != given[k]
            ]
            if differs:
                raise AvlensError(
                    f"{path}: the activation store holds another {', '.join(differs)}; "
                    "use another --store, or delete it to start again"
                )
            return cls(path, stored)
        path.mkdir(parents=True, exist_ok=True)
        if any(not p.name.startswith(".") for p in path.iterdir()):
            raise AvlensError(f"{path} is not empty and holds no store.json: not an activation store")
        (path / "shards").mkdir(exist_ok=True)
        text = json.dumps(given, indent=2, sort_keys=True) + "\n"
        _atomic_write(info_path, lambda tmp: Path(tmp).write_text(text))
        return cls(path, given)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationStore:
        """Open an existing store without checking its model: to read it, or in a worker to write the shards of
        its units once the driver has checked the store with :meth:`open`.

        Reading while workers write is safe: shards appear atomically.
        """
        path = Path(path)
        info_path = path / "store.json"
        if not info_path.is_file():
            raise AvlensError(f"{path} is not an activation store (no store.json)")
        return cls(path, json.loads(info_path.read_text()))

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, {self.dtype}, {len(self.shards())} shards)"

    def shard(self, name: str) -> Shard:
        """The shard of unit ``name`` (written or not: see :attr:`Shard.exists`)."""
        return Shard(self, name)

    def shards(self) -> list[str]:
        """The names of the complete shards, sorted."""
        return sorted(unquote(p.name[: -len(SUFFIX)]) for p in self._files())

    def _files(self) -> list[Path]:
        folder = self.path / "shards"
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")]

    @property
    def nbytes(self) -> int:
        """Bytes on disk of all complete shards (headers included)."""
        return sum(p.stat().st_size for p in self._files())

    def read(self, array: str, shards: Sequence[str] | None = None) -> np.ndarray:
        """Array ``array`` of each shard, concatenated in the order of ``shards`` (default: :meth:`shards`).

        Lazy: each shard is opened (memory-mapped) and only that tensor is read from it. A shard without the
        array (a unit with no item of that site) adds no rows.

        Returns:
            float32 (sum of the shards' rows, D).

        Raises:
            KeyError: no shard has the array.
            AvlensError: a shard named is not written.
        """
        parts = []
        for name in self.shards() if shards is None else shards:
            part = self.shard(name)._get(array)
            if part is not None:
                parts.append(part)
        if not parts:
            raise KeyError(f"{self.path}: no shard has array {array!r}")
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary files that killed writers left; call it only while no worker writes.

        Returns:
            the names of the files deleted.
        """
        folder = self.path / "shards"
        gone = sorted(p.name for p in folder.glob(TMP_PREFIX + "*")) if folder.is_dir() else []
        for name in gone:
            (folder / name).unlink(missing_ok=True)
        return gone


class Shard:
    """One unit's arrays and rows in a store.

    Attributes:
        name: the unit name ("probe/vision-heavy/32-0003").
        path: its file.
    """

    def __init__(self, store: ActivationStore, name: str) -> None:
        self.store = store
        self.name = name
        self.path = store.path / "shards" / f"{unit_key(name)}{SUFFIX}"

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, {'written' if self.exists else 'not written'})"

    @property
    def exists(self) -> bool:
        """Whether the shard has been written (complete: it is written atomically)."""
        return self.path.is_file()

    def write(self, rows: list[dict], arrays: dict[str, np.ndarray], *, meta: dict[str, Any] | None = None) -> None:
        """Write the shard, atomically (temporary file, fsync, ``os.replace``).

        Args:
            rows: the records the arrays belong to (JSON-able dicts; numpy values become Python ones, NaN
                None), kept in the file's header as JSON.
            arrays: name (e.g. ``"audio/12"``) -> (n, D) floats, n the rows of that array (any number; the
                caller's records say which row is whose); cast to the store's dtype.
            meta: anything else JSON-able to keep with the shard (read back by :meth:`meta`).

        Raises:
            AvlensError: the shard exists already (shards are never overwritten), or a value overflows float16.
            ValueError: an array is not 2-D.
        """
        if self.exists:
            raise AvlensError(f"shard {self.name!r} is already written in {self.store.path}; check shard.exists")
        tensors = {}
        for key, value in arrays.items():
            value = np.asarray(value)
            if not key or value.ndim != 2:
                raise ValueError(f"shard {self.name!r}: array {key!r} must have a name and 2 dimensions (n, D)")
            with np.errstate(over="ignore"):  # an overflow is refused below, in words
                cast = np.ascontiguousarray(value, dtype=self.store.dtype)
            if np.isinf(cast).any() and not np.isinf(value).any():
                raise AvlensError(
                    f"shard {self.name!r}: array {key!r} has values beyond {self.store.dtype}'s range "
                    f"(largest {float(np.abs(value).max()):.4g}); use a float32 store"
                )
            tensors[key] = cast
        metadata = {
            "format": _FORMAT,
            "version": str(VERSION),
            "name": self.name,
            "rows": json.dumps(jsonable(rows), allow_nan=False),
            "meta": json.dumps(jsonable(meta or {}), allow_nan=False),
        }
        self.path.parent.mkdir(exist_ok=True)
        _atomic_write(self.path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def _open(self):
        if not self.exists:
            raise AvlensError(f"shard {self.name!r} is not written in {self.store.path}")
        return safe_open(str(self.path), framework="numpy")

    def _metadata(self, key: str) -> Any:
        with self._open() as f:
            return json.loads(f.metadata()[key])

    def rows(self) -> list[dict]:
        """The records written with the arrays, in their order."""
        return self._metadata("rows")

    def meta(self) -> dict[str, Any]:
        """The ``meta`` written with the shard ({} if none)."""
        return self._metadata("meta")

    def arrays(self) -> list[str]:
        """The names of the shard's arrays, sorted."""
        with self._open() as f:
            return sorted(f.keys())

    def array(self, name: str) -> np.ndarray:
        """Array ``name`` alone (the others are not read), float32 (n, D).

        Raises:
            KeyError: the shard has no such array.
        """
        got = self._get(name)
        if got is None:
            raise KeyError(f"shard {self.name!r} has no array {name!r} (it has {', '.join(self.arrays()) or 'none'})")
        return got

    def _get(self, name: str) -> np.ndarray | None:
        """Array ``name`` as float32 (n, D), or None when the shard lacks it."""
        with self._open() as f:
            names = f.keys()  # safe_open supports no ``in``
            if name not in names:
                return None
            return f.get_tensor(name).astype(np.float32, copy=False)
