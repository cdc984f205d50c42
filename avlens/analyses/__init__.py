"""The analyses: one module per method, each declaring itself in one :class:`Analysis` spec, found by the
registry (:mod:`avlens.analyses.registry`). ``reproduce``, ``avlens run`` (and its ``--help``) and the report read
the registry; nothing else is edited to add an analysis.

Adding one: write a module with a Config, a typed Summary and four functions, and end it with its spec::

    @dataclass(frozen=True)
    class Config:
        questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})

    @dataclass(frozen=True)
    class Summary:
        top1: float | None                        # typed: findings and the report read attributes

    def collect(adapter, items, config): ...      # -> {"table": [record, ...]}: the model work on one unit
    def summarize(tables) -> Summary: ...         # tables: {"table": DataFrame} of one model
    def findings(summaries) -> list[Finding]: ... # summaries: {model: Summary}
    def plot(tables) -> Figure: ...               # tables: {model: {"table": DataFrame}}

    SPEC = Analysis("mine", "My analysis", "the claim it tests", Config, Summary, "top1",
                    collect, summarize, findings, plot, needs=Needs(base=False))

Then either add its module name to ``registry.BUILTIN`` (inside the package) or call ``register(SPEC)``
(anywhere else: a notebook, a test, another package). Items come from the manifest through the config's
``questions`` (or ``question``) and ``conditions`` (:func:`avlens.analyses.common.items_from_manifest`).
:mod:`avlens.analyses.dominance` (dominance splits of a manifest by the model's own answers) is a plain function,
not a registry analysis.
"""

from __future__ import annotations

from ..jsonvalues import strict_json
from .base import VERDICTS, Analysis, Finding, Needs, verdict
from .registry import BUILTIN, get, names, register, specs, unregister

__all__ = [
    "BUILTIN",
    "VERDICTS",
    "Analysis",
    "Finding",
    "Needs",
    "get",
    "names",
    "register",
    "specs",
    "strict_json",
    "unregister",
    "verdict",
]
