"""The registry of model adapters: one entry per family, found by name or by a checkpoint's model_type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from ..modelnames import SUGGEST, cached, local_problem
from .base import Adapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available under its ``family`` name."""
    ADAPTERS[cls.family] = cls
    return cls


def adapter_for(model_type: str) -> type[Adapter]:
    """The adapter class for a config's ``model_type``."""
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls
    known = ", ".join(t for c in ADAPTERS.values() for t in c.model_types)
    raise ModelNotFoundError(f"no avlens adapter for model type '{model_type}' (supported: {known})")


def load(name: str | Path, *, family: str | None = None, **kwargs: Any) -> Adapter:
    """Load a model by local path or hub id with the adapter of its family.

    This is the loader of checkpoints only; :func:`avlens.load` also knows the bundled organism's names
    (``organism`` / ``organism:<checkpoint>``) and resolves them to their directories before calling it.

    Args:
        name: a checkpoint directory or a hub id.
        family: force an adapter family instead of reading the config's model_type.
        **kwargs: passed to the adapter's ``load`` (dtype, device_map, trust_remote_code).

    Raises:
        ModelNotFoundError: no such directory or repository, no loadable config, or no adapter for its type.
    """
    name = str(name)
    if family is not None and family not in ADAPTERS:
        raise ModelNotFoundError(f"unknown model family '{family}' (known: {', '.join(ADAPTERS)})")
    problem = unreachable(name)
    if problem is not None:
        raise ModelNotFoundError(problem)
    if family is not None:
        return ADAPTERS[family].load(name, **kwargs)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=kwargs.get("trust_remote_code", False))
    except (OSError, ValueError) as e:
        from .qwen import _not_found

        raise ModelNotFoundError(_not_found(name, e)) from e
    return adapter_for(config.model_type).load(name, **kwargs)


def unreachable(name: str) -> str | None:
    """Why ``name`` cannot be a model, found without waiting on the network; None if it may be one.

    A name that is no local path fails at once, in one line, when it cannot be a hub id, or when the hub is
    off (HF_HUB_OFFLINE) and it is not in the local cache. Otherwise the hub is asked once, without the retries
    transformers' loader would make (five, about 28 s, when the network is down).
    """
    problem = local_problem(name)
    if problem is not None or Path(name).exists() or cached(name):
        return problem
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        return f"model '{name}': no such directory, and no such repository on the hub; {SUGGEST}"
    except Exception as e:  # the network: any failure to reach the hub is the same to the user
        if "gated" in type(e).__name__.lower():
            return None  # exists; the loader reports what access it needs
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        return f"model '{name}': no such directory, and the hub could not be reached ({reason}); {SUGGEST}"
    return None
