"""What a model name can be, decided without the network and without importing torch.

``avlens.load`` and the command line call :func:`local_problem` before the seconds that importing the model
loader takes, so a wrong name fails at once, in one line; the loader (avlens.models.registry) makes the same
checks and then, for a hub id not in the local cache, asks the hub once.
"""

from __future__ import annotations

import os
from pathlib import Path

SUGGEST = "see `avlens models`, or use `organism` (the bundled model)"
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """True when the hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE)


def cached(name: str) -> bool:
    """True when ``name`` is a hub id downloaded before (it then loads offline too)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def local_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model, as far as can be told without the network (one line), or None: a local
    path, a cached hub model, or a hub id that only the hub can answer for."""
    if Path(name).exists():
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"model '{name}': no such directory, and not a hub id; {SUGGEST}"
    if offline() and not cached(name):
        return f"model '{name}': no such directory, and not in the local hub cache (HF_HUB_OFFLINE is set); {SUGGEST}"
    return None
