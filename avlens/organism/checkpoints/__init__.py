"""The organism checkpoints shipped inside the package (trained by ``avlens organism train``).

Each is a Hugging Face checkpoint directory with MODEL.md (recipe, data, seed, training time, accuracy), and
``dominance_map.md`` beside them is the stage-2 sweep they were chosen from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ModelNotFoundError
from ..data import WORLD
from ..world import WorldConfig

HERE = Path(__file__).parent
SHIPPED = ("vl-base", "av-vision-heavy", "av-balanced")
DEFAULT = "av-vision-heavy"


def checkpoint_path(name: str | None = None) -> Path:
    """The directory of a shipped checkpoint (``None``: the default, av-vision-heavy)."""
    name = name or DEFAULT
    if name not in SHIPPED:
        raise ModelNotFoundError(f"no organism checkpoint '{name}' (shipped: {', '.join(SHIPPED)})")
    path = HERE / name
    if not (path / "model.safetensors").exists():
        raise ModelNotFoundError(f"organism checkpoint '{name}' is missing from {HERE} (reinstall avlens)")
    return path


def shipped_world() -> WorldConfig:
    """The world the shipped checkpoints were trained on (clip length, late sounds...), as recorded in their
    organism.json (``world``); checkpoints that record none were trained on :data:`WORLD` (organism v1).
    Held-out worlds for the shipped checkpoints (``avlens reproduce``'s) are drawn from it."""
    worlds = set()
    for name in SHIPPED:
        card = json.loads((checkpoint_path(name) / "organism.json").read_text())
        worlds.add(WorldConfig(**card["world"]) if "world" in card else WORLD)
    if len(worlds) != 1:
        raise ModelNotFoundError(f"the shipped organism checkpoints in {HERE} were trained on different worlds")
    return worlds.pop()
