"""The analyses: one module per method, each a Config, ``collect`` (per unit of items), optional ``finalize``,
``summarize``, ``plot`` and ``findings`` (the comparison with the paper).

``ANALYSES`` maps names (as in ``avlens run NAME``) to modules, imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("counterfactual", "probe", "logit_lens", "knockout", "token_shift", "attention_share")


def module(name: str) -> ModuleType:
    """The module of an analysis by name."""
    if name not in NAMES:
        from ..errors import InputError

        raise InputError(f"unknown analysis '{name}' (analyses: {', '.join(NAMES)})")
    return importlib.import_module(f".{name}", __name__)
