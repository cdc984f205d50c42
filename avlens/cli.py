"""The avlens command line. Thin: parse, call the library, print.

Every command documents itself (``avlens COMMAND --help``). Bad input exits with status 2 and one line on
stderr naming the file or sample and the problem.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperArgument, TyperCommand

from .errors import AvlensError, InputError


def _usage_name(self: Any) -> str:
    """An argument on the usage line as click writes it: MODEL when required, [MODEL] when not (typer writes
    a required one as {MODEL}, which reads as a placeholder for a set)."""
    name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
    return name + ("..." if self.nargs != 1 else "")


if hasattr(TyperArgument, "_usage_display_name"):
    TyperArgument._usage_display_name = _usage_name


# rich_markup_mode=None: help is printed as written (Rich markup would swallow "[audio]" and "[labels]").
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help="Mechanistic interpretability of audio-visual LLMs.",
    epilog="Example: avlens inspect organism --video clip.mp4 --prompt 'What do you hear?'",
)
organism_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The bundled model organism: its world, training and sweep.",
    epilog="Example: avlens organism world --out world --n 24",
)
app.add_typer(organism_app, name="organism")
data_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Build datasets: counterfactual clips, dominance splits, multi-clip prompts, and manifests of benchmarks "
    "(AVHBench, VGGSound, AV-Odyssey, AV-SpeakerBench).",
    epilog="Example: avlens data counterfactual world/manifest.jsonl cf --organism-groups",
)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


def fails_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn avlens errors into one line on stderr and exit status 2, and Ctrl-C into one line and status 130."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AvlensError as e:
            err_console.print(f"avlens: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:  # Ctrl-C: say what was saved (a run's message says how to resume)
            err_console.print(_interrupted(e), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command(epilog="Example: avlens models")
def models() -> None:
    """List the bundled organism's checkpoints and the supported model families (with the checkpoints' model
    types each accepts)."""
    from .models import ADAPTERS
    from .organism.checkpoints import DEFAULT, SHIPPED

    table = Table("name / family", "model types", "description")
    shipped = ", ".join(f"organism:{c}" + (" (= organism)" if c == DEFAULT else "") for c in SHIPPED)
    table.add_row("organism", "bundled", f"the model organism shipped with avlens: {shipped}")
    for name, cls in ADAPTERS.items():
        table.add_row(name, ", ".join(cls.model_types), cls.description)
    console.print(table)


@app.command(epilog="Example: avlens inspect organism --video clip.mp4 --prompt 'What do you hear?' --json")
@fails_cleanly
def inspect(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A checkpoint directory, a hub id, or 'organism'.")],
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
    from . import _refuse_before_importing_torch, load

    if video is None and audio is None and image is None:
        raise InputError("give at least one of --video, --audio, --image")
    _check_prompt("--prompt", prompt)
    if not fps > 0:
        raise InputError(f"--fps must be a number of frames per second above 0, got {fps:g}")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    _refuse_before_importing_torch(model)  # a wrong name fails before the seconds torch takes to import
    adapter = load(model, family=family)
    from .models import Sample
    from .trace import generate

    sample = Sample(prompt, video=video, audio=audio, image=image, video_audio=not no_audio, id="input")
    inputs = adapter.prepare([sample], fps=fps)
    if inputs.errors:
        raise inputs.errors[0]
    answer = generate(adapter, inputs, max_new_tokens=max_new_tokens).text[0]
    layout = inputs.layout.describe(0)
    if as_json:
        media = _media_used(inputs, sample, fps)
        record = {"model": model, "length": inputs.length, "layout": layout, "answer": answer, "media": media}
        print_json(record)
        return
    table = Table("group", "tokens", "positions", title=f"{adapter!r}: {inputs.length} tokens")
    for g in layout:
        ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in g["ranges"])
        table.add_row(g["group"], str(g["count"]), ranges)
    console.print(table)
    console.print(f"[bold]answer:[/bold] {answer}", highlight=False)


def _check_prompt(flag: str, prompt: str, example: str | None = None) -> None:
    if not prompt.strip():
        example = example or f"{flag} 'What do you hear?'"
        raise InputError(f"{flag}: the prompt is empty; give the question to ask, e.g. {example}")


def print_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON on stdout: NaN and infinities become null (strict parsers refuse them)."""
    from .jsonvalues import jsonable

    print(json.dumps(jsonable(obj), allow_nan=False))


