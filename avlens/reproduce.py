"""Running analyses into a run directory, and ``reproduce``: P1, P2 and P3 on the organism, with its HTML report.

One orchestration, :func:`execute`, serves ``reproduce`` and ``avlens run``: it opens the run directory, runs
each analysis of the registry (:mod:`avlens.analyses`) on every model, unit by unit, and writes summary.json
(strict JSON) and report.html. Work is split into units (an analysis x model x batch of items); each unit's
records are written atomically when it finishes, so a killed run resumes where it stopped (see
:mod:`avlens.runs`). What an analysis needs (a base model...) is checked from its spec before any work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .analyses import Analysis, get, specs, strict_json
from .analyses.common import Item, items_from_manifest
from .data.manifest import manifest_content
from .errors import InputError
from .models.base import Adapter
from .runs import RunDir

Progress = Callable[[str, int, int], None]

ORGANISM_MODELS = {"vision-heavy": "organism:av-vision-heavy", "balanced": "organism:av-balanced"}
ORGANISM_BASE = "organism:vl-base"
PAPERS = ("P1", "P2", "P3")
"""The studies ``reproduce`` runs by default (every registry analysis of each)."""


def default_configs() -> dict[str, Any]:
    """The analyses of ``reproduce`` (the registry's analyses of :data:`PAPERS`) and their settings for the
    organism."""
    return {spec.name: spec.config() for paper in PAPERS for spec in specs(paper=paper)}


def check_needs(spec: Analysis, *, base: object | None) -> None:
    """Refuse an analysis whose declared needs are not met (one line, naming what is missing)."""
    if spec.needs.base and base is None:
        raise InputError(
            f"{spec.name} needs a base model: give --base, the vision-language model the audio-visual model was "
            f"built from (for the organism: --base {ORGANISM_BASE})"
        )


def model_hash(adapter: Adapter) -> str:
    """sha256 of the checkpoint's weights file (or of the in-memory state, for a model built in code)."""
    path = Path(adapter.source) / "model.safetensors" if adapter.source else None
    h = hashlib.sha256()
    if path is not None and path.exists():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for k, v in sorted(adapter.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def plan_units(name: str, config: Any, manifest: Path, labels: Sequence[str]) -> dict[str, dict[str, list[Item]]]:
    """The units of one analysis: model label -> unit name -> its items.

    Items are taken in the order of their rows' ids (not the manifest's order), so that a manifest whose rows
    were reordered resumes into the same units. A unit is one batch of the analysis (its ``batch_size``, at
    most 48 items), so that progress advances per batch and an interrupted run loses at most one batch.
    """
    questions = getattr(config, "questions", None) or {"describe": config.question}
    conditions = getattr(config, "conditions", None)
    reader = getattr(config, "items", None)  # a config that reads its own items (flow: multi-clip prompts too)
    items = reader(manifest) if callable(reader) else items_from_manifest(manifest, questions, conditions=conditions)
    items = sorted(items, key=lambda it: it.clip)  # stable: a row's questions keep their order
    size = max(1, min(int(getattr(config, "batch_size", 8) or 8), 48))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return {label: {f"{name}/{label}/{size}-{j:04d}": c for j, c in enumerate(chunks)} for label in labels}


def run_analysis(
    run: RunDir,
    name: str,
    config: Any,
    models: Mapping[str, Adapter],
    manifest: Path,
    *,
    base: Adapter | None = None,
    progress: Progress | None = None,
    units: dict[str, dict[str, list[Item]]] | None = None,
) -> dict[str, dict[str, pd.DataFrame]]:
    """Run one analysis on every model, unit by unit (finished units are skipped); returns model -> tables.

    ``progress(task, items done, items)`` is called before the first unit and after every unit.
    """
    spec = get(name)
    check_needs(spec, base=base)
    units = units if units is not None else plan_units(name, config, manifest, list(models))
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for label, adapter in models.items():
        task = f"{name} · {label}"
        total = sum(len(u) for u in units[label].values())
        done = 0
        if progress is not None:
            progress(task, done, total)
        for unit, unit_items in units[label].items():
            if not run.done(unit):
                run.write_many(unit, _collect(spec, adapter, unit_items, config, base, label))
            done += len(unit_items)
            if progress is not None:
                progress(task, done, total)
        tables = {t: _rows_of(run.table(f"{name}.{t}"), name, label) for t in _tables_of(run, name)}
        if spec.finalize is not None:
            tables.update(spec.finalize(tables, config))
        out[label] = tables
    return out


def _collect(
    spec: Analysis, adapter: Adapter, items: list[Item], config: Any, base: Adapter | None, label: str
) -> dict[str, list[dict]]:
    """One unit's records, each tagged with the model's label, in tables named ``<analysis>.<table>``."""
    extra = {"base": base} if spec.needs.base else {}
    tables = spec.collect(adapter, items, config, **extra)
    return {f"{spec.name}.{t}": [{"model": label, **r} for r in rows] for t, rows in tables.items()}


def _tables_of(run: RunDir, name: str) -> list[str]:
    return [t.split(".", 1)[1] for t in run.table_names() if t.startswith(f"{name}.")]


def _rows_of(df: pd.DataFrame, name: str, model: str) -> pd.DataFrame:
    """The rows of one model (units carry it in their name; records carry the model column)."""
    return df[df["model"] == model].drop(columns="model") if "model" in df else df


@dataclass
class ReproduceResult:
    """What a run wrote: its directory, analysis -> model -> Summary, and the report's path."""

    out: Path
    summary: dict[str, dict[str, Any]]
    report: Path


def execute(
    out: Path,
    run_config: dict,
    meta: dict,
    configs: Mapping[str, Any],
    models: Mapping[str, Adapter],
    data: Path | Callable[[], Path],
    *,
    base: Adapter | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> ReproduceResult:
    """Run analyses into the run directory ``out`` and write its summary.json and report.html.

    Args:
        run_config: the run's config (recorded in run.json; a different one into the same ``out`` is refused);
            its ``models`` maps each label to the model's name, for the report.
        meta: provenance recorded beside it (model hashes...).
        configs: analysis name -> its Config, run in this order.
        models: label -> loaded model.
        data: the manifest, or a function building it (called once the run directory is open).
        base: the base model, for analyses that need one.
        progress: ``progress(task, items done, items)``, per analysis and model.
        log: called with one-line messages for the user (what a resume skips).

    Raises:
        KeyboardInterrupt: on Ctrl-C, with a message saying how many units were saved and how to resume.
    """
    for name in configs:
        check_needs(get(name), base=base)
    content = None
    if not callable(data):
        # The run's identity is what the manifest holds, not the path it was typed as (see RunDir.bind_data).
        content = manifest_content(data)
        run_config = {**run_config, "data": {"manifest_sha256": content["sha256"]}}
    say = log or (lambda message: None)
    with RunDir.open(out, run_config, meta=meta, data=content) as run:
        manifest = Path(data) if not callable(data) else data()
        if content is None:
            run.bind_data(manifest_content(manifest))
        plans = {name: plan_units(name, config, manifest, list(models)) for name, config in configs.items()}
        names = [u for plan in plans.values() for per in plan.values() for u in per]
        if any(run.done(u) for u in names):
            say(f"resuming: {sum(map(run.done, names))} of {len(names)} units already done, skipped")
        try:
            results = {
                name: run_analysis(run, name, config, models, manifest, base=base, progress=progress, units=plans[name])
                for name, config in configs.items()
            }
        except KeyboardInterrupt:
            saved = sum(map(run.done, names))
            raise KeyboardInterrupt(
                f"saved {saved} of {len(names)} units in {out}; re-run the same command to resume"
            ) from None
        summary = {name: {label: get(name).summarize(t) for label, t in per.items()} for name, per in results.items()}
        from .report.build import build_report, headlines

        run.write_json("summary", strict_json({"headline": headlines(summary), "details": summary}))
        report = build_report(Path(out) / "report.html", results, summary, run_config, meta)
        run.consolidate()
        _write_finalized(run, results)
    return ReproduceResult(Path(out), summary, report)


def _write_finalized(run: RunDir, results: Mapping[str, Mapping[str, dict[str, pd.DataFrame]]]) -> None:
    """The tables an analysis's ``finalize`` adds (probe.probes, token_shift.positions...) as results/ files
    beside the recorded ones, every model's rows in one file with a ``model`` column. Recorded tables keep
    what ``collect`` wrote, whatever ``finalize`` added to their in-memory copies."""
    recorded = set(run.table_names())
    for name, per_model in results.items():
        tables = {t for tables in per_model.values() for t in tables if f"{name}.{t}" not in recorded}
        for t in sorted(tables):
            parts = [df.assign(model=label) for label, ts in per_model.items() if (df := ts.get(t)) is not None]
            run.write_result(f"{name}.{t}", pd.concat(parts, ignore_index=True))


def reproduce(
    out: Path,
    *,
    models: Mapping[str, str] | None = None,
    base: str | None = ORGANISM_BASE,
    data: Path | None = None,
    analyses: Sequence[str] | None = None,
    n_clips: int = 48,
    seed: int = 0,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> ReproduceResult:
    """Run P1's and P2's analyses on the models (default: the organism's vision-heavy and balanced checkpoints, side by
    side) and write ``out``: run.json, results/*.parquet, summary.json, report.html.

    Args:
        models: label -> model (path, hub id or organism:<checkpoint>).
        base: the vision-language base for analyses that need one (token_shift; None: those are skipped).
        data: a counterfactual manifest (``avlens data counterfactual``); default: built from a held-out world
            of the organism (``n_clips`` clips, ``seed``) under ``out/data``.
        analyses: names in the registry (default: every analysis of P1, P2 and P3), each with its spec's default config.
    """
    from . import load

    models = dict(models or ORGANISM_MODELS)
    names = list(analyses or default_configs())
    if base is None:
        names = [n for n in names if not get(n).needs.base]
    configs = {n: get(n).config() for n in names}
    if data is None and "mitigate" in configs:  # the organism's world: every label it can name
        from .organism.world import CLASSES

        configs["mitigate"] = replace(configs["mitigate"], labels=tuple(CLASSES))
    if data is None and "flow" in configs:  # P3's parallel paths: prompts of two of the world's clips
        configs["flow"] = replace(configs["flow"], multiclip_prompts=48)
    config = {
        "models": models,
        "base": base,
        "data": str(data) if data else {"organism_world": {"clips": n_clips, "seed": seed}},
        "analyses": {n: asdict(c) for n, c in configs.items()},
        "seed": seed,
    }
    adapters = {label: load(m) for label, m in models.items()}
    base_adapter = load(base) if base else None
    meta = {"model_sha256": {label: model_hash(a) for label, a in adapters.items()}}
    if base_adapter is not None:
        meta["base_sha256"] = model_hash(base_adapter)
    manifest = Path(data) if data else lambda: _organism_data(Path(out) / "data", n_clips, seed, progress)
    return execute(out, config, meta, configs, adapters, manifest, base=base_adapter, progress=progress, log=log)


def _organism_data(root: Path, n_clips: int, seed: int, progress: Progress | None) -> Path:
    """A held-out organism world and its counterfactual variants (written once; deterministic)."""
    from .data import counterfactual
    from .organism.data import WORLD
    from .organism.world import LABEL_GROUPS, write_world

    world, cf = root / "world", root / "counterfactual"
    if not (cf / "manifest.jsonl").exists():
        say = (lambda t: lambda d, n: progress(t, d, n)) if progress else (lambda t: None)
        write_world(
            world,
            n_clips,
            7000 + seed,
            cfg=WORLD,
            swapped_share=0.0,
            progress=(lambda i: say("world")(i, n_clips)) if progress else None,
        )
        counterfactual(
            world / "manifest.jsonl",
            cf,
            groups={k: list(v) for k, v in LABEL_GROUPS.items()},
            seed=seed,
            progress=say("counterfactual clips"),
        )
    return cf / "manifest.jsonl"
