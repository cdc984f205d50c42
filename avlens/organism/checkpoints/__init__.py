"""The organism checkpoints shipped inside the package (trained by ``avlens organism train``).

Each is a Hugging Face checkpoint directory with MODEL.md (recipe, data, seed, training time, accuracy), and
``dominance_map.md`` beside them is the stage-2 sweep they were chosen from.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ModelNotFoundError

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