def _media_used(inputs: Any, sample: Any, fps: float) -> dict[str, Any]:
    """What the model was given: per file its duration, frames, audio seconds and sample rate.

    The adapter reports this per row as ``Inputs.media`` when it can (what it actually decoded and kept);
    otherwise the files' own description (duration, tracks) and the token counts of the layout stand in.
    """
    media = getattr(inputs, "media", None)
    if media:
        return media[0] if isinstance(media, list | tuple) else media
    out: dict[str, Any] = {"fps": fps}
    counts = {g["group"]: g["count"] for g in inputs.layout.describe(0)}
    out["tokens"] = {g: counts[g] for g in ("audio", "video", "image") if g in counts}
    for kind in ("video", "audio", "image"):
        path = getattr(sample, kind, None)
        if path is None or not isinstance(path, str | os.PathLike):
            continue
        entry: dict[str, Any] = {"path": str(path)}
        try:
            from .media.decode import probe

            info = probe(path)
            entry.update({"duration": info.duration, "has_video": info.has_video, "has_audio": info.has_audio})
        except (AvlensError, ImportError, OSError):
            pass
        out[kind] = entry
    return out


@organism_app.command("world", epilog="Example: avlens organism world --out world --n 24 --swapped-share 0")
@fails_cleanly
def organism_world(
    out: Annotated[Path, typer.Option(help="Directory to write clips/ and manifest.jsonl into.")],
    n: Annotated[int, typer.Option(help="Number of clips.")] = 120,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same files.")] = 0,
    swapped_share: Annotated[
        float,
        typer.Option(
            help="Share of clips whose sound is from an unrelated class (default 0: a congruent world; "
            "`avlens data counterfactual` makes the swapped variants)."
        ),
    ] = 0.0,
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


class _Bars:
    """Rich progress bars, one per task name, driven by callbacks (task, done, total[, loss])."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err_console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, task: str, done: int, total: int, loss: float | None = None) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total, info="")
        info = f"loss {loss:.3f}" if loss is not None else ""
        self.progress.update(self.tasks[task], completed=done, total=total, info=info)

    def simple(self, task: str) -> Callable[[int, int], None]:
        return lambda done, total: self(task, done, total)


V2_HELP = (
    "The organism v2: 8 layers, 3 s clips in three 1 s chunks, which-clip and lettered skills (a work in progress,"
    " see docs/organism-v2-status.md)."
)


def _organism_setup(seed: int, v2: bool):
    from .organism.recipes import Setup, setup_v2

    return setup_v2(seed) if v2 else Setup(seed=seed)


@organism_app.command("train", epilog="Example: avlens organism train --recipe av-balanced --out organism-runs")
@fails_cleanly
def organism_train(
    recipe: Annotated[str, typer.Option(help="vl-base, av-vision-heavy or av-balanced.")] = "av-vision-heavy",
    out: Annotated[Path, typer.Option(help="Directory for stages and the checkpoint (re-run to resume).")] = Path(
        "organism-runs"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the world, the initialisation and the data order.")] = 0,
    evaluate: Annotated[bool, typer.Option(help="Evaluate on a held-out world and write MODEL.md.")] = True,
    v2: Annotated[bool, typer.Option("--v2", help=V2_HELP)] = False,
) -> None:
    """Train an organism recipe (stage 0 encoders, stage 1 vision-language base, stage 2 audio-visual).

    Stages already trained under --out are reused; an interrupted stage resumes from its last saved step.
    """
    from .organism.card import write_model_card
    from .organism.recipes import evaluate_checkpoint, train

    setup = _organism_setup(seed, v2)
    with _Bars() as bars:
        directory = train(recipe, out, setup=setup, progress=bars)
        if evaluate:
            df = evaluate_checkpoint(directory, setup=setup, progress=bars.simple("evaluating"))
            write_model_card(directory, df)
    console.print(f"checkpoint: {directory}")


@organism_app.command("sweep", epilog="Example: avlens organism sweep --out organism-sweep")
@fails_cleanly
def organism_sweep(
    out: Annotated[
        Path, typer.Option(help="Directory for the sweep's stages and dominance map (re-run to resume).")
    ] = Path("organism-sweep"),
    seed: Annotated[int, typer.Option(help="Seed of the world and the runs.")] = 0,
    v2: Annotated[bool, typer.Option("--v2", help=V2_HELP)] = False,
) -> None:
    """Train stage 2 over a grid of knobs (trainable parts, unimodal share, swapped share, length) from one
    vision-language base, and write the dominance map: for each recipe, the share of swapped clips whose
    "what do you hear" answer follows the audio, the vision, or neither, with unimodal accuracy beside it."""
    from .organism.card import dominance_table
    from .organism.recipes import sweep

    with _Bars() as bars:
        table = sweep(out, setup=_organism_setup(seed, v2), progress=bars)
    (Path(out) / "dominance_map.md").write_text(dominance_table(table) + "\n")
    console.print(dominance_table(table))


class _RunCommand(TyperCommand):
    """``avlens run``: its help lists the analyses of the registry when it is shown (so analyses registered
    after this module was imported appear too), without importing any analysis module."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from .analyses import names

        listed = ", ".join(names())
        for param in self.params:
            if param.name == "name":
                param.help = f"The analysis: {listed}."
        super().format_help(ctx, formatter)


@app.command(
    "run",
    cls=_RunCommand,
    epilog="Example: avlens run counterfactual --model organism --data cf/manifest.jsonl --out runs/cf "
    "--question hear='What do you hear?'",
)
@fails_cleanly
def run_command(
    name: Annotated[
        str, typer.Argument(metavar="ANALYSIS", help="The analysis (see avlens run --help).", show_default=False)
    ],
    model: Annotated[str, typer.Option(help="A checkpoint directory, a hub id, or organism[:checkpoint].")],
    data: Annotated[Path, typer.Option(help="A manifest (e.g. from `avlens data counterfactual`).")],
    out: Annotated[Path, typer.Option(help="Run directory (re-run to resume; a changed config is refused).")],
    base: Annotated[
        str | None,
        typer.Option(help="The vision-language base model, for analyses that need one (e.g. organism:vl-base)."),
    ] = None,
    question: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KIND=PROMPT",
            help="Override the questions: kind=prompt (repeatable). Kinds: hear and see (scored against the "
            "audio and visual labels), or any KIND with an expect_KIND column in the manifest.",
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="An activation store directory for analyses that keep vectors (probe): filled by this run, or "
            "reused by a later one instead of recomputing."
        ),
    ] = None,
    store_dtype: Annotated[str, typer.Option(help="float32 or float16 (half the size) for a new --store.")] = (
        "float32"
    ),
    executor: ExecutorOption = "local",
    workers: WorkersOption = 2,
    gpus_per_worker: GpusOption = 0.0,
    address: AddressOption = None,
) -> None:
    """Run one analysis on one model over a manifest; records go to OUT/results/*.parquet, figures and
    headline numbers to OUT/summary.json and OUT/report.html. Rows that fail are listed at the end (and kept
    in OUT/results/*.errors.parquet)."""
    from dataclasses import asdict, replace

    from . import _refuse_before_importing_torch, load

    for m in (model, base):
        if m is not None and m != "organism" and not m.startswith("organism:"):
            _refuse_before_importing_torch(m)  # a wrong name fails before the seconds torch takes to import
    from .analyses import get, strict_json
    from .executors import make_executor
    from .reproduce import check_needs, execute

    spec = get(name)
    config = spec.config()
    if question:
        pairs = _questions(question, config, data, name)
        config = replace(
            config, **({"questions": pairs} if hasattr(config, "questions") else {"question": pairs.popitem()[1]})
        )
    check_needs(spec, base=base)
    _check_executor(executor, workers, gpus_per_worker, address)
    if store_dtype not in ("float32", "float16"):
        raise InputError(f"--store-dtype: {store_dtype!r} is not float32 or float16")
    if store is not None and not spec.needs.store:
        raise InputError(f"--store: {name} keeps no vectors (analyses with a store: probe)")
    run_config = {"analysis": name, "model": model, "base": base, "data": str(data), "config": asdict(config)}
    if store is not None:  # where vectors live changes the records (a row index instead of the vector)
        run_config["store"] = {"dtype": store_dtype}
    runner = make_executor(
        executor,
        {"model": model},
        base,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        address=address,
        load=load,
    )
    try:
        meta = {"model_sha256": runner.model_hashes()["model"]}
        with _Bars() as bars:
            result = execute(
                out,
                {"models": {"model": model}, **run_config},
                meta,
                {name: config},
                None,
                data,
                progress=bars,
                log=_say,
                executor=runner,
                store=store,
                store_dtype=store_dtype,
            )
    finally:
        runner.close()
    _failed_rows(out)
    console.print_json(json.dumps(strict_json(result.summary), allow_nan=False))
    _failed_units(result)


