"""avlens: mechanistic interpretability of audio-visual LLMs.

import avlens
model = avlens.load("organism")                        # or a Qwen2.5-Omni / Qwen3-Omni / Qwen2.5-VL checkpoint
batch = model.prepare([avlens.Sample("What do you hear?", video="clip.mp4")])
print(batch.layout.describe(0))                          # audio, video, question, last, chunks...
ko = avlens.Knockout("last", "video", layers=range(2, 4))
out = avlens.run_conditions(model, batch, {"base": [], "no-video": [ko]})
answer = avlens.generate(model, batch, [ko]).text

The package is in one-way layers: each imports only from the layers below it (checked by ``lint-imports``
against the contracts in pyproject.toml, run by scripts/test.sh):

    cli                       the command line
    reproduce                 run directories and the studies' orchestration
    report                    the HTML report, reading the analyses' results
    analyses                  one module per method
    data | organism           builders and manifests | the bundled model (independent of each other)
    trace                     the engine
    models                    adapters, one per model family
    media | layout | runs     decoding and processors | token groups | the run directory
    errors | jsonvalues       the exceptions everything raises | values as strict JSON (NaN as null)

This module, the public API, belongs to no layer: it resolves the organism's names for :func:`load` and
re-exports the rest; only cli and reproduce import it.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .errors import AvlensError, InputError, MediaError, ModelNotFoundError, UnknownGroupError

if TYPE_CHECKING:
    from pathlib import Path

    from .layout import TokenLayout
    from .models import Adapter, Clip, Inputs, Sample
    from .trace import Ablate, Capture, Discard, Knockout, Patch, Steer, Trace, generate, run, run_conditions

# The engine's names are imported on first use (PEP 562), so that ``import avlens.cli`` (every ``avlens
# --help``) does not import torch and transformers; ``from avlens import Knockout`` works as before.
_LAZY = {
    "TokenLayout": "layout",
    **dict.fromkeys(("Adapter", "Clip", "Inputs", "Sample"), "models"),
    **dict.fromkeys(
        ("Ablate", "Capture", "Discard", "Knockout", "Patch", "Steer", "Trace", "generate", "run", "run_conditions"),
        "trace",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'avlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

_ORGANISM = "organism"  # the bundled organism's name: "organism" (its default checkpoint) or "organism:<checkpoint>"


def load(name: str | Path, *, family: str | None = None, **kwargs: Any) -> Adapter:
    """Load a model: the bundled organism by name, or any supported checkpoint by local path or hub id.

    Args:
        name: ``organism`` / ``organism:<checkpoint>`` (vl-base, av-vision-heavy, av-balanced), a checkpoint
            directory, or a hub id.
        family: force an adapter family instead of reading the config's model_type.
        **kwargs: passed to the adapter's ``load`` (dtype, device_map, trust_remote_code).

    Raises:
        ModelNotFoundError: no such organism checkpoint, directory or repository, or no adapter for it.
    """
    # Organism names are resolved here, above both the organism and the model loader, so that the adapters
    # never import the organism (which is built from them).
    text = str(name)
    if text == _ORGANISM or text.startswith(f"{_ORGANISM}:"):
        from .organism.checkpoints import checkpoint_path

        name = checkpoint_path(text.partition(":")[2] or None)
    else:
        _refuse_before_importing_torch(text)
    from .models import load as load_checkpoint

    return load_checkpoint(name, family=family, **kwargs)


def _refuse_before_importing_torch(name: str) -> None:
    """Refuse a name that cannot be a model in well under a second: the network-free checks of
    :func:`avlens.models.registry.unreachable` (which the loader then makes in full), made here because
    importing the loader imports torch and transformers (seconds)."""
    from pathlib import Path

    if name == _ORGANISM or name.startswith(f"{_ORGANISM}:") or Path(name).exists():
        return  # the organism's names resolve to its shipped directories (see load)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    suggest = "see `avlens models`, or use `organism` (the bundled model)"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(f"model '{name}': no such directory, and not a hub id; {suggest}") from None
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE)
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelNotFoundError(
            f"model '{name}': no such directory, and not in the local hub cache (HF_HUB_OFFLINE is set); {suggest}"
        )


_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

__all__ = [
    "Ablate",
    "Adapter",
    "AvlensError",
    "Capture",
    "Clip",
    "Discard",
    "InputError",
    "Inputs",
    "Knockout",
    "MediaError",
    "ModelNotFoundError",
    "Patch",
    "Sample",
    "Steer",
    "TokenLayout",
    "Trace",
    "UnknownGroupError",
    "generate",
    "load",
    "run",
    "run_conditions",
]
