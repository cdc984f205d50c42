"""Running analyses into a run directory, and ``reproduce``: P1, P2 and P3 on the organism, with its HTML report.

One orchestration, :func:`execute`, serves ``reproduce`` and ``avlens run``: it opens the run directory, runs
each analysis of the registry (:mod:`avlens.analyses`) on every model, unit by unit, and writes summary.json
(strict JSON) and report.html. Work is split into units (an analysis x model x batch of items), computed by an
executor (this process, or Ray workers: :mod:`avlens.executors`); each unit's records are written here, atomically,
when it finishes, so a killed run resumes where it stopped, with either executor (see :mod:`avlens.runs`). A unit
that fails twice is recorded in ``failed/`` and the run goes on. What an analysis needs (a base model...) is
checked from its spec before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .analyses import Analysis, get, specs, strict_json
from .analyses.common import Item, items_from_manifest
from .data.manifest import manifest_content
from .errors import InputError
from .executors import Executor, LocalExecutor, Unit, make_executor
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


def check_needs(spec: Analysis, *, base: object) -> None:
    """Refuse an analysis whose declared needs are not met (one line, naming what is missing); ``base``: the base
    model, its name, or whether there is one."""
    if spec.needs.base and not base:
        raise InputError(
            f"{spec.name} needs a base model: give --base, the vision-language model the audio-visual model was "
            f"built from (for the organism: --base {ORGANISM_BASE})"
        )


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
    executor: Executor,
    manifest: Path,
    *,
    progress: Progress | None = None,
    units: dict[str, dict[str, list[Item]]] | None = None,
    stores: Mapping[str, str] | None = None,
) -> dict[str, dict[str, pd.DataFrame]]:
    """Run one analysis on every model of the executor, unit by unit (finished units are skipped); returns model ->
    tables.

    ``progress(task, items done, items)`` is called per model before the first unit and after every unit, in
    the order units finish (on several workers, not the order they were planned in). A unit that fails after its
    retry is recorded with :meth:`RunDir.fail` and the rest goes on. ``stores``: model label -> activation store
    directory, for analyses that keep their vectors in one.
    """
    spec = get(name)
    check_needs(spec, base=executor.has_base)
    units = units if units is not None else plan_units(name, config, manifest, executor.labels)
    store_of = dict(stores or {}) if spec.needs.store else {}
    done = {label: 0 for label in executor.labels}
    total = {label: sum(len(u) for u in units[label].values()) for label in executor.labels}
    pending = []
    for label in executor.labels:
        for unit, unit_items in units[label].items():
            if run.done(unit):
                done[label] += len(unit_items)
            else:
                pending.append(Unit(unit, name, label, tuple(unit_items), config, store_of.get(label)))

    def tick(unit: Unit) -> None:
        done[unit.model] += len(unit.items)
        if progress is not None:
            progress(f"{name} · {unit.model}", done[unit.model], total[unit.model])

    def finished(unit: Unit, tables: dict[str, list[dict]]) -> None:
        run.write_many(unit.name, tables)
        tick(unit)

    def failed(unit: Unit, reason: str, detail: str) -> None:
        run.fail(unit.name, reason, detail)
        tick(unit)

    if progress is not None:
        for label in executor.labels:
            progress(f"{name} · {label}", done[label], total[label])
    executor.run(pending, finished, failed)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for label in executor.labels:
        tables = {t: _rows_of(run.table(f"{name}.{t}"), name, label) for t in _tables_of(run, name)}
        if spec.finalize is not None:
            extra = {"store": _store(store_of[label])} if label in store_of else {}
            tables.update(spec.finalize(tables, config, **extra))
        out[label] = tables
    return out


def _store(path: str) -> Any:
    from .store import ActivationStore

    return ActivationStore.load(path)


def _tables_of(run: RunDir, name: str) -> list[str]:
    return [t.split(".", 1)[1] for t in run.table_names() if t.startswith(f"{name}.")]


def _rows_of(df: pd.DataFrame, name: str, model: str) -> pd.DataFrame:
    """The rows of one model (units carry it in their name; records carry the model column)."""
    return df[df["model"] == model].drop(columns="model") if "model" in df else df


@dataclass
class ReproduceResult:
    """What a run wrote: its directory, analysis -> model -> Summary, the report's path, and the failed units."""

    out: Path
    summary: dict[str, dict[str, Any]]
    report: Path
    failed: dict[str, dict] = field(default_factory=dict)
    """Units that failed after their retry: unit -> {"unit", "reason", "detail"} (see RunDir.failures)."""


