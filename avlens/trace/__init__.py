"""The intervention engine: forwards and generation with interventions given as data (see engine.py)."""

from .engine import (
    Schedule,
    Trace,
    generate,
    generate_guided,
    run,
    run_conditions,
    start_of,
    unchanged_inputs,
    unchanged_prefix,
)
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
    "Schedule",
    "Steer",
    "Trace",
    "generate",
    "generate_guided",
    "run",
    "run_conditions",
    "start_of",
    "unchanged_inputs",
    "unchanged_prefix",
]
