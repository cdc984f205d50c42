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
    errors | jsonvalues | modelnames   exceptions | values as strict JSON | model names checked offline

This module, the public API, belongs to no layer: it resolves the organism's names for :func:`load` and
re-exports the rest; only cli and reproduce import it.
"""

from __future__ import annotations

import importlib
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
    """Refuse a name that cannot be a model in well under a second, before importing the loader (which imports
    torch and transformers: seconds); see :func:`avlens.modelnames.local_problem`."""
    if name == _ORGANISM or name.startswith(f"{_ORGANISM}:"):
        return  # the organism's names resolve to its shipped directories (see load)
    from .modelnames import local_problem

    problem = local_problem(name)
    if problem is not None:
        raise ModelNotFoundError(problem)


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
