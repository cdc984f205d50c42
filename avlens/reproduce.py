"""Running analyses into a run directory, and ``reproduce``: P1 on the organism, with its HTML report.

Work is split into units (an analysis x model x batch of items); each unit's records are written atomically
when it finishes, so a killed run resumes where it stopped (see :mod:`avlens.runs`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .analyses import module
from .analyses.common import Item, items_from_manifest
from .models.base import Adapter
from .runs import RunDir

Progress = Callable[[str, int, int], None]

ORGANISM_MODELS = {"vision-heavy": "organism:av-vision-heavy", "balanced": "organism:av-balanced"}
ORGANISM_BASE = "organism:vl-base"
HEAR, SEE = "What do you hear?", "What do you see?"


def default_configs() -> dict[str, Any]:
    """The analyses of ``reproduce`` and their settings for the organism."""
    from .analyses import attention_share, counterfactual, knockout, logit_lens, probe, token_shift

    both = ("factual", "swapped")
    return {
        "counterfactual": counterfactual.Config(questions={"hear": HEAR, "see": SEE}, max_new_tokens=4),
        "probe": probe.Config(questions={"hear": HEAR}, conditions=both, folds=4),  # 4 clips per class
        "logit_lens": logit_lens.Config(questions={"hear": HEAR}, conditions=both),
        "knockout": knockout.Config(questions={"hear": HEAR}, conditions=both, window=2),
        "token_shift": token_shift.Config(conditions=both),
        "attention_share": attention_share.Config(questions={"hear": HEAR}, conditions=both),
    }


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


def run_analysis(
    run: RunDir,
    name: str,
    config: Any,
    models: Mapping[str, Adapter],
    manifest: Path,
    *,
    base: Adapter | None = None,
    unit_size: int = 48,
    progress: Progress | None = None,
) -> dict[str, dict[str, pd.DataFrame]]:
    """Run one analysis on every model, unit by unit (finished units are skipped); returns model -> tables."""
    mod = module(name)
    questions = getattr(config, "questions", None) or {"describe": config.question}
    conditions = getattr(config, "conditions", None)
    items = items_from_manifest(manifest, questions, conditions=conditions)
    units = [items[i : i + unit_size] for i in range(0, len(items), unit_size)]
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for label, adapter in models.items():
        task = f"{name} · {label}"
        for j, unit_items in enumerate(units):
            unit = f"{name}/{label}/{j:04d}"
            if not run.done(unit):
                run.write_many(unit, _collect(mod, adapter, unit_items, config, base, label))
            if progress is not None:
                progress(task, j + 1, len(units))
        tables = {t: _rows_of(run.table(f"{name}.{t}"), name, label) for t in _tables_of(run, name)}
        if hasattr(mod, "finalize"):
            tables.update(mod.finalize(tables, config))
        out[label] = tables
    return out


def _collect(
    mod: Any, adapter: Adapter, items: list[Item], config: Any, base: Adapter | None, label: str
) -> dict[str, list[dict]]:
    """One unit's records, each tagged with the model's label, in tables named ``<analysis>.<table>``."""
    if mod.NAME == "token_shift":
        tables = mod.collect(adapter, items, config, base=base)
    else:
        tables = mod.collect(adapter, items, config)
    return {f"{mod.NAME}.{t}": [{"model": label, **r} for r in rows] for t, rows in tables.items()}


def _tables_of(run: RunDir, name: str) -> list[str]:
    return [t.split(".", 1)[1] for t in run.table_names() if t.startswith(f"{name}.")]


def _rows_of(df: pd.DataFrame, name: str, model: str) -> pd.DataFrame:
    """The rows of one model (units carry it in their name; records carry the model column)."""
    return df[df["model"] == model].drop(columns="model") if "model" in df else df


@dataclass
class ReproduceResult:
    out: Path
    summary: dict
    report: Path


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
) -> ReproduceResult:
    """Run P1's analyses on the models (default: the organism's vision-heavy and balanced checkpoints, side by
    side) and write ``out``: run.json, results/*.parquet, summary.json, report.html.

    Args:
        models: label -> model (path, hub id or organism:<checkpoint>).
        base: the vision-language base for token_shift (None: skip it).
        data: a counterfactual manifest (``avlens data counterfactual``); default: built from a held-out world
            of the organism (``n_clips`` clips, ``seed``) under ``out/data``.
    """
    from . import load

    models = dict(models or ORGANISM_MODELS)
    configs = default_configs()
    names = list(analyses or configs)
    if base is None and "token_shift" in names:
        names.remove("token_shift")
    config = {
        "models": models,
        "base": base,
        "data": str(data) if data else {"organism_world": {"clips": n_clips, "seed": seed}},
        "analyses": {n: asdict(configs[n]) for n in names},
        "seed": seed,
    }
    adapters = {label: load(m) for label, m in models.items()}
    base_adapter = load(base) if base else None
    meta = {"model_sha256": {label: model_hash(a) for label, a in adapters.items()}}
    if base_adapter is not None:
        meta["base_sha256"] = model_hash(base_adapter)
    with RunDir.open(out, config, meta=meta) as run:
        manifest = Path(data) if data else _organism_data(Path(out) / "data", n_clips, seed, progress)
        results = {}
        for name in names:
            per_model = run_analysis(run, name, configs[name], adapters, manifest, base=base_adapter, progress=progress)
            results[name] = per_model
        summary = {
            name: {label: module(name).summarize(t) for label, t in per.items()} for name, per in results.items()
        }
        from .report.build import build_report, headlines

        run.write_json("summary", {"headline": headlines(summary), "details": summary})
        report = build_report(Path(out) / "report.html", results, summary, config, meta)
        run.consolidate()
    return ReproduceResult(Path(out), summary, report)


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
