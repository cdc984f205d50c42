"""Linear probes (P1): at which layers, and at which positions, can a linear classifier read what is heard and
what is seen from the residual stream?

For every item the residual at every layer 0..n_layers is read at three sites: the mean over the audio tokens,
the mean over the video tokens, and the last prompt position (which produces the answer). A logistic regression
per (question, condition, site, layer) is then fitted to predict the audio label and the visual label, scored by
stratified k-fold cross-validation, next to the same fit on shuffled labels (the control: what a probe of this
size reaches by memorising noise). P1 reads audio meaning from middle layers of Qwen2.5-Omni even on clips whose
answer follows the picture: latent audio understanding.

Probes are fitted within one condition and one question at a time: a factual and a swapped clip share their
video (and a swapped clip shares its sound with its donor), and the audio and video sites come before the
question, so pooling them would put copies of a test vector in the training folds.

Read the video site's audio-label probe with care on swapped clips: when the swap partner comes from another
semantic group, the picture rules out some sounds, so the audio label is partly predictable from vision alone.

Over large sets the vectors go to an activation store (:mod:`avlens.store`, ``avlens run probe --store DIR``)
instead of the records: one shard per unit, one array per site and layer, and the probes of a layer are fitted
from that layer's arrays alone, read back one shard at a time. A unit whose shard exists is not recomputed. A
float32 store gives the same probes as the in-memory path; a float16 one rounds the vectors (about 3
significant digits), so accuracies may differ slightly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import AvlensError
from ..models.base import Adapter
from ..store import ActivationStore, Shard
from ..trace import Capture, run
from .base import Analysis, Finding, Needs, num, pct, verdict
from .common import Item, batches
from .plotting import layer_axis, legend_outside

NAME = "probe"
SITES = ("audio", "video", "last")
TARGETS = ("audio_label", "visual_label")
N_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Config:
    """What to probe and how.

    Attributes:
        questions / conditions: the items (see :func:`avlens.analyses.common.items_from_manifest`).
        sites: where the residual is read: "audio" / "video" (mean over the group's tokens), "last".
        folds: cross-validation folds; classes with fewer items than folds are dropped (and reported).
        seed: of the fold assignment, the label shuffle of the control and the bootstrap.
        batch_size: items per forward.
        C: inverse L2 regularisation strength of the logistic regression (scikit-learn's ``C``).
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    sites: tuple[str, ...] = SITES
    folds: int = 5
    seed: int = 0
    batch_size: int = 32
    C: float = 1.0


def collect(adapter: Adapter, items: list[Item], config: Config, store: Shard | None = None) -> dict[str, list[dict]]:
    """Residual features of a unit of items.

    Table ``features``: one row per item x site x layer with ``id``, ``condition``, ``question``,
    ``audio_label``, ``visual_label``, ``site``, ``layer`` and ``vector`` (float32 array (D,): the residual at
    the input of decoder layer ``layer``, averaged over the site's tokens). An item without tokens of a site (no
    audio, say) has no rows for that site. Table ``errors``: items that could not be built (id, condition, reason).

    With ``store`` (the unit's shard of an activation store) the vectors go to the shard, one (rows, D) array
    ``"<site>/<layer>"`` each, and ``vector`` is replaced by ``row`` (the record's row in that array) and
    ``shard`` (the shard's name). If the shard exists already, nothing is run: its records (and errors) are
    returned, once checked to be of the same items, prompts and sites.
    """
    if store is not None and store.exists:
        return _stored(store, items, config)
    caps = [Capture.residual(at=site, reduce="mean", name=site) for site in config.sites]
    rows, errors = [], []
    arrays: dict[str, list[np.ndarray]] = {}  # "site/layer" -> its vectors (D,), in the order of their rows
    for chunk, inputs in batches(adapter, items, config.batch_size, errors):
        trace = run(adapter, inputs, capture=caps)
        for site in config.sites:
            for layer, mean in trace.captures[site].items():  # mean: (B, D), NaN where a row has no such token
                vectors = mean.float().numpy()
                for b, it in enumerate(chunk):
                    if np.isnan(vectors[b]).any():
                        continue
                    if store is None:
                        rows.append(it.record(site=site, layer=layer, vector=vectors[b]))
                        continue
                    array = arrays.setdefault(f"{site}/{layer}", [])
                    rows.append(it.record(site=site, layer=layer, row=len(array), shard=store.name))
                    array.append(vectors[b])
    if store is not None:
        stacked = {name: np.stack(vectors) for name, vectors in arrays.items()}
        store.write(rows, stacked, meta={"errors": errors, **_identity(items, config)})
    return {"features": rows, "errors": errors}


def _identity(items: list[Item], config: Config) -> dict:
    """What a shard's vectors are of: the items (id -> prompt) and the sites, kept in its meta."""
    return {"items": {it.id: it.sample.prompt for it in items}, "sites": list(config.sites)}


def _stored(shard: Shard, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """The records of a unit from its shard, refused if the shard is of other items, prompts or sites."""
    meta, given = shard.meta(), _identity(items, config)
    differs = [what for what in ("items", "sites") if meta.get(what) != given[what]]
    if differs:
        raise AvlensError(
            f"{shard.store.path}: shard {shard.name!r} holds the vectors of other {' and '.join(differs)} "
            "than this unit's; use another --store"
        )
    return {"features": shard.rows(), "errors": meta.get("errors", [])}


def store_vectors(config: Config, n_layers: int) -> int:
    """The vectors (of the hidden size) one item puts in the store, at most: one per site and layer 0..n_layers."""
    return len(config.sites) * (n_layers + 1)


def finalize(
    tables: dict[str, pd.DataFrame], config: Config, store: ActivationStore | None = None
) -> dict[str, pd.DataFrame]:
    """Fit the probes; adds table ``probes``.

    One row per question x condition x site x layer x target x control with:

    - ``accuracy``: the share of items whose out-of-fold prediction is right (stratified ``config.folds``-fold
      cross-validation of standardised features -> logistic regression);
    - ``ci_low`` / ``ci_high``: a 95% percentile bootstrap interval of that accuracy, resampling the items'
      out-of-fold correctness (so it reflects the number of test items, not the spread between folds);
    - ``fold_std``: the standard deviation of the per-fold accuracies;
    - ``chance`` (1 / n_classes) and ``majority`` (share of the most frequent class): the two floors;
    - ``n``, ``n_classes``, ``dropped`` (classes left out for having fewer items than folds, "label (count)").

    ``control`` True is the same fit on labels shuffled with ``config.seed``. A slice with fewer than two classes
    left after dropping gives no row there but one row in table ``skipped`` (question, condition, site, target,
    n, n_classes, kept, dropped, reason), so that no probe disappears without a word.

    With ``store`` (features collected into an activation store: ``row`` and ``shard`` instead of ``vector``),
    the vectors are read from it one site and layer at a time, never all at once; from a float32 store the
    tables are equal to the in-memory path's.
    """
    feats = tables["features"]
    out, skipped, first = [], {}, {}
    # One site and layer at a time (its vectors read once for every question and condition); the rows are put
    # back in (question, condition, site, layer) order at the end, so the tables do not depend on the loop.
    for (site, layer), at in feats.groupby(["site", "layer"]):
        at = at.reset_index(drop=True)
        vectors = _vectors(at, f"{site}/{layer}", store)  # (len(at), D)
        for (question, condition), df in at.groupby(["question", "condition"]):
            df = df.sort_values("id")  # the same order whatever the units, so folds and shuffles are reproducible
            _fit_slice(df, vectors, (question, condition, site, int(layer)), config, out, skipped, first)
    out.sort(key=lambda r: (r["question"], r["condition"], r["site"], r["layer"]))  # stable: targets keep order
    return {
        **tables,
        "probes": pd.DataFrame(out, columns=PROBE_COLUMNS),
        "skipped": pd.DataFrame([skipped[k] for k in sorted(skipped, key=first.get)], columns=SKIPPED_COLUMNS),
    }


def _vectors(at: pd.DataFrame, array: str, store: ActivationStore | None) -> np.ndarray:
    """The vectors of the rows of one site and layer, (len(at), D): their ``vector`` column, or, with a store,
    their ``row`` of array ``array`` in their ``shard``, read one shard at a time."""
    if store is None:
        if "vector" not in at:
            raise AvlensError("probe features carry no vectors (they were collected into an activation store)")
        return np.stack(at["vector"].to_numpy())
    if "shard" not in at:
        raise AvlensError("probe features carry no shard and row: they were not collected into an activation store")
    rows, vectors = at["row"].to_numpy(), None
    for shard, positions in at.groupby("shard").indices.items():
        part = store.shard(shard).array(array)[rows[positions]]
        if vectors is None:
            vectors = np.empty((len(at), part.shape[1]), np.float32)
        vectors[positions] = part
    return vectors


def _fit_slice(
    df: pd.DataFrame,
    vectors: np.ndarray,
    key: tuple[str, str, str, int],
    config: Config,
    out: list[dict],
    skipped: dict,
    first: dict,
) -> None:
    """The probes of one question, condition, site and layer (``key``) from the rows ``df`` of ``vectors``: rows
    appended to ``out``, or the slices that cannot be fitted to ``skipped`` (the highest layer's reasons, in the
    order of the (question, condition, site, layer, target) where each was first skipped, kept in ``first``)."""
    question, condition, site, layer = key
    for target in TARGETS:
        labelled = df[df[target].notna()]
        counts = labelled[target].value_counts()
        kept = counts[counts >= config.folds]
        dropped = ", ".join(f"{label} ({n})" for label, n in counts[counts < config.folds].sort_index().items())
        if len(kept) < 2:
            if counts.empty:  # nothing of this kind in the slice (nothing seen on audio-only clips...)
                continue
            first.setdefault((question, condition, site, target), (*key, TARGETS.index(target)))
            skipped[(question, condition, site, target)] = {
                "question": question,
                "condition": condition,
                "site": site,
                "target": target,
                "n": len(labelled),
                "n_classes": len(counts),
                "kept": ", ".join(f"{label} ({n})" for label, n in kept.sort_index().items()),
                "dropped": dropped,
                "reason": f"{len(kept)} class(es) with at least {config.folds} items (the folds); a probe needs 2",
            }
            continue
        data = labelled[labelled[target].isin(kept.index)]
        x = vectors[data.index.to_numpy()].astype(np.float64)  # (n, D), in the order of df (sorted by id)
        y = data[target].to_numpy()
        shuffled = np.random.default_rng(config.seed).permutation(y)
        for control, labels in ((False, y), (True, shuffled)):
            fit = cross_validate(x, labels, config)
            out.append(
                {
                    "question": question,
                    "condition": condition,
                    "site": site,
                    "layer": layer,
                    "target": target,
                    "control": control,
                    **fit,
                    "chance": 1.0 / len(kept),
                    "majority": float(kept.max() / kept.sum()),
                    "n": len(y),
                    "n_classes": len(kept),
                    "dropped": dropped,
                }
            )


def cross_validate(x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """Out-of-fold accuracy of a standardised logistic regression on features x (N, D) and labels y (N,), with
    a bootstrap 95% interval over the items and the per-fold standard deviation."""
    # newton-cg: ~10x faster than the default lbfgs on these small, wide problems (tens to hundreds of items)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.C, solver="newton-cg", max_iter=1000))
    splits = list(StratifiedKFold(config.folds, shuffle=True, random_state=config.seed).split(x, y))
    correct = cross_val_predict(probe, x, y, cv=splits) == y
    resampled = np.random.default_rng(config.seed).integers(0, len(y), (N_BOOTSTRAP, len(y)))
    low, high = np.quantile(correct[resampled].mean(1), [0.025, 0.975])
    return {
        "accuracy": float(correct.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "fold_std": float(np.std([correct[test].mean() for _, test in splits])),
    }


KEYS = ["question", "condition", "site", "target"]
PROBE_COLUMNS = [*KEYS[:3], "layer", "target", "control", "accuracy", "ci_low", "ci_high", "fold_std", "chance"]
PROBE_COLUMNS += ["majority", "n", "n_classes", "dropped"]
SKIPPED_COLUMNS = [*KEYS, "n", "n_classes", "kept", "dropped", "reason"]


def against_control(probes: pd.DataFrame) -> pd.DataFrame:
    """The real probes (one row per question, condition, site, target and layer) with the shuffled control's
    accuracy at the same layer and ``decodable``: the 95% lower bound is above both the control and chance."""
    probes = probes.astype({"control": bool})
    real = probes[~probes.control].set_index([*KEYS, "layer"])
    control = probes[probes.control].set_index([*KEYS, "layer"]).accuracy
    real["control_accuracy"] = control.reindex(real.index).to_numpy()
    real["decodable"] = real.ci_low > np.maximum(real.control_accuracy, real.chance)
    return real.reset_index()


@dataclass(frozen=True)
class ProbeSlice:
    """The probes of one question, condition, site and target, at their best layer.

    Attributes:
        best_layer: the layer with the highest accuracy; accuracy, ci_low (its 95% lower bound), control (the
            shuffled-label probe's accuracy there) and chance at that layer.
        middle_decodable: the share of middle layers (the middle third of 0..n_layers) where the label is
            decodable (see :func:`against_control`).
        n / n_classes: items and classes the probe was fitted on; dropped: classes left out for having fewer
            items than folds ("label (count)", "" for none).
    """

    best_layer: int
    accuracy: float | None
    ci_low: float | None
    control: float | None
    chance: float | None
    middle_decodable: float | None
    n: int = 0
    n_classes: int = 0
    dropped: str = ""


@dataclass(frozen=True)
class Summary:
    """Attributes:
    slices: ``"question/condition/site/target"`` (e.g. ``"hear/swapped/audio/audio_label"``) -> its probes.
    skipped: the same keys -> why no probe was fitted there (too few classes with enough items; what was kept
        and dropped, with counts).
    swapped_last_audio_accuracy: the headline: best accuracy of the audio label at the last position on swapped
        clips ("hear" questions, else the first question probed); None when not probed (n = 0);
        swapped_last_audio_n: the items it was fitted on.
    """

    slices: dict[str, ProbeSlice]
    skipped: dict[str, str] = field(default_factory=dict)
    swapped_last_audio_accuracy: float | None = None
    swapped_last_audio_n: int = 0

    def slice(self, question: str, condition: str, site: str, target: str) -> ProbeSlice | None:
        return self.slices.get(f"{question}/{condition}/{site}/{target}")


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    """Per question/condition/site/target: the best layer with its accuracy, lower bound, control and chance,
    and the share of middle layers where the label is decodable."""
    slices: dict[str, ProbeSlice] = {}
    for key, d in against_control(tables["probes"]).groupby(KEYS):
        best = d.loc[d.accuracy.idxmax()]
        top = d.layer.max()
        middle = d[(d.layer >= top / 3) & (d.layer <= 2 * top / 3)]
        slices["/".join(key)] = ProbeSlice(
            best_layer=int(best.layer),
            accuracy=num(best.accuracy, 3),
            ci_low=num(best.ci_low, 3),
            control=num(best.control_accuracy, 3),
            chance=num(best.chance, 3),
            middle_decodable=num(middle.decodable.mean(), 3),
            n=int(best.n),
            n_classes=int(best.n_classes),
            dropped=str(best.dropped or ""),
        )
    skipped = {}
    for r in tables.get("skipped", pd.DataFrame(columns=SKIPPED_COLUMNS)).to_dict("records"):
        kept = f"kept {r['kept']}" if r["kept"] else "no class kept"
        skipped["/".join(r[k] for k in KEYS)] = (
            f"not fitted: {r['reason']}; n = {r['n']}, {kept}; dropped {r['dropped']}"
        )
    headline = sorted(k for k in slices if k.endswith("/swapped/last/audio_label"))
    headline.sort(key=lambda k: not k.startswith("hear/"))
    if not headline:
        return Summary(slices, skipped)
    best = slices[headline[0]]
    return Summary(slices, skipped, best.accuracy, best.n)


def plot(tables: dict[str, dict[str, pd.DataFrame]], condition: str = "swapped") -> Figure:
    """Probe accuracy vs layer: one row per site, one column per model; audio label and visual label (with their
    95% intervals), shuffled controls dashed, chance dotted. Shows ``condition`` (else each model's first)."""
    if all(t["probes"].empty for t in tables.values()):
        fig = Figure(figsize=(7, 1.2))
        fig.text(
            0.5,
            0.5,
            "No probe was fitted: fewer than two classes with as many items as folds (see the table).",
            ha="center",
        )
        return fig
    sites = [s for s in SITES if any(s in set(t["probes"].site) for t in tables.values())]
    fig = Figure(figsize=(4.5 * len(tables), 2.8 * len(sites) + 0.6), layout="constrained")
    axes = fig.subplots(len(sites), len(tables), squeeze=False, sharey=True)
    colors = {"audio_label": "#1b9e77", "visual_label": "#d95f02"}
    for col, (model, t) in enumerate(tables.items()):
        p = t["probes"]
        cond = condition if condition in set(p.condition) else sorted(set(p.condition))[0]
        question = sorted(set(p.question))[0]
        p = p[(p.condition == cond) & (p.question == question)]
        for row, site in enumerate(sites):
            ax = axes[row, col]
            ns = {}  # target -> items its probe was fitted on
            for target, color in colors.items():
                for control in (False, True):
                    d = p[(p.site == site) & (p.target == target) & (p.control == control)].sort_values("layer")
                    if d.empty:
                        continue
                    name = target.replace("_", " ") + (" (shuffled labels)" if control else " (95% CI shaded)")
                    ax.plot(d.layer, d.accuracy, "--" if control else "-o", color=color, label=name, ms=3)
                    if not control:
                        ax.fill_between(d.layer, d.ci_low, d.ci_high, color=color, alpha=0.15, lw=0)
                        ax.axhline(
                            d.chance.iloc[0], color=color, ls=":", lw=0.8, label=f"chance, {target.replace('_', ' ')}"
                        )
                        ns[target] = int(d.n.iloc[0])
            ax.set_ylim(0, 1.02)
            n = ", ".join(f"{t.replace('_label', '')} {k}" for t, k in ns.items()) or "0"
            ax.set_title(f"{model}: {site} ({cond}, '{question}')\nn = {n} clips", fontsize=9)
            layer_axis(ax, "layer (residual at its input)")
            ax.set_ylabel("probe accuracy")
    legend_outside(fig, axes.flat, ncols=3)
    fig.suptitle("Linear probes: what the residual stream encodes, by layer")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """Is the audio label linearly decodable from the audio tokens in middle layers on swapped clips?"""
    parts, verdicts = [], []
    for model, s in summaries.items():
        keys = sorted(k for k in s.slices if k.endswith("/swapped/audio/audio_label"))
        if not keys:
            why = [v for k, v in s.skipped.items() if k.endswith("/swapped/audio/audio_label")]
            parts.append(f"{model}: no probe on swapped clips' audio tokens ({why[0] if why else 'none probed'})")
            continue
        p = s.slices[keys[0]]  # the first question
        floor = max(x for x in (p.control, p.chance, 0.0) if x is not None)
        middle, best = p.middle_decodable or 0.0, p.ci_low is not None and p.ci_low > floor
        verdicts.append("agrees" if middle > 0 else "partly" if best else "disagrees")
        dropped = f"; classes dropped for having fewer items than folds: {p.dropped}" if p.dropped else ""
        parts.append(
            f"{model}: decodable in {middle:.0%} of middle layers; best layer {p.best_layer} at "
            f"{pct(p.accuracy)} (95% CI from {pct(p.ci_low)}; shuffled labels {pct(p.control)}, chance {pct(p.chance)}"
            f"; n = {p.n} items of {p.n_classes} classes{dropped})"
        )
    return [
        Finding(
            CLAIM,
            "audio meaning is present in middle layers of Qwen2.5-Omni (latent audio understanding)",
            "; ".join(parts),
            verdict(verdicts),
            "Swapped clips, audio-token mean, linear probe on the audio label. Decodable = the 95% bootstrap lower "
            "bound exceeds both the shuffled-label control and chance; middle = the middle third of the layers. "
            "P1 read the audio tokens with a logit lens, not a trained probe: a probe can find information the "
            "model does not use (see the logit lens for what it decodes).",
        )
    ]


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """The report's table: one row per model, condition, site and label probed (the first question), its best
    layer with accuracy, 95% lower bound, shuffled control, chance, middle layers decodable, n and what was
    dropped; slices that could not be fitted say why."""
    rows = []
    for model, s in summaries.items():
        first = sorted({k.split("/")[0] for k in (*s.slices, *s.skipped)}, key=lambda q: q != "hear")[:1]
        for key in sorted((*s.slices, *s.skipped)):
            question, condition, site, target = key.split("/")
            if [question] != first:
                continue
            row = {"model": model, "clip condition": condition, "site": site, "label": target.replace("_", " ")}
            p = s.slices.get(key)
            if p is None:
                rows.append(row | {"note": s.skipped[key]})
                continue
            rows.append(
                row
                | {
                    "best layer": p.best_layer,
                    "accuracy": p.accuracy,
                    "95% CI low": p.ci_low,
                    "shuffled labels": p.control,
                    "chance": p.chance,
                    "middle layers decodable": p.middle_decodable,
                    "n": p.n,
                    "classes": p.n_classes,
                    "note": f"dropped (fewer items than folds): {p.dropped}" if p.dropped else "",
                }
            )
    out = pd.DataFrame(rows, dtype=object)
    if not out.empty:
        out = out.set_index(["model", "clip condition", "site", "label"])
    out.attrs["caption"] = "Probes at their best layer (accuracy: out-of-fold share right; n: items fitted on)"
    return [out]


CLAIM = "What is heard stays readable in the hidden states of the audio tokens even when the answer follows the picture"

SPEC = Analysis(
    name=NAME,
    title="Linear probes: where the audio and visual labels are decodable",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="swapped_last_audio_accuracy",
    collect=collect,
    finalize=finalize,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(
        questions={"hear": "What do you hear?"}, conditions=("factual", "swapped"), folds=4
    ),  # 4 clips a class
    needs=Needs(store=True),
    store_vectors=store_vectors,
    about=__doc__,
)
