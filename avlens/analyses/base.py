"""What an analysis is: its :class:`Analysis` spec (name, title, the claim it tests, Config, typed Summary,
needs, functions), the :class:`Finding` it sets beside the paper, and strict JSON for its results.

Light on purpose (no torch, no pandas): the registry, the report and the command line import it to list and
describe analyses without loading any of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..jsonvalues import jsonable

VERDICTS = ("agrees", "partly", "disagrees", "not measured")


@dataclass(frozen=True)
class Finding:
    """One claim of a paper, set against what we measured.

    Attributes:
        claim: what the paper reported, in a few words ("vision dominates deep layers").
        paper: the paper's figure ("blocking video in layers 15-30 raises audio fidelity ~50%").
        measured: our figure, as text ("+38% (95% CI 31-45%) on 2 000 samples").
        verdict: one of "agrees", "partly", "disagrees", "not measured".
        note: anything that qualifies the verdict.
    """

    claim: str
    paper: str
    measured: str
    verdict: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")


def verdict(calls: Sequence[str | None]) -> str:
    """One verdict over models: theirs when they all agree, "partly" when they differ, "not measured" when no
    model could be judged (``None`` calls are models without the figure)."""
    known = [c for c in calls if c is not None]
    if not known:
        return "not measured"
    return known[0] if all(c == known[0] for c in known) else "partly"


@dataclass(frozen=True)
class Needs:
    """What an analysis needs besides a model and a manifest; the orchestration checks it before any work.

    Attributes:
        base: a second model, the vision-language base the audio-visual model was built from; ``collect`` then
            gets it as ``base=``.
        generation: the analysis generates answers (slower; informational).
        dominance: the manifest must be a dominance split (``avlens data dominance``; informational).
        store: collect takes ``store=`` (a :class:`avlens.store.Shard` for the unit, or None) and finalize takes
            ``store=`` (the :class:`avlens.store.ActivationStore`, or None); with a store, vectors go to it
            instead of the records.
    """

    base: bool = False
    generation: bool = False
    dominance: bool = False
    store: bool = False


@dataclass(frozen=True)
class Analysis:
    """Everything the registry, ``reproduce``, ``avlens run`` and the report know of an analysis.

    Attributes:
        name: as in ``avlens run NAME``, and the prefix of its tables (``<name>.<table>``).
        title: the report's section heading.
        claim: the paper's claim it tests, in a sentence.
        Config: its frozen config dataclass; ``default_config`` (an instance) is what ``reproduce`` and
            ``avlens run`` use (None: ``Config()``).
        Summary: the dataclass ``summarize`` returns; ``headline`` names the field summary.json and the
            report's overview lead with.
        collect: ``(adapter, items, config[, base=]) -> {table: [record, ...]}``, the model work on one unit.
        summarize: ``({table: DataFrame}) -> Summary``, one model's headline figures.
        findings: ``({model: Summary}) -> [Finding]``, the comparison with the paper.
        plot: ``({model: {table: DataFrame}}) -> Figure``.
        finalize: ``({table: DataFrame}, config) -> {table: DataFrame}``, work that needs every unit (optional).
        tables: ``({model: Summary}) -> [DataFrame]``, the report's tables of the summaries: named rows and
            columns, one precision, n beside every rate, ``df.attrs["caption"]`` as caption (optional; the report
            otherwise lists the summary's fields).
        needs: see :class:`Needs`.
        paper: the paper the claim is from ("P1": arXiv 2604.02605).
        store_vectors: ``(config, n_layers) -> n``, the vectors of the hidden size one item puts in the activation
            store (analyses with ``needs.store``), so that the store's size is said before a run starts.
        about: a paragraph for the report (default: the collect function's module docstring).
    """

    name: str
    title: str
    claim: str
    Config: type
    Summary: type
    headline: str
    collect: Callable[..., dict[str, list[dict]]]
    summarize: Callable[[dict[str, Any]], Any]
    findings: Callable[[dict[str, Any]], list[Finding]]
    plot: Callable[[dict[str, dict[str, Any]]], Any]
    finalize: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    tables: Callable[[dict[str, Any]], list[Any]] | None = None
    default_config: Any = None
    needs: Needs = field(default_factory=Needs)
    paper: str = "P1"
    about: str = ""
    store_vectors: Callable[[Any, int], int] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"analysis name {self.name!r}: lower case letters, digits and _ only")
        for what, cls in (("Config", self.Config), ("Summary", self.Summary)):
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise TypeError(f"{self.name}: {what} must be a dataclass, got {cls!r}")
        names = [f.name for f in dataclasses.fields(self.Summary)]
        if self.headline not in names:
            raise ValueError(f"{self.name}: headline {self.headline!r} is not a field of {self.Summary.__name__}")
        if self.default_config is not None and not isinstance(self.default_config, self.Config):
            raise TypeError(f"{self.name}: default_config is not a {self.Config.__name__}")

    def config(self) -> Any:
        """The config ``reproduce`` and ``avlens run`` use."""
        return self.default_config if self.default_config is not None else self.Config()

    def headline_of(self, summary: Any) -> Any:
        """The headline figure of one model's summary."""
        return getattr(summary, self.headline)


# ---------------------------------------------------------------------------------------------------------
# Numbers in summaries and strict JSON
# ---------------------------------------------------------------------------------------------------------
def num(x: Any, digits: int | None = None) -> float | None:
    """A summary figure: a Python float (rounded to ``digits``), or None for a missing, NaN or infinite one."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def pct(x: float | None, spec: str = ".0%") -> str:
    """A figure for a sentence of a finding: formatted with ``spec``, "n/a" when not measured."""
    return "n/a" if x is None or x != x else format(x, spec)


def flat(summary: Any) -> dict[str, Any]:
    """A summary as one level of figures, nested fields joined with "/" (for the report's tables)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", jsonable(summary))
    return out
