"""Executors: where the units of a run are computed. The orchestration (:mod:`avlens.reproduce`) plans units and
writes their records into the run directory; an executor only turns units into records.

- :class:`LocalExecutor`: in this process, on models already loaded (the default).
- :class:`avlens.executors.ray.RayExecutor`: on Ray actors, each of which loads the models once and keeps them
  (``--executor ray``; needs the ``avlens[ray]`` extra).

Both follow one contract, so that a run gives the same records whichever executor computed a unit, and a run
started with one resumes with the other: ``run(units, done, failed)`` calls ``done(unit, tables)`` once per unit
that succeeds (in any order) and ``failed(unit, reason, detail)`` once per unit that failed twice (an exception
in the analysis, e.g. on media it cannot read: tried once more, then given up with its reason). Records are
written by the caller, in the driver process, so the run directory keeps one writer.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..analyses import Analysis, get
from ..analyses.common import Item
from ..models.base import Adapter

ATTEMPTS = 2
"""Tries of a unit whose analysis raises (the first and one retry) before it is recorded as failed."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: an analysis on one model over a batch of items. Data, so it can be sent to a worker.

    Attributes:
        name: the unit's name in the run directory (``"counterfactual/vision-heavy/16-0003"``).
        analysis: the analysis's registry name.
        model: the model's label in the run.
        items: the items, in the order the analysis gets them.
        config: the analysis's Config.
        store: the activation store directory of this model (analyses with ``needs.store``), or None.
    """

    name: str
    analysis: str
    model: str
    items: tuple[Item, ...]
    config: Any
    store: str | None = None


Tables = dict[str, list[dict]]
Done = Callable[[Unit, Tables], None]
Failed = Callable[[Unit, str, str], None]


class Executor(Protocol):
    """What the orchestration needs of an executor."""

    name: str
    labels: list[str]
    has_base: bool

    def model_hashes(self) -> dict[str, str]:
        """label -> sha256 of the model's weights (the base, if any, under ``"base"``)."""
        ...

    def model_dims(self) -> dict[str, tuple[int, int]]:
        """label -> (decoder layers, hidden size) of each model."""
        ...

    def run(self, units: Sequence[Unit], done: Done, failed: Failed) -> None:
        """Compute every unit; call ``done`` or ``failed`` once per unit, in the calling thread."""
        ...

    def close(self) -> None:
        """Release workers (idempotent)."""
        ...


def model_hash(adapter: Adapter) -> str:
    """sha256 of the checkpoint's weights file (or of the in-memory state, for a model built in code)."""
    path = Path(adapter.source) / "model.safetensors" if adapter.source else None
    h = hashlib.sha256()
    if path is not None and path.exists():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for k, v in sorted(adapter.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def collect_unit(spec: Analysis, adapter: Adapter, unit: Unit, base: Adapter | None) -> Tables:
    """One unit's records, each tagged with the model's label, in tables named ``<analysis>.<table>``."""
    extra: dict[str, Any] = {}
    if spec.needs.base:
        extra["base"] = base
    if spec.needs.store:
        from ..store import ActivationStore

        extra["store"] = ActivationStore.load(unit.store).shard(unit.name) if unit.store else None
    tables = spec.collect(adapter, list(unit.items), unit.config, **extra)
    return {f"{spec.name}.{t}": [{"model": unit.model, **r} for r in rows] for t, rows in tables.items()}


def reason_of(error: BaseException) -> str:
    """One line saying what went wrong: the exception's type and message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def detail_of(error: BaseException) -> str:
    """The traceback of ``error``, kept beside the record of a failed unit for whoever debugs it."""
    return "".join(traceback.format_exception(error))


class LocalExecutor:
    """Units computed one after the other in this process, on the loaded models."""

    name = "local"

    def __init__(self, models: Mapping[str, Adapter], base: Adapter | None = None) -> None:
        self.models = dict(models)
        self.base = base
        self.labels = list(self.models)
        self.has_base = base is not None

    def model_hashes(self) -> dict[str, str]:
        hashes = {label: model_hash(a) for label, a in self.models.items()}
        if self.base is not None:
            hashes["base"] = model_hash(self.base)
        return hashes

    def model_dims(self) -> dict[str, tuple[int, int]]:
        return {label: (a.n_layers, a.hidden_size) for label, a in self.models.items()}

    def run(self, units: Sequence[Unit], done: Done, failed: Failed) -> None:
        for unit in units:
            spec = get(unit.analysis)
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    tables = collect_unit(spec, self.models[unit.model], unit, self.base)
                except Exception as e:
                    if attempt == ATTEMPTS:
                        failed(unit, reason_of(e), detail_of(e))
                    continue
                done(unit, tables)
                break

    def close(self) -> None:
        pass


EXECUTORS = ("local", "ray")


def make_executor(
    kind: str,
    models: Mapping[str, str],
    base: str | None,
    *,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    load: Callable[[str], Adapter] | None = None,
) -> Executor:
    """The executor ``--executor KIND`` names, for models given by name (label -> path, hub id or organism name).

    ``local`` loads the models here with ``load``; ``ray`` leaves loading to its workers.

    Raises:
        InputError: an unknown kind, or ``ray`` without Ray installed (one line saying how to install it).
    """
    from ..errors import InputError

    if kind == "local":
        if load is None:
            raise ValueError("the local executor needs a load function")
        return LocalExecutor({label: load(m) for label, m in models.items()}, load(base) if base else None)
    if kind == "ray":
        from .ray import RayExecutor

        return RayExecutor(models, base, workers=workers, gpus_per_worker=gpus_per_worker, address=address)
    raise InputError(f"--executor: unknown executor {kind!r} (choose {' or '.join(EXECUTORS)})")
