"""avlens: mechanistic interpretability of audio-visual LLMs.

import avlens
model = avlens.load("organism")                        # or a Qwen2.5-Omni / Qwen3-Omni / Qwen2.5-VL checkpoint
batch = model.prepare([avlens.Sample("What do you hear?", video="clip.mp4")])
print(batch.layout.describe(0))                          # audio, video, question, last, chunks...
ko = avlens.Knockout("last", "video", layers=range(2, 4))
out = avlens.run_conditions(model, batch, {"base": [], "no-video": [ko]})
answer = avlens.generate(model, batch, [ko]).text
"""

from .errors import AvlensError, InputError, MediaError, ModelNotFoundError, UnknownGroupError
from .layout import TokenLayout
from .models import Adapter, Clip, Inputs, Sample, load
from .trace import Capture, Discard, Knockout, Patch, Steer, Trace, generate, run, run_conditions

__version__ = "0.1.0"

__all__ = [
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