def execute(
    out: Path,
    run_config: dict,
    meta: dict,
    configs: Mapping[str, Any],
    models: Mapping[str, Adapter] | None,
    data: Path | Callable[[], Path],
    *,
    base: Adapter | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    store: Path | None = None,
    store_dtype: str = "float32",
) -> ReproduceResult:
    """Run analyses into the run directory ``out`` and write its summary.json and report.html.

    Args:
        run_config: the run's config (recorded in run.json; a different one into the same ``out`` is refused);
            its ``models`` maps each label to the model's name, for the report.
        meta: provenance recorded beside it (model hashes...).
        configs: analysis name -> its Config, run in this order.
        models: label -> loaded model, computed here (ignored when ``executor`` is given).
        data: the manifest, or a function building it (called once the run directory is open).
        base: the base model, for analyses that need one.
        progress: ``progress(task, items done, items)``, per analysis and model.
        log: called with one-line messages for the user (what a resume skips, the store's size).
        executor: where units are computed (default: :class:`LocalExecutor` on ``models`` and ``base``).
        store: an activation store directory (one sub-directory per model) for analyses that keep vectors in
            one (probe): written by the run, or reused if it holds them already; ``store_dtype`` float32 or
            float16.

    Raises:
        KeyboardInterrupt: on Ctrl-C, with a message saying how many units were saved and how to resume.
    """
    executor = executor if executor is not None else LocalExecutor(models or {}, base)
    for name in configs:
        check_needs(get(name), base=executor.has_base)
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
        plans = {name: plan_units(name, config, manifest, executor.labels) for name, config in configs.items()}
        names = [u for plan in plans.values() for per in plan.values() for u in per]
        if any(run.done(u) for u in names):
            say(f"resuming: {sum(map(run.done, names))} of {len(names)} units already done, skipped")
        stores = _open_stores(store, store_dtype, meta, configs, plans, executor, say) if store else None
        try:
            results = {
                name: run_analysis(
                    run, name, config, executor, manifest, progress=progress, units=plans[name], stores=stores
                )
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
        failed = run.failures()
    return ReproduceResult(Path(out), summary, report, failed)


def _open_stores(
    root: Path,
    dtype: str,
    meta: dict,
    configs: Mapping[str, Any],
    plans: Mapping[str, dict[str, dict[str, list[Item]]]],
    executor: Executor,
    say: Callable[[str], None],
) -> dict[str, str]:
    """One activation store per model under ``root`` (bound to the model's weights), and their size said first."""
    from .store import ActivationStore, estimate_bytes

    hashes = meta.get("model_sha256", {})
    hashes = hashes if isinstance(hashes, dict) else dict.fromkeys(executor.labels, hashes)
    stores = {}
    for label in executor.labels:
        path = Path(root) / label
        ActivationStore.open(path, model_sha256=hashes.get(label, ""), dtype=dtype)
        stores[label] = str(path)
    dims = executor.model_dims()
    for name, config in configs.items():
        spec = get(name)
        if not spec.needs.store or spec.store_vectors is None:
            continue
        for label in executor.labels:
            n_layers, hidden = dims[label]
            n = sum(len(items) for items in plans[name][label].values())
            per = estimate_bytes(1, spec.store_vectors(config, n_layers), hidden, dtype)
            say(
                f"activation store {stores[label]}: {per / 1e6:.3f} MB per sample, {per * n / 1e6:.1f} MB for "
                f"{n} samples of {name} ({dtype})"
            )
    return stores


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
    executor: str = "local",
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
) -> ReproduceResult:
    """Run P1's and P2's analyses on the models (default: the organism's vision-heavy and balanced checkpoints, side by
    side) and write ``out``: run.json, results/*.parquet, summary.json, report.html.

    Args:
        models: label -> model (path, hub id or organism:<checkpoint>).
        base: the vision-language base for analyses that need one (token_shift; None: those are skipped).
        data: a counterfactual manifest (``avlens data counterfactual``); default: built from a held-out world
            of the organism (``n_clips`` clips, ``seed``) under ``out/data``.
        analyses: names in the registry (default: every analysis of P1, P2 and P3), each with its spec's default config.
        executor: ``local`` (this process) or ``ray`` (``workers`` Ray actors with ``gpus_per_worker`` GPUs each,
            on the cluster at ``address`` or a local one); see :mod:`avlens.executors`.
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
    runner = make_executor(
        executor, models, base, workers=workers, gpus_per_worker=gpus_per_worker, address=address, load=load
    )
    try:
        hashes = runner.model_hashes()
        meta = {"model_sha256": {label: hashes[label] for label in models}}
        if base:
            meta["base_sha256"] = hashes["base"]
        manifest = Path(data) if data else lambda: _organism_data(Path(out) / "data", n_clips, seed, progress)
        return execute(out, config, meta, configs, None, manifest, progress=progress, log=log, executor=runner)
    finally:
        runner.close()


def _organism_data(root: Path, n_clips: int, seed: int, progress: Progress | None) -> Path:
    """A held-out world of the shipped organism checkpoints (the world they were trained on, another seed) and its
    counterfactual variants (written once; deterministic)."""
    from .data import counterfactual
    from .organism.checkpoints import shipped_world
    from .organism.world import LABEL_GROUPS, write_world

    world, cf = root / "world", root / "counterfactual"
    if not (cf / "manifest.jsonl").exists():
        say = (lambda t: lambda d, n: progress(t, d, n)) if progress else (lambda t: None)
        write_world(
            world,
            n_clips,
            7000 + seed,
            cfg=shipped_world(),
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
