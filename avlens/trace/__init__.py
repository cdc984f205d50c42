"""The intervention engine: forwards and generation with interventions given as data (see engine.py)."""

from .engine import Trace, generate, run, run_conditions, start_of
from .interventions import (
    Ablate,
    AttentionCapture,
    Capture,
    Discard,
    Intervention,
    Knockout,
    Patch,
    ReceivedCapture,
    ResidualCapture,
    Steer,
)
from .ops import SITES

__all__ = [
    "SITES",
    "Ablate",
    "AttentionCapture",
    "Capture",
    "Discard",
    "Intervention",
    "Knockout",
    "Patch",
    "ReceivedCapture",
    "ResidualCapture",
    "Steer",
    "Trace",
    "generate",
    "run",
    "run_conditions",
    "start_of",
]
