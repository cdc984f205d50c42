"""The registry of analyses: the built-in ones, found by module name and imported on first use, and any
registered at run time with :func:`register`.

Listing names (:func:`names`) imports nothing, so ``avlens run --help`` stays cheap; :func:`get` and
:func:`specs` import the analysis modules they return.
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from .base import Analysis

BUILTIN = (
    "counterfactual",
    "probe",
    "logit_lens",
    "knockout",
    "token_shift",
    "attention_share",
    "sinks",
    "causal_trace",
    "mitigate",
    "flow",
    "route",
    "discard",
)
"""The built-in analyses, in report order: each is the module ``avlens.analyses.<name>``, whose ``SPEC`` is its
:class:`~avlens.analyses.base.Analysis`."""

_registered: dict[str, Analysis] = {}
_loaded: dict[str, Analysis] = {}


def register(spec: Analysis, *, replace: bool = False) -> Analysis:
    """Add an analysis (after the built-in ones); returns it. A taken name is refused unless ``replace``."""
    if not isinstance(spec, Analysis):
        raise TypeError(f"register takes an Analysis, got {type(spec).__name__}")
    if not replace and (spec.name in BUILTIN or spec.name in _registered):
        raise ValueError(f"an analysis named {spec.name!r} is already registered")
    _registered[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an analysis added with :func:`register` (built-in ones stay)."""
    _registered.pop(name, None)


def names() -> list[str]:
    """Every analysis name, built-in first, without importing any analysis."""
    return [*(n for n in BUILTIN if n not in _registered), *_registered]


def get(name: str) -> Analysis:
    """The spec of an analysis by name (an :class:`~avlens.errors.InputError` naming the choices if unknown)."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        raise InputError(f"unknown analysis '{name}' (analyses: {', '.join(names())})")
    if name not in _loaded:
        spec = importlib.import_module(f"{__package__}.{name}").SPEC
        if spec.name != name:
            raise RuntimeError(f"avlens.analyses.{name} declares the analysis {spec.name!r}")
        _loaded[name] = spec
    return _loaded[name]


def specs(paper: str | None = None) -> list[Analysis]:
    """Every analysis (of one paper, if given), in :func:`names` order."""
    out = [get(n) for n in names()]
    return [s for s in out if paper is None or s.paper == paper]
