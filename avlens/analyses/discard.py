"""Discarding audio-visual tokens after the transfer (P3): drop a modality's tokens from a layer on, from the KV
cache too, and measure what it costs in accuracy and what it saves in time.

P3 finds that once the modalities have passed what the answer needs to the question and the last position, their
tokens can be dropped: video after layer ~26 and the question after ~29 (of 36) cut the prefill by 8.7% with
about +-0.5 accuracy. Here every target (``video``, ``audio``, ``video+audio``, ``video+audio+question``) is
discarded from every layer L (the engine's :class:`~avlens.trace.Discard`: the tokens leave the sequence and the
cache, so the layers from L on run on fewer tokens; it equals blocking every attention edge out of the group in
layers >= L, tested in the engine). That sweep is the flow map of the modality as a whole; the layer used is read
from it by a rule fixed beforehand:

- L* is the first layer from which discarding changes the right answer's probability by less than ``max_dp``
  (default :data:`~avlens.analyses.flow.MEANINGFUL_DP`, 5% of it) at that layer and at every later one: the mean
  dp = (p_discard - p_base) / p_base over items answered correctly, with the 95% bootstrap interval inside
  +-``max_dp``. L* = n_layers (nothing dropped) when no layer qualifies.
- L* is chosen on the "dev" half of the clips and the accuracy change is reported on the "test" half
  (:func:`~avlens.analyses.common.split_of`), with bootstrap intervals.

Baselines at ``fastv_layer`` (default 2, FastV's K): FastV drops the ``fastv_ratio`` (half) of the video tokens
the last prompt position attends to least at layer K - 1 (mean over heads), and random dropping removes the same
number of video tokens chosen at random (``random_draws`` draws, averaged per item).

Latency: per batch, the prefill and the per-token decoding time of one ``generate`` with ``latency_tokens``
forced tokens (the engine times both parts), with no discarding and with the ``latency_targets`` (default
video+audio) from every layer, FastV and random, the best of ``latency_repeats``; a summary's speed-ups are medians
over batches at L*. They are wall times of whatever machine ran the batch: on a model as small as the organism,
per-step overheads weigh more than on a 7B model (``benchmarks/discard_speed.py`` measures an 8-layer, hidden-512
thinker).

Every (target, layer) condition of a batch is one entry of a single :func:`~avlens.trace.run_conditions` call;
the answer is read at the last prompt position.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..layout import TokenLayout
from ..models.base import Adapter, Inputs
from ..trace import Capture, Discard, generate, run, run_conditions
from .base import Analysis, Finding, num, verdict
from .causal_trace import mean_ci
from .common import Item, LabelTokens, Readout, batches, split_of
from .flow import MEANINGFUL_DP
from .plotting import layer_axis, legend_outside
from .tables import interval, object_frame

NAME = "discard"
BASELINE = "baseline"
TARGETS = ("video", "audio", "video+audio", "video+audio+question")
"""What is discarded: a group expression of the layout (``+`` joins groups)."""
FASTV, RANDOM = "fastv", "random"


@dataclass(frozen=True)
class Config:
    """What to discard and how to time it.

    Attributes:
        questions: question kind -> prompt.
        conditions: clip conditions to keep from the manifest.
        targets: group expressions to discard (see :data:`TARGETS`).
        max_dp: the rule's bound on |dp| (see the module docstring); fixed beforehand.
        fastv_layer: FastV's K: its tokens are ranked by attention at layer K - 1 and dropped from layer K.
        fastv_ratio: the share of the video tokens FastV (and random dropping) removes.
        random_draws: draws of random dropping.
        latency: time prefill and decoding (off: no latency table).
        latency_targets: the targets timed (at every layer), besides no discarding, FastV and random.
        latency_tokens: tokens generated per timing.
        latency_repeats: timings per measurement (the best is kept).
        seed: seed of the random draws.
        batch_size: items per forward.
    """

    questions: dict[str, str] = field(default_factory=lambda: {"hear": "What do you hear?", "see": "What do you see?"})
    conditions: tuple[str, ...] = ("factual", "swapped")
    targets: tuple[str, ...] = TARGETS
    max_dp: float = MEANINGFUL_DP
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    random_draws: int = 3
    latency: bool = True
    latency_targets: tuple[str, ...] = ("video+audio",)
    latency_tokens: int = 8
    latency_repeats: int = 1
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.targets:
            raise InputError("discard: no targets")
        for t in self.targets:
            if not t or any(not g.strip() for g in t.split("+")):
                raise InputError(f"discard target {t!r}: write groups joined by +, e.g. video+audio")
        if not 0 < self.max_dp < 1:
            raise InputError(f"discard: max_dp must be in (0, 1), got {self.max_dp}")
        if self.fastv_layer < 1:
            raise InputError(f"discard: fastv_layer must be at least 1, got {self.fastv_layer}")
        if not 0 < self.fastv_ratio < 1:
            raise InputError(f"discard: fastv_ratio must be in (0, 1), got {self.fastv_ratio}")
        if unknown := set(self.latency_targets) - set(self.targets):
            raise InputError(f"discard: latency_targets {sorted(unknown)} are not among the targets")
        if self.random_draws < 1 or self.latency_tokens < 2 or self.latency_repeats < 1:
            raise InputError("discard: random_draws and latency_repeats must be >= 1, latency_tokens >= 2")


# ---------------------------------------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------------------------------------
def fastv_tokens(adapter: Adapter, inputs: Inputs, layer: int, ratio: float) -> torch.Tensor:
    """FastV's dropped set: per row, the ``ratio`` of the video tokens the last prompt position attends to least
    at ``layer`` (mean over heads; ties broken by position): (B, L) bool."""
    received = run(adapter, inputs, capture=[Capture.received("last", layers=[layer])]).captures["received"][layer]
    score = received.float().mean(1).cpu()  # (B, L)
    video = inputs.layout.groups["video"] & inputs.layout.valid
    out = torch.zeros_like(video)
    for b in range(video.shape[0]):
        pos = video[b].nonzero().flatten()
        k = int(len(pos) * ratio)
        if k:
            order = torch.argsort(score[b, pos], stable=True)
            out[b, pos[order[:k]]] = True
    return out


def random_tokens(layout: TokenLayout, counts: torch.Tensor, items: list[Item], seed: int, draw: int) -> torch.Tensor:
    """``counts[b]`` video tokens of each row drawn at random (by seed, item id and draw): (B, L) bool."""
    video = layout.groups["video"] & layout.valid
    out = torch.zeros_like(video)
    for b, it in enumerate(items):
        pos = video[b].nonzero().flatten().numpy()
        rng = np.random.default_rng([seed, zlib.crc32(it.id.encode()), draw])
        out[b, rng.choice(pos, size=int(counts[b]), replace=False)] = True
    return out


def _latency(adapter: Adapter, inputs: Inputs, ivs: list, config: Config) -> dict[str, float]:
    """Prefill seconds and decoding seconds per token of the batch with ``ivs`` (one ``generate`` of
    ``latency_tokens`` forced tokens, timed by the engine; the best of ``latency_repeats``)."""
    n = config.latency_tokens
    times = [
        generate(adapter, inputs, ivs, max_new_tokens=n, min_new_tokens=n).seconds
        for _ in range(config.latency_repeats)
    ]
    return {
        "prefill_s": min(t["prefill"] for t in times),
        "decode_s_per_token": min(t["decode"] / t["steps"] for t in times),
    }


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """The answer with each target discarded from every layer, the baselines, and their timings, for a unit.

    Table ``discard``, one row per item x target x from_layer (and per FastV / random draw at ``fastv_layer``):

    - id, clip, condition, question, audio_label, visual_label, expected: the item; split ("dev" / "test");
    - target (a :data:`TARGETS` expression, ``fastv`` or ``random``), draw (random's draw, else 0), from_layer,
      dropped (tokens removed from the row), max_dp (the config's, for the summary's rule);
    - the knockout table's readout columns (p_audio, p_visual, their _base, delta_*, dp_*, answer, answer_base,
      correct, correct_base, follows, follows_base).

    Table ``latency`` (with ``config.latency``), one row per batch x target x from_layer plus ``none``: batch (its
    first item's id), target (``random``: its first draw), from_layer (n_layers for none), rows, prompt_tokens
    (the batch's padded length), dropped (tokens removed over the batch), prefill_s, decode_s_per_token.

    Table ``errors``: items whose inputs could not be built.
    """
    n = adapter.n_layers
    if config.fastv_layer >= n:
        raise InputError(f"discard: fastv_layer {config.fastv_layer} is not below the model's {n} layers")
    token = LabelTokens(adapter)
    rows: list[dict] = []
    timings: list[dict] = []
    errors: list[dict] = []
    for chunk, inputs in batches(adapter, items, config.batch_size, errors, interleave=True):
        layout = inputs.layout
        for t in config.targets:
            layout.mask(t)  # an unknown group: one clear error before any work
        fast = fastv_tokens(adapter, inputs, config.fastv_layer - 1, config.fastv_ratio)
        counts = fast.sum(1)
        layout = layout.with_group(FASTV, fast)
        for d in range(config.random_draws):
            layout = layout.with_group(f"{RANDOM}{d}", random_tokens(layout, counts, chunk, config.seed, d))
        inputs = replace(inputs, layout=layout)
        conditions: dict[str, list[Discard]] = {BASELINE: []}
        for t in config.targets:
            for start in range(n):
                conditions[f"{t}|{start}"] = [Discard(t, start)]
        conditions[f"{FASTV}|{config.fastv_layer}"] = [Discard(FASTV, config.fastv_layer)]
        for d in range(config.random_draws):
            conditions[f"{RANDOM}{d}|{config.fastv_layer}"] = [Discard(f"{RANDOM}{d}", config.fastv_layer)]
        traces = run_conditions(adapter, inputs, conditions)
        base = Readout(traces.pop(BASELINE).logits, chunk, token)
        for name, trace in traces.items():
            target, start = name.rsplit("|", 1)
            draw = int(target[len(RANDOM) :]) if target.startswith(RANDOM) else 0
            dropped = (layout.mask(target) & layout.valid).sum(1)
            now = Readout(trace.logits, chunk, token)
            for b, it in enumerate(chunk):
                rows.append(
                    it.record(
                        split=split_of(it.clip),
                        target=RANDOM if target.startswith(RANDOM) else target,
                        draw=draw,
                        from_layer=int(start),
                        dropped=int(dropped[b]),
                        max_dp=config.max_dp,
                        **now.row(b, base),
                    )
                )
        if config.latency:  # no discarding, the timed targets from every layer, FastV and one random draw
            timed = {"none": []} | {
                f"{t}|{s}": conditions[f"{t}|{s}"] for t in config.latency_targets for s in range(n)
            }
            timed[f"{FASTV}|{config.fastv_layer}"] = conditions[f"{FASTV}|{config.fastv_layer}"]
            timed[f"{RANDOM}|{config.fastv_layer}"] = conditions[f"{RANDOM}0|{config.fastv_layer}"]
            for name, ivs in timed.items():
                target, _, start = name.partition("|")
                timings.append(
                    {
                        "batch": chunk[0].id,
                        "target": target,
                        "from_layer": int(start) if start else n,
                        "rows": len(chunk),
                        "prompt_tokens": inputs.length,
                        "dropped": sum(int((layout.mask(iv.group) & layout.valid).sum()) for iv in ivs),
                        **_latency(adapter, inputs, ivs, config),
                    }
                )
    out = {"discard": rows, "errors": errors}
    if config.latency:
        out["latency"] = timings
    return out


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
def dp_map(df: pd.DataFrame) -> pd.DataFrame:
    """Per target and from_layer: mean dp of the right answer on items answered correctly, its 95% interval and
    n (random: each item's mean over draws first)."""
    ok = df[df.correct_base.fillna(False).astype(bool)]
    out = {}
    for (target, start), g in ok.groupby(["target", "from_layer"]):
        x = g.groupby("id").dp_expected.mean().dropna().to_numpy()
        m, lo, hi = mean_ci(x)
        out[(target, int(start))] = {"dp": m, "low": lo, "high": hi, "n": len(x)}
    return pd.DataFrame.from_dict(out, orient="index")


def choose_layer(dp: pd.DataFrame, target: str, n_layers: int, max_dp: float) -> int:
    """The rule: the first layer from which every layer's dp interval is inside +-max_dp (n_layers if none)."""
    chosen = n_layers
    for start in range(n_layers - 1, -1, -1):
        try:
            r = dp.loc[(target, start)]
        except KeyError:
            break
        if not (r["low"] > -max_dp and r["high"] < max_dp):
            break
        chosen = start
    return chosen


def _accuracy(df: pd.DataFrame) -> dict[str, float | int | None]:
    """Accuracy with and without the discard over df's items (random: mean over draws), the change's 95%
    interval, the share of answers changed, n."""
    per = df.assign(
        c=df.correct.astype(float), c0=df.correct_base.astype(float), moved=(df.answer != df.answer_base).astype(float)
    )
    per = per.groupby("id")[["c", "c0", "moved", "dropped"]].mean()
    diff, lo, hi = mean_ci((per.c - per.c0).to_numpy())
    return {
        "accuracy_base": num(per.c0.mean(), 3),
        "accuracy": num(per.c.mean(), 3),
        "accuracy_change": num(diff, 3),
        "low": num(lo, 3),
        "high": num(hi, 3),
        "answers_changed": num(per.moved.mean(), 3),
        "dropped": num(per.dropped.mean(), 1),
        "n": len(per),
    }


def _speedup(latency: pd.DataFrame, target: str, start: int) -> dict[str, float | None]:
    """Median over batches of (no discarding / discarding) prefill and decoding times at one (target, layer)."""
    out: dict[str, float | None] = {"prefill_speedup": None, "decode_speedup": None}
    if latency.empty:
        return out
    none = latency[latency.target == "none"].set_index("batch")
    now = latency[(latency.target == target) & (latency.from_layer == start)].set_index("batch")
    for col, key in (("prefill_s", "prefill_speedup"), ("decode_s_per_token", "decode_speedup")):
        ratio = (none[col] / now[col]).replace([np.inf, -np.inf], np.nan).dropna()
        out[key] = num(ratio.median(), 3) if len(ratio) else None
    return out


@dataclass(frozen=True)
class Summary:
    """``targets``: target -> from_layer (L*, chosen on dev; n_layers: none qualified), the dev dp at L* (dp, low,
    high), and on test: accuracy_base, accuracy, accuracy_change with its interval (low/high as acc_low,
    acc_high), answers_changed, dropped (tokens per item), n, prefill_speedup, decode_speedup.
    ``baselines``: fastv and random at fastv_layer, the same test figures; ``fastv_minus_random``: FastV's
    accuracy change less random's, paired over test items, with its interval. ``prefill_speedup``: the
    headline, video+audio at its L* (None when not run or no layer qualified). ``n_dev``, ``n_test``: items."""

    prefill_speedup: float | None = None
    targets: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    baselines: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    fastv_minus_random: dict[str, float | None] = field(default_factory=dict)
    max_dp: float | None = None
    fastv_layer: int | None = None
    n_layers: int | None = None
    n_dev: int = 0
    n_test: int = 0


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    df = tables.get("discard", pd.DataFrame())
    if df.empty:
        return Summary()
    max_dp = float(df.max_dp.iloc[0])
    latency = tables.get("latency", pd.DataFrame())
    n = int(df[~df.target.isin([FASTV, RANDOM])].from_layer.max()) + 1
    dev, test = df[df.split == "dev"], df[df.split == "test"]
    dp_dev = dp_map(dev)
    targets: dict[str, dict] = {}
    for target in [t for t in df.target.unique() if t not in (FASTV, RANDOM)]:
        start = choose_layer(dp_dev, target, n, max_dp)
        r: dict[str, float | int | None] = {"from_layer": start}
        if start < n:
            d = dp_dev.loc[(target, start)]
            r.update(dp=num(d["dp"], 3), dp_low=num(d["low"], 3), dp_high=num(d["high"], 3))
            acc = _accuracy(test[(test.target == target) & (test.from_layer == start)])
            r.update({("acc_" + k if k in ("low", "high") else k): v for k, v in acc.items()})
            r.update(_speedup(latency, target, start))
        targets[target] = r
    baselines: dict[str, dict] = {}
    fastv_layer = None
    for b in (FASTV, RANDOM):
        g = test[test.target == b]
        if len(g):
            fastv_layer = int(g.from_layer.iloc[0])
            acc = _accuracy(g)
            baselines[b] = {
                **{("acc_" + k if k in ("low", "high") else k): v for k, v in acc.items()},
                **_speedup(latency, b, fastv_layer),
            }
    paired: dict[str, float | None] = {}
    if FASTV in baselines and RANDOM in baselines:
        f = test[test.target == FASTV].groupby("id").correct.mean().astype(float)
        r_ = test[test.target == RANDOM].groupby("id").correct.mean().astype(float)
        both = f.index.intersection(r_.index)
        m, lo, hi = mean_ci((f[both] - r_[both]).to_numpy())
        paired = {"difference": num(m, 3), "low": num(lo, 3), "high": num(hi, 3), "n": len(both)}
    av = targets.get("video+audio", {})
    return Summary(
        prefill_speedup=av.get("prefill_speedup") if av.get("from_layer", n) < n else None,
        targets=targets,
        baselines=baselines,
        fastv_minus_random=paired,
        max_dp=max_dp,
        fastv_layer=fastv_layer,
        n_layers=n,
        n_dev=int(dev.id.nunique()),
        n_test=int(test.id.nunique()),
    )


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def plot(tables_by_model: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Per model: the dev items' dp of the right answer with each target discarded from the x layer on (the band
    of +-max_dp dotted), and the test items' accuracy (FastV and random as points at their layer)."""
    fig = Figure(figsize=(9, 3.2 * len(tables_by_model) + 1.0), layout="constrained")
    axes = fig.subplots(len(tables_by_model), 2, squeeze=False)
    for r, (model, t) in enumerate(tables_by_model.items()):
        df = t.get("discard", pd.DataFrame())
        left, right = axes[r]
        left.set_title(f"{model}: dp of the right answer (dev, answered correctly)", fontsize=9)
        right.set_title(f"{model}: accuracy (test)", fontsize=9)
        for ax in (left, right):
            layer_axis(ax, "discarded from layer")
        left.set_ylabel("dp")
        right.set_ylabel("accuracy")
        right.set_ylim(-0.05, 1.05)
        if df.empty:
            continue
        bound = float(df.max_dp.iloc[0])
        left.axhspan(-bound, bound, color="#dddddd", label=f"|dp| < {bound:g}")
        dp = dp_map(df[df.split == "dev"])
        test = df[df.split == "test"]
        for target in [x for x in df.target.unique() if x not in (FASTV, RANDOM)]:
            if target in dp.index.get_level_values(0):
                g = dp.loc[target].sort_index()
                left.errorbar(g.index, g.dp, yerr=[g.dp - g.low, g.high - g.dp], marker="o", ms=3, label=target)
            acc = test[test.target == target].groupby("from_layer").correct.mean()
            right.plot(acc.index, acc.values, marker="o", ms=3, label=target)
        for b, marker in ((FASTV, "s"), (RANDOM, "x")):
            g = test[test.target == b]
            if len(g):
                acc = g.groupby("id").correct.mean().mean()
                right.plot([g.from_layer.iloc[0]], [acc], marker=marker, ls="none", color="black", label=b)
        base = test.drop_duplicates("id").correct_base.astype(float).mean()
        right.axhline(base, color="#777777", ls=":", lw=1, label="no discarding")
    legend_outside(fig, axes.flat, title="discarded from the x layer on", ncols=4)
    fig.suptitle("Discarding audio-visual tokens after the transfer")
    return fig


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """Per model and target: L*, its dev dp, the test accuracy change and the speed-ups; then the baselines."""
    rows: dict = {}
    for model, s in summaries.items():
        for target, r in {**s.targets, **s.baselines}.items():
            start = r.get("from_layer", s.fastv_layer)
            rows[(model, target)] = {
                "from layer": start if start is not None and start < (s.n_layers or 0) else "none qualifies",
                "dp at that layer (dev)": r.get("dp"),
                "accuracy, no discarding (test)": r.get("accuracy_base"),
                "accuracy, discarded (test)": r.get("accuracy"),
                "change": r.get("accuracy_change"),
                "change: 95% interval": interval(r.get("acc_low"), r.get("acc_high")),
                "tokens dropped per item": r.get("dropped"),
                "prefill speed-up": r.get("prefill_speedup"),
                "decoding speed-up": r.get("decode_speedup"),
                "n test": r.get("n"),
            }
    out = object_frame(rows)
    out.attrs["caption"] = (
        "Discarding tokens from a layer on: the layer chosen on dev items by the fixed rule, accuracy on test items; "
        "FastV and random dropping at FastV's layer"
    )
    return [out]


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    """Whether the tokens can be dropped after the transfer at little cost, and FastV against random dropping."""
    parts, calls = [], []
    for m, s in summaries.items():
        r = s.targets.get("video+audio")
        if r is None:
            calls.append(None)
            continue
        if r["from_layer"] >= (s.n_layers or 0):
            parts.append(f"{m}: no layer qualifies for video+audio (of {s.n_layers})")
            calls.append("disagrees")
            continue
        parts.append(
            f"{m}: video+audio from layer {r['from_layer']} of {s.n_layers}: accuracy {r.get('accuracy_base')} -> "
            f"{r.get('accuracy')} (change {r.get('accuracy_change'):+.3f}, "
            f"{interval(r.get('acc_low'), r.get('acc_high'))}, n={r.get('n')}); prefill x{r.get('prefill_speedup')}, "
            f"decoding x{r.get('decode_speedup')}"
        )
        change, low = r.get("accuracy_change"), r.get("acc_low")
        if change is None:
            calls.append(None)
        elif change >= -0.05 and low is not None and low <= 0 <= (r.get("acc_high") or 0):
            calls.append("agrees")
        elif change < -0.05 and r.get("acc_high") is not None and r["acc_high"] < 0:
            calls.append("disagrees")
        else:
            calls.append("partly")
    drop = Finding(
        "After the transfer the audio-visual tokens can be dropped at little cost",
        "P3: dropping video after layer ~26 and the question after ~29 (of 36) cuts the prefill 2288.65 -> 2089.47 ms "
        "(-8.7%) with about +-0.5 accuracy",
        "; ".join(parts) or "not measured",
        verdict(calls),
        "The layer is the first from which discarding moves the right answer's probability by less than 5% (95% "
        "interval inside +-0.05) there and in every later layer, on dev items; accuracy on test items. Agrees when "
        "the test accuracy change is >= -5 points with an interval containing 0; disagrees when no layer qualifies "
        "or accuracy falls by more than 5 points with the interval below 0. Speed-ups are wall-time medians over "
        "batches on the machine that ran them.",
    )
    parts, calls = [], []
    for m, s in summaries.items():
        d = s.fastv_minus_random
        if not d or d.get("difference") is None:
            calls.append(None)
            continue
        f, rnd = s.baselines[FASTV], s.baselines[RANDOM]
        parts.append(
            f"{m}: FastV {f.get('accuracy_change'):+.3f}, random {rnd.get('accuracy_change'):+.3f} "
            f"(FastV - random {d['difference']:+.3f} {interval(d['low'], d['high'])}, n={d['n']})"
        )
        calls.append("agrees" if d["low"] > 0 else "disagrees" if d["high"] < 0 else "partly")
    fastv = Finding(
        "Dropping the least-attended video tokens (FastV) costs less than dropping as many at random",
        "FastV: pruning the 50% least-attended image tokens after layer 2 keeps accuracy",
        "; ".join(parts) or "not measured",
        verdict(calls),
        "Test items; accuracy change against no discarding. Agrees when FastV - random (paired per item) has its 95% "
        "interval above 0, disagrees below 0, partly when the interval contains 0 (no difference resolved at this n).",
    )
    return [drop, fastv]


SPEC = Analysis(
    name=NAME,
    title="Discarding audio-visual tokens after the transfer: accuracy and speed",
    claim="After the transfer the audio-visual tokens can be dropped at little cost",
    Config=Config,
    Summary=Summary,
    headline="prefill_speedup",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    # factual clips (benchmark accuracy), both questions, batches of 16: fewer batches to time
    default_config=Config(conditions=("factual",), batch_size=16),
    paper="P3",
    about=__doc__,
)
