"""How long the command line takes to start. Prints one JSON object.

Each figure is the median wall time, in seconds, of a fresh ``python -m avlens ...`` process (what a user's
shell pays per call), over ``--repeats`` runs:

- help: ``avlens --help`` (goal: under 1 s; importing avlens.cli must not import torch or transformers);
- run_help, inspect_help: ``avlens run --help`` (lists the registry's analyses) and ``avlens inspect --help``;
- inspect_organism: ``avlens inspect organism --video clip.mp4 --prompt "What do you hear?"`` on a 2 s clip of
  the organism's world (goal: under 4 s; this one loads torch, the model and decodes the clip);
- cli_imports_torch: whether ``import avlens.cli`` imported torch (must be false).

Usage: python benchmarks/cli_startup.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(args: list[str], repeats: int) -> float:
    """Median wall time of ``python -m avlens *args`` (which must succeed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "avlens", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    probe = "import sys, avlens.cli; print('torch' in sys.modules)"
    imports_torch = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        from avlens.organism.world import write_world

        manifest = write_world(Path(tmp) / "world", 1, 0)
        clip = json.loads(Path(manifest).read_text().splitlines()[0])["video"]
        clip = str((Path(manifest).parent / clip).resolve())
        result = {
            "help": wall(["--help"], repeats),
            "run_help": wall(["run", "--help"], repeats),
            "inspect_help": wall(["inspect", "--help"], repeats),
            "inspect_organism": wall(
                ["inspect", "organism", "--video", clip, "--prompt", "What do you hear?"], max(1, repeats // 2)
            ),
            "cli_imports_torch": imports_torch.stdout.strip() == "True",
            "repeats": repeats,
            "cpus": os.cpu_count(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
