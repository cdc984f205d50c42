"""The avlens command line. Thin: parse, call the library, print.

Every command documents itself (``avlens COMMAND --help``). Bad input exits with status 2 and one line on
stderr naming the file or sample and the problem.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import AvlensError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Mechanistic interpretability of audio-visual LLMs.")
organism_app = typer.Typer(no_args_is_help=True, help="The bundled model organism: its world, training and sweep.")
app.add_typer(organism_app, name="organism")

console = Console()
err_console = Console(stderr=True)


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn avlens errors into one line on stderr and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AvlensError as e:
            err_console.print(f"avlens: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
def models() -> None:
    """List the supported model families and the checkpoints' model types each accepts."""
    from .models import ADAPTERS

    table = Table("family", "model types", "description")
    for name, cls in ADAPTERS.items():
        table.add_row(name, ", ".join(cls.model_types), cls.description)
    console.print(table)


@app.command()
@fails_cleanly
def inspect(
    model: Annotated[str, typer.Argument(help="A checkpoint directory, a hub id, or 'organism'.")],
    prompt: Annotated[str, typer.Option(help="The user's question.")],
    video: Annotated[Path | None, typer.Option(help="A video file (mp4, mkv, webm, avi, mov).")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio file (wav, flac, ogg, mp3, m4a).")] = None,
    image: Annotated[Path | None, typer.Option(help="An image file.")] = None,
    no_audio: Annotated[bool, typer.Option("--no-audio", help="Ignore the video's own audio track.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with layout and answer.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated.")] = 32,
    fps: Annotated[float, typer.Option(help="Video frames sampled per second.")] = 2.0,
    family: Annotated[str | None, typer.Option(help="Force a model family (see `avlens models`).")] = None,
) -> None:
    """Show the token layout of a prompt (each group, its count and positions) and the model's answer.

    A video's own audio track is used unless --no-audio or a separate --audio is given; an audio file alone
    works too.
    """
    from . import load
    from .models import Sample
    from .trace import generate

    if video is None and audio is None and image is None:
        raise typer.BadParameter("give at least one of --video, --audio, --image")
    adapter = load(model, family=family)
    sample = Sample(prompt, video=video, audio=audio, image=image, video_audio=not no_audio, id="input")
    inputs = adapter.prepare([sample], fps=fps)
    answer = generate(adapter, inputs, max_new_tokens=max_new_tokens).text[0]
    layout = inputs.layout.describe(0)
    if as_json:
        print(json.dumps({"model": model, "length": inputs.length, "layout": layout, "answer": answer}))
        return
    table = Table("group", "tokens", "positions", title=f"{adapter!r}: {inputs.length} tokens")
    for g in layout:
        ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in g["ranges"])
        table.add_row(g["group"], str(g["count"]), ranges)
    console.print(table)
    console.print(f"[bold]answer:[/bold] {answer}", highlight=False)


@organism_app.command("world")
@fails_cleanly
def organism_world(
    out: Annotated[Path, typer.Option(help="Directory to write clips/ and manifest.jsonl into.")],
    n: Annotated[int, typer.Option(help="Number of clips.")] = 120,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files.")] = 0,
    swapped_share: Annotated[float, typer.Option(help="Share of clips whose sound is from an unrelated class.")] = 0.5,
) -> None:
    """Write clips of the synthetic audio-visual world (mp4 with H.264+AAC, and wav) and a manifest with
    columns video, audio, audio_label, visual_label, condition."""
    from rich.progress import Progress

    from .organism.world import write_world

    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("writing clips", total=n)
        manifest = write_world(
            out, n, seed, swapped_share=swapped_share, progress=lambda i: progress.update(task, completed=i)
        )
    console.print(f"wrote {n} clips; manifest: {manifest}")


def main() -> None:
    """Entry point of the ``avlens`` command."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # avlens reports its own progress and problems
    hf_logging.disable_progress_bar()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("avlens: interrupted")
        sys.exit(130)
