"""The intervention engine: forwards and generation with interventions given as data."""

from .engine import Trace, generate, run, run_conditions, start_of
from .interventions import Capture, Discard, Intervention, Knockout, Patch, Steer

__all__ = [
    "Capture",
    "Discard",
    "Intervention",
    "Knockout",
    "Patch",
    "Steer",
    "Trace",
    "generate",
    "run",
    "run_conditions",
    "start_of",
]