def _say(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def _questions(question: list[str], config: Any, data: Path, analysis: str) -> dict[str, str]:
    """``--question kind=prompt`` values as kind -> prompt, refusing a missing ``=``, an empty prompt and a kind
    whose answers the analysis could not score (it would make every metric NaN)."""
    kinds = _question_kinds(config, data)
    allowed = ", ".join(kinds)
    pairs: dict[str, str] = {}
    for q in question:
        kind, sep, prompt = q.partition("=")
        kind = kind.strip()
        if not sep or not kind:
            raise InputError(f"--question takes KIND=PROMPT (kinds for {analysis}: {allowed}), got {q!r}")
        if kind not in kinds:
            raise InputError(f"--question: unknown kind {kind!r} for {analysis} (kinds: {allowed})")
        _check_prompt(f"--question {kind}=", prompt, f"--question {kind}='What do you hear?'")
        pairs[kind] = prompt
    return pairs


def _question_kinds(config: Any, data: Path) -> list[str]:
    """The question kinds an analysis can score: those of its config, hear and see (scored against the audio and
    visual labels), and any KIND the manifest has an ``expect_KIND`` column for."""
    if not hasattr(config, "questions"):
        return ["describe"]
    from .analyses.common import question_kinds
    from .data import read_manifest

    try:
        columns = list(read_manifest(data, required=()).columns)
    except AvlensError:
        columns = []
    return question_kinds(config.questions, columns)


def _failed_rows(out: Path, limit: int = 10) -> None:
    """List the items that failed (the ``*.errors`` tables of the run), at most ``limit``, on stderr."""
    from .analyses.common import row_id
    from .runs import RunDir

    try:
        run = RunDir.load(out)
        tables = [t for t in run.table_names() if t == "errors" or t.endswith(".errors")]
        frames = [run.table(t) for t in tables]
    except (AvlensError, OSError):
        return
    seen: dict[tuple[str, str], None] = {}
    for df in frames:
        for r in df.to_dict("records"):
            row = row_id(str(r.get("id", "?")))
            seen.setdefault((row, str(r.get("reason", ""))), None)
    if not seen:
        return
    files = ", ".join(f"results/{t}.parquet" for t in tables)
    _say(f"{len(seen)} row(s) failed and were left out (all in {out}/{files}):")
    for row, reason in list(seen)[:limit]:
        _say(f"  {reason}" if row in reason else f"  sample {row}: {reason}")
    if len(seen) > limit:
        _say(f"  ... {len(seen) - limit} more")


ExecutorOption = Annotated[
    str,
    typer.Option(help="Where units run: local (this process) or ray (Ray actors; pip install 'avlens[ray]')."),
]
WorkersOption = Annotated[int, typer.Option(help="With --executor ray: workers, each holding the models once.")]
GpusOption = Annotated[float, typer.Option(help="With --executor ray: GPUs per worker (0: CPU only).")]
AddressOption = Annotated[
    str | None,
    typer.Option(help="With --executor ray: an existing cluster (ray://HOST:10001 or auto); default: a local one."),
]


def _failed_units(result: Any) -> None:
    """One line per unit that failed after its retry (kept in OUT/failed/), and exit status 2 if any did."""
    if not result.failed:
        return
    _say(f"{len(result.failed)} unit(s) failed after a retry (details in {result.out}/failed/; re-run to retry):")
    for unit, info in result.failed.items():
        _say(f"  {unit}: {info['reason']}")
    raise typer.Exit(2)


def _check_executor(executor: str, workers: int, gpus_per_worker: float, address: str | None) -> None:
    from .executors import EXECUTORS

    if executor not in EXECUTORS:
        raise InputError(f"--executor: unknown executor {executor!r} (choose {' or '.join(EXECUTORS)})")
    if executor == "local" and (address is not None or gpus_per_worker):
        raise InputError("--address and --gpus-per-worker are options of --executor ray")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")


@app.command(epilog="Example: avlens reproduce --out avlens-reproduce --clips 24")
@fails_cleanly
def reproduce(
    out: Annotated[Path, typer.Option(help="Run directory (re-run to resume; a changed config is refused).")] = Path(
        "avlens-reproduce"
    ),
    model: Annotated[
        list[str] | None,
        typer.Option(metavar="LABEL=MODEL", help="label=model to analyse instead of the organism (repeatable)."),
    ] = None,
    base: Annotated[str | None, typer.Option(help="The vision-language base for token_shift.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="A counterfactual manifest instead of the organism's held-out clips.")
    ] = None,
    clips: Annotated[int, typer.Option(help="Held-out organism clips to build the counterfactual set from.")] = 48,
    seed: Annotated[int, typer.Option(help="Seed of the held-out clips.")] = 0,
    executor: ExecutorOption = "local",
    workers: WorkersOption = 2,
    gpus_per_worker: GpusOption = 0.0,
    address: AddressOption = None,
) -> None:
    """Reproduce "Do audio-visual LLMs really see and hear?" (P1): counterfactual evaluation, probes, logit lens,
    knockout sweeps, token shift and attention share, by default on the organism's vision-heavy and balanced
    checkpoints side by side. Writes OUT/report.html, OUT/results/*.parquet, OUT/summary.json, OUT/run.json."""
    from .reproduce import ORGANISM_BASE
    from .reproduce import reproduce as run_reproduce

    for m in model or []:
        if "=" not in m or not m.split("=", 1)[0].strip() or not m.split("=", 1)[1].strip():
            raise InputError(f"--model takes LABEL=MODEL (e.g. --model mine=organism:av-balanced), got {m!r}")
    models = dict(m.split("=", 1) for m in model) if model else None
    _check_executor(executor, workers, gpus_per_worker, address)
    with _Bars() as bars:
        result = run_reproduce(
            out,
            models=models,
            base=base or (ORGANISM_BASE if models is None else None),
            data=data,
            n_clips=clips,
            seed=seed,
            progress=bars,
            log=_say,
            executor=executor,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            address=address,
        )
    _failed_rows(result.out)
    console.print(f"report: {result.report}")
    _failed_units(result)


def _problems(report: Any, limit: int = 10) -> None:
    for p in report.problems[:limit]:
        where = f"{p['file']}: " if p.get("file") else ""
        err_console.print(f"skipped {p['id']}: {where}{p['reason']}", markup=False, highlight=False)
    if len(report.problems) > limit:
        err_console.print(f"... {len(report.problems) - limit} more", markup=False, highlight=False)
    console.print(f"wrote {report.written} rows ({len(report.problems)} skipped): {report.manifest}")


def _groups(groups: Path | None, organism_groups: bool) -> dict | None:
    if organism_groups:
        from .organism.world import LABEL_GROUPS

        return {k: list(v) for k, v in LABEL_GROUPS.items()}
    return json.loads(groups.read_text()) if groups is not None else None


@data_app.command(
    "counterfactual", epilog="Example: avlens data counterfactual world/manifest.jsonl cf --organism-groups"
)
@fails_cleanly
def data_counterfactual(
    manifest: Annotated[
        Path,
        typer.Argument(metavar="MANIFEST", help="CSV/JSONL/Parquet with video, [audio], audio_label, visual_label."),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (clips/ and manifest.jsonl).")],
    groups: Annotated[
        Path | None, typer.Option(help='JSON {"group": [labels]}: labels of different groups are unrelated.')
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="JSON [[label, label], ...]: the pairs that count as unrelated.")
    ] = None,
    organism_groups: Annotated[bool, typer.Option(help="Use the organism world's label groups.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the swap partners.")] = 0,
) -> None:
    """Build counterfactual variants of every clip: factual, swapped audio (from an unrelated label), muted,
    blank video, audio only, video only; with the expected answers per question. Bad rows are reported."""
    from .data import counterfactual

    if groups is None and pairs is None and not organism_groups:
        raise InputError(
            "give --groups, --pairs or --organism-groups: they tell which audio labels are unrelated, for the "
            "swapped condition"
        )
    pair_list = [tuple(p) for p in json.loads(pairs.read_text())] if pairs is not None else None
    with _Bars() as bars:
        report = counterfactual(
            manifest,
            out,
            groups=_groups(groups, organism_groups),
            pairs=pair_list,
            seed=seed,
            progress=bars.simple("building clips"),
        )
    _problems(report)


@data_app.command(
    "dominance",
    epilog="Example: avlens data dominance organism world/manifest.jsonl dom --question 'What is it?' "
    "--labels bell,drum,bird",
)
@fails_cleanly
def data_dominance(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A checkpoint directory, a hub id, or 'organism'.")],
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Manifest of clips (video, [audio], labels).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory.")],
    question: Annotated[str, typer.Option(help="The question asked of every variant.")],
    labels: Annotated[str, typer.Option(help="Comma-separated labels the answers are matched against.")],
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 8,
) -> None:
    """Split clips into audio-dominant and video-dominant sets by the model's answers on the joint clip, its
    audio alone (frames zeroed) and its video alone (waveform zeroed), as in P2."""
    from . import load
    from .analyses.dominance import dominance

    _check_prompt("--question", question)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    adapter = load(model)
    with _Bars() as bars:
        report = dominance(
            adapter,
            manifest,
            out,
            question=question,
            labels=[x.strip() for x in labels.split(",")],
            batch_size=batch_size,
            progress=bars.simple("answering"),
        )
    _problems(report)
    console.print(report.counts)


@data_app.command("multiclip", epilog="Example: avlens data multiclip world/manifest.jsonl multi --n-clips 2")
@fails_cleanly
def data_multiclip(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Manifest of clips.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (manifest.jsonl).")],
    n_clips: Annotated[int, typer.Option(help="Clips per prompt.")] = 2,
    n_prompts: Annotated[int | None, typer.Option(help="Number of prompts (default: one per clip).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    question_template: Annotated[
        str, typer.Option(help="The question; {label} is the target sound, {a} its article (a/an).")
    ] = "Which clip has the sound of {a} {label}?",
) -> None:
    """Build prompts holding several clips with distinct sounds, each asking which clip has a given sound."""
    from .data import multiclip

    report = multiclip(
        manifest, out, n_clips=n_clips, n_prompts=n_prompts, seed=seed, question_template=question_template
    )
    _problems(report)


@data_app.command("avhbench", epilog="Example: avlens data avhbench AVHBench_v0 avh")
@fails_cleanly
def data_avhbench(
    root: Annotated[Path, typer.Argument(metavar="ROOT", help="AVHBench's folder (json/ and video/).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (manifest.jsonl).")],
) -> None:
    """Turn AVHBench's QA files into a manifest: one row per question, its prompt in `question` and its answer in
    `expect_question` (ask them with --question "question={question}")."""
    from .data.formats import avhbench

    with _Bars() as bars:
        report = avhbench(root, out, progress=bars.simple("QA files"))
    _problems(report)


@data_app.command(
    "av-odyssey",
    epilog="Example: avlens data av-odyssey AV_Odyssey_Bench odyssey  (then: avlens run NAME --data "
    'odyssey/manifest.jsonl --question "question={question}" ...)',
)
@fails_cleanly
def data_av_odyssey(
    root: Annotated[
        Path,
        typer.Argument(
            metavar="ROOT",
            help="AV-Odyssey's folder (its *.parquet / *.jsonl / *.json item files; media paths relative to it), "
            "or one item file.",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (manifest.jsonl, media/).")],
) -> None:
    """Turn AV-Odyssey Bench's items into a manifest: one row per item, its images, videos and sounds as
    `clips` (in the order the question names them, each tag replaced by "Clip k"), its lettered prompt in
    `question` and the right letter in `expect_question`. Unusable items are listed."""
    from .data.formats import av_odyssey

    with _Bars() as bars:
        report = av_odyssey(root, out, progress=bars.simple("items"))
    _problems(report)


@data_app.command(
    "av-speakerbench",
    epilog="Example: avlens data av-speakerbench AV-SpeakerBench speakers  (then: avlens run NAME --data "
    'speakers/manifest.jsonl --question "question={question}" ...)',
)
@fails_cleanly
def data_av_speakerbench(
    root: Annotated[
        Path,
        typer.Argument(
            metavar="ROOT",
            help="AV-SpeakerBench's folder (its *.parquet / *.csv / *.jsonl / *.json table; clip paths relative "
            "to it), or the table file.",
        ),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (manifest.jsonl).")],
) -> None:
    """Turn AV-SpeakerBench's items into a manifest: one row per question over its clip with sound, its lettered
    prompt in `question` and the right letter in `expect_question`. Unusable items are listed."""
    from .data.formats import av_speakerbench

    with _Bars() as bars:
        report = av_speakerbench(root, out, progress=bars.simple("items"))
    _problems(report)


@data_app.command("vggsound", epilog="Example: avlens data vggsound vggsound.csv clips/ vgg --options 20 --split test")
@fails_cleanly
def data_vggsound(
    csv: Annotated[Path, typer.Argument(metavar="CSV", help="VGGSound's label CSV (youtube_id,start,label,split).")],
    videos: Annotated[Path, typer.Argument(metavar="VIDEOS", help="Folder of <youtube_id>_<start:06d>.mp4 clips.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (manifest.jsonl).")],
    options: Annotated[int, typer.Option(help="Lettered options per clip (P2: 20).")] = 20,
    split: Annotated[str, typer.Option(help="Rows of this split ('all' for every row).")] = "test",
    seed: Annotated[int, typer.Option(help="Seed of the distractors and their order.")] = 0,
) -> None:
    """Turn VGGSound's label CSV into P2's lettered multiple choice: each clip's prompt lists its class among
    distractors as (A) ... (T) and expects the letter."""
    from .data.formats import vggsound

    with _Bars() as bars:
        report = vggsound(
            csv,
            videos,
            out,
            n_options=options,
            split=None if split == "all" else split,
            seed=seed,
            progress=bars.simple("clips"),
        )
    _problems(report)


def _interrupted(e: BaseException) -> str:
    detail = str(e) if isinstance(e, KeyboardInterrupt) else ""
    return f"avlens: interrupted; {detail}" if detail else "avlens: interrupted"


_WARNED: set[str] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr ("avlens: warning: ..."), without the source path and line of code; a
    warning that only repeats another one for a different sample is not shown again."""
    text = " ".join(str(message).split())
    key = re.sub(r"^sample [^:]*: ", "", text)
    if key in _WARNED:
        return
    _WARNED.add(key)
    err_console.print(f"avlens: warning: {text}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``avlens`` command."""
    # transformers and the hub read these when they are imported (by a command, not by --help): avlens reports
    # its own progress and problems.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _one_line_warning
    try:
        code = app(prog_name="avlens", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort) as e:  # outside a command (typer turns one inside into status 130)
        err_console.print(_interrupted(e), markup=False, highlight=False)
        sys.exit(130)
    except typer.TyperException as e:  # a bad option or argument: one line, naming it, and where help is
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "avlens"
        if type(e).__name__ == "NoArgsIsHelpError":  # a group without its command: its help, as click prints it
            print(e.format_message())
            sys.exit(2)
        err_console.print(
            f"{command}: {e.format_message()} (see {command} --help)", markup=False, highlight=False, soft_wrap=True
        )
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
