"""Training-free hallucination mitigation (P2): steer the answer's attention toward the cross-modal sinks, or
decode with P2's adaptive guidance, against plain decoding and two controls; measured, which P2 never did.

Methods (each applied from the answer position on: the last prompt position and every generated token):

- ``plain``: no intervention.
- ``steer_cross``: attention toward the cross-modal sinks amplified, A + alpha |A| on their columns in the
  layers from ``l0`` on, rows renormalised (P2's PAI-style form; the engine's ``Steer(mode="post")``).
- ``steer_random`` (control): the same toward as many random audio and video tokens.
- ``steer_sinks`` (control): the same toward every sink (unimodal and cross-modal).
- ``guided``: P2's adaptive guided decoding, log p = log p_plain + s_t (log p_guided - log p_plain), with the
  schedule of P2's released code (see :class:`P2Schedule`). The guided branch is defined by avlens, as P2's code
  leaves it undefined: it is the plain model with the answer's attention to every audio and video token that is
  *not* a cross-modal sink blocked (a knockout from the answer positions), so that it sees the clip only through
  the cross-modal sinks; guiding toward it is guiding toward what the sinks hold.

Sinks are found per prompt as :mod:`avlens.analyses.causal_trace` finds them (massive dimensions where some exist,
else the positions receiving the most attention); the cross-modal sinks are, within each modality's sinks (N =
the first of ``n``), the half least attended by their own modality (MDS).

Evaluation:

- yes/no probes per clip, AVHBench-style, answered by comparing the yes and no logits at the last prompt
  position: ``hear_present`` ("is there a sound of <heard>?", yes), ``see_present`` (yes), ``hear_seen_only``
  ("is there a sound of <seen>?" when the seen thing is not heard, no), ``see_heard_only`` (no), and
  ``hear_neither`` / ``see_neither`` (a label in neither modality, no);
- free descriptions (the config's question, greedy), scored by a pluggable scorer (:data:`SCORERS`; default
  ``modal``: CHAIR per modality, a label claimed as heard that is not heard, or as seen that is not seen, is a
  hallucination; ``labels``: plain CHAIR, a named label neither seen nor heard).

Hyper-parameters (alpha x l0 for each steering method, the base for guidance) are chosen on the ``dev`` split
(half of the clips, by a hash of their id) by the yes/no balanced accuracy (mean of the accuracy on present and
on absent probes), and reported on the ``test`` split. Cost per generated token is timed against plain decoding
on the same batch.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..data import article
from ..errors import InputError
from ..models.base import Adapter
from ..trace import Capture, Knockout, Steer, generate, generate_guided, run, run_conditions
from .base import Analysis, Finding, Needs, num, verdict
from .causal_trace import (
    DIFFERENCE_RULE,
    SinkSettings,
    difference_call,
    mean_ci,
    sink_captures,
    sink_scores,
    token_sets,
)
from .common import Item, first_token, split_of, words
from .plotting import legend_outside

NAME = "mitigate"
METHODS = ("plain", "steer_cross", "steer_random", "steer_sinks", "guided")
PROBES = ("hear_present", "see_present", "hear_seen_only", "see_heard_only", "hear_neither", "see_neither")
ABSENT = PROBES[2:]


@dataclass(frozen=True)
class Config(SinkSettings):
    """The sink settings (:class:`~avlens.analyses.causal_trace.SinkSettings`), and: ``questions``: the description
    prompt; ``hear_yn`` / ``see_yn``: the yes/no templates ({a} the article, {x} the label); ``yes`` / ``no``: the
    answer words; ``labels``: every label of the data (the probes' absent classes and the description scorer's
    vocabulary; empty: the labels of the unit's items); ``methods``; ``alphas`` x ``starts`` (first steered
    layer as a share of the depth): the steering grid; ``bases``: the guidance grid (P2's 0.5);
    ``guidance_layers``: the share of the depth whose attention drives the schedule (P2's layers 18-25 of 28);
    ``scorer``: a name of :data:`SCORERS`; ``max_new_tokens``: longest description."""

    questions: dict[str, str] = field(default_factory=lambda: {"describe": "Describe what you see and hear."})
    conditions: tuple[str, ...] = ("swapped",)
    hear_yn: str = "Is there a sound of {a} {x}?"
    see_yn: str = "Do you see {a} {x}?"
    yes: str = "yes"
    no: str = "no"
    labels: tuple[str, ...] = ()
    methods: tuple[str, ...] = METHODS
    alphas: tuple[float, ...] = (0.2, 2.0)
    starts: tuple[float, ...] = (0.25, 0.5)
    bases: tuple[float, ...] = (0.5, 1.0)
    guidance_layers: tuple[float, float] = (18 / 28, 26 / 28)
    scorer: str = "modal"
    max_new_tokens: int = 16
    batch_size: int = 8
    draws: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method '{unknown[0]}' (methods: {', '.join(METHODS)})")
        if self.scorer not in SCORERS:
            raise InputError(f"unknown scorer '{self.scorer}' (scorers: {', '.join(SCORERS)})")
        if any(a <= -1 for a in self.alphas) or any(not 0 <= s < 1 for s in self.starts):
            raise InputError("alphas must be > -1 and starts shares of the depth in [0, 1)")


# ---------------------------------------------------------------------------------------------------------
# Scorers of free descriptions
# ---------------------------------------------------------------------------------------------------------
Scorer = Callable[[str, Item, Sequence[str]], tuple[list[str], list[str]]]


def labels_scorer(text: str, item: Item, vocabulary: Sequence[str]) -> tuple[list[str], list[str]]:
    """(labels named in ``text``, those neither seen nor heard in the item's clip): CHAIR over a label set."""
    said = set(words(text))
    named = [label for label in vocabulary if set(words(label)) and set(words(label)) <= said]
    present = {item.audio_label, item.visual_label}
    return named, [label for label in named if label not in present]


SEE_WORDS = frozenset({"see", "sees", "seen", "saw", "shows", "showing", "visible", "watch", "look", "looks"})
HEAR_WORDS = frozenset({"hear", "hears", "heard", "sound", "sounds", "listen", "audio", "noise"})


def modal_scorer(text: str, item: Item, vocabulary: Sequence[str]) -> tuple[list[str], list[str]]:
    """CHAIR by modality: a label named after a seeing word ("see", "shows", ...) and before the next hearing
    word is claimed as seen, after a hearing word ("hear", "sound", ...) as heard; a claim is a hallucination when
    the clip does not have it in that modality (hearing the seen thing on a swapped clip counts). Labels named
    before any such word are scored as by :func:`labels_scorer` (neither seen nor heard)."""
    tokens = words(text)
    named, wrong = [], []
    modality = None
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in SEE_WORDS:
            modality = "see"
        elif t in HEAR_WORDS:
            modality = "hear"
        for label in vocabulary:
            parts = words(label)
            if parts and tokens[i : i + len(parts)] == parts:
                named.append(label)
                truth = {"see": {item.visual_label}, "hear": {item.audio_label}}.get(
                    modality, {item.audio_label, item.visual_label}
                )
                if label not in truth:
                    wrong.append(label)
                break
        i += 1
    return named, wrong


SCORERS: dict[str, Scorer] = {"modal": modal_scorer, "labels": labels_scorer}
"""Description scorers by name; add one with ``SCORERS["mine"] = fn`` (text, item, vocabulary) -> (named,
hallucinated)."""


# ---------------------------------------------------------------------------------------------------------
# The guidance schedule of P2's released code
# ---------------------------------------------------------------------------------------------------------
class P2Schedule:
    """s_t of P2's adaptive guided decoding, from the plain branch's last query in ``layers``: w = its attention
    to the cross-modal sinks / to every sink, T = its attention to the text after the last audio/video token;
    target = min(0.6, base w), x 0.5 (1 + cos(pi min(1, (T - 0.4) / 0.2))) when T > 0.4, x (w / 0.6)^2 when
    w < 0.6; s_t = 0.5 s_{t-1} + 0.5 target (s_{-1} = 0). Means over heads and layers."""

    def __init__(self, base: float, layers: Sequence[int]) -> None:
        self.base, self.layers = base, list(layers)

    def captures(self) -> list:
        keys = ["mit_cross", "mit_sinks", "mit_after"]
        return [Capture.attention("last+generated", keys, layers=self.layers, name="guidance_mass")]

    def weight(self, step: int, mass: Mapping[str, Mapping[int, torch.Tensor]], previous: torch.Tensor) -> torch.Tensor:
        m = torch.stack([mass["guidance_mass"][i] for i in self.layers]).mean((0, 2))  # (R, 3)
        cross, all_sinks, after = m[:, 0], m[:, 1], m[:, 2]
        w = torch.where(all_sinks > 0, cross / all_sinks.clamp(min=1e-12), torch.zeros_like(cross))
        target = torch.clamp(self.base * w, max=0.6)
        taper = 0.5 * (1 + torch.cos(math.pi * torch.clamp((after - 0.4) / 0.2, max=1.0)))
        target = torch.where(after > 0.4, target * taper, target)
        target = torch.where(w < 0.6, target * (w / 0.6) ** 2, target)
        return 0.5 * previous.to(target.device) + 0.5 * target


def guidance_layers(config: Config, n_layers: int) -> list[int]:
    """The layers driving the schedule: the config's share of the depth (18-25 of 28 by default)."""
    lo, hi = config.guidance_layers
    first = min(n_layers - 1, math.floor(lo * n_layers))
    return list(range(first, max(first + 1, min(n_layers, math.ceil(hi * n_layers)))))


# ---------------------------------------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------------------------------------
def probes_of(item: Item, config: Config, vocabulary: Sequence[str]) -> list[tuple[str, str, str]]:
    """The yes/no probes of an item's clip: (kind, prompt, expected answer)."""
    heard, seen = item.audio_label, item.visual_label
    others = [c for c in vocabulary if c not in (heard, seen)]
    neither = others[zlib.crc32(item.clip.encode()) % len(others)] if others else None

    def ask(template: str, x: str) -> str:
        return template.format(a=article(x), x=x)

    out = []
    if heard:
        out.append(("hear_present", ask(config.hear_yn, heard), config.yes))
    if seen:
        out.append(("see_present", ask(config.see_yn, seen), config.yes))
    if seen and seen != heard:
        out.append(("hear_seen_only", ask(config.hear_yn, seen), config.no))
    if heard and heard != seen:
        out.append(("see_heard_only", ask(config.see_yn, heard), config.no))
    if neither:
        out.append(("hear_neither", ask(config.hear_yn, neither), config.no))
        out.append(("see_neither", ask(config.see_yn, neither), config.no))
    return out


def settings(config: Config, n_layers: int) -> dict[str, list[tuple[str, dict]]]:
    """method -> [(setting name, its values)]: the grid each method is tuned over."""
    grid: dict[str, list[tuple[str, dict]]] = {}
    for m in config.methods:
        if m == "plain":
            grid[m] = [("-", {})]
        elif m == "guided":
            grid[m] = [(f"base={b:g}", {"base": b}) for b in config.bases]
        else:
            grid[m] = [
                (f"alpha={a:g},l0={round(s * n_layers)}", {"alpha": a, "l0": round(s * n_layers)})
                for a in config.alphas
                for s in config.starts
            ]
    return grid


def _groups(adapter: Adapter, inputs, items: list[Item], config: Config):
    """The inputs with the groups every method needs: mit_cross (cross-modal sinks), mit_sinks (every sink),
    mit_random (random media tokens, as many as mit_cross), mit_masked (media tokens that are not cross-modal
    sinks: what the guided branch cannot attend to), mit_after (text after the last media token)."""
    layout = inputs.layout
    clean = run(adapter, inputs, capture=sink_captures(layout, adapter.n_layers))
    definition, _, scores = sink_scores(adapter, clean, layout, [it.id for it in items], config)
    masks: dict[str, list[torch.Tensor]] = {k: [] for k in ("cross", "sinks", "random", "masked", "after")}
    for b, it in enumerate(items):
        valid = layout.valid[b]
        hits, received, mds = scores[b]
        media = torch.zeros_like(valid)
        cross, every = torch.zeros_like(valid), torch.zeros_like(valid)
        for modality in ("video", "audio"):
            if modality not in layout.groups:
                continue
            own = layout.groups[modality][b] & valid
            media |= own
            rng = np.random.default_rng([config.seed, zlib.crc32(it.id.encode())])
            sets = token_sets(own, valid, hits, received, mds, modality, replace(config, draws=1), rng)
            cross |= sets["cross_modal"]
            every |= sets[f"sinks_n{config.n[0]}"]
        rng = np.random.default_rng([config.seed, 1, zlib.crc32(it.id.encode())])
        pool, count = media.nonzero().flatten().numpy(), int(cross.sum())
        rand = torch.zeros_like(valid)
        if count:
            rand[torch.from_numpy(rng.choice(pool, size=count, replace=False))] = True
        last_media = int(media.nonzero().max()) if media.any() else -1
        after = valid & (torch.arange(len(valid)) > last_media)
        for k, v in (
            ("cross", cross),
            ("sinks", every),
            ("random", rand),
            ("masked", media & ~cross),
            ("after", after),
        ):
            masks[k].append(v)
    for k, v in masks.items():
        layout = layout.with_group(f"mit_{k}", torch.stack(v))
    return replace(inputs, layout=layout), definition, {k: torch.stack(v).sum(1) for k, v in masks.items()}


def _interventions(method: str, values: dict, n_layers: int, query: str) -> list:
    key = {"steer_cross": "mit_cross", "steer_random": "mit_random", "steer_sinks": "mit_sinks"}[method]
    return [Steer(key, layers=range(values["l0"], n_layers), alpha=values["alpha"], query=query)]


def _guided(query: str, n_layers: int) -> list:
    """The guided branch: the answer cannot attend to media tokens that are not cross-modal sinks (all layers)."""
    return [Knockout(query, "mit_masked", layers=range(n_layers))]


def collect(adapter: Adapter, items: list[Item], config: Config) -> dict[str, list[dict]]:
    """Tables ``probes`` (item x probe x method x setting: the answer, P(yes) against P(no), right or not),
    ``descriptions`` (item x method x setting: the text, labels named, hallucinated), ``sets`` (item: the size
    of each token set and the sink definition) and ``costs`` (batch x method x setting: time and tokens)."""
    n_layers = adapter.n_layers
    out: dict[str, list[dict]] = {"probes": [], "descriptions": [], "sets": [], "costs": [], "errors": []}
    usable = []
    for it in items:
        if it.problem is not None:
            out["errors"].append({"id": it.id, "condition": it.condition, "file": None, "reason": it.problem})
        else:
            usable.append(it)
    vocabulary = list(config.labels) or sorted({x for it in usable for x in (it.audio_label, it.visual_label) if x})
    scorer = SCORERS[config.scorer]
    grid = settings(config, n_layers)
    yes, no = first_token(adapter, config.yes), first_token(adapter, config.no)
    layers = guidance_layers(config, n_layers)
    for s in range(0, len(usable), config.batch_size):
        chunk = usable[s : s + config.batch_size]
        _descriptions(adapter, chunk, config, grid, vocabulary, scorer, layers, out)
        probe_items = [
            replace(
                it,
                id=f"{it.id}:{kind}",
                sample=replace(it.sample, prompt=prompt, id=f"{it.id}:{kind}"),
                kind=kind,
                expected=expected,
            )
            for it in chunk
            for kind, prompt, expected in probes_of(it, config, vocabulary)
        ]
        _probes(adapter, probe_items, config, grid, yes, no, layers, out)
    return out


def _prepared(adapter: Adapter, items: list[Item], out: dict):
    """Inputs of the items (audio in video interleaved); items that cannot be built go to errors."""
    try:
        inputs = adapter.prepare([it.sample for it in items], interleave=True)
    except InputError as e:
        out["errors"] += [{"id": it.id, "condition": it.condition, "file": e.path, "reason": e.problem} for it in items]
        return None, []
    failed = {e.sample: e for e in inputs.errors}
    for it in items:
        if it.id in failed:
            e = failed[it.id]
            out["errors"].append({"id": it.id, "condition": it.condition, "file": e.path, "reason": e.problem})
    return inputs, [it for it in items if it.id not in failed]


def _probes(adapter, items, config, grid, yes, no, layers, out) -> None:
    for s in range(0, len(items), config.batch_size):
        inputs, kept = _prepared(adapter, items[s : s + config.batch_size], out)
        if not kept:
            continue
        inputs, _, _ = _groups(adapter, inputs, kept, config)
        conditions = {
            f"{m}|{name}": _interventions(m, values, adapter.n_layers, "last")
            for m, options in grid.items()
            if m.startswith("steer")
            for name, values in options
        }
        traces = run_conditions(adapter, inputs, {"plain|-": [], **conditions})
        logits = {k: t.logits.log_softmax(-1) for k, t in traces.items() if k != "plain|-" or "plain" in grid}
        for name, values in grid.get("guided", []):
            sched = P2Schedule(values["base"], layers)
            logits[f"guided|{name}"] = generate_guided(
                adapter, inputs, _guided("last+generated", adapter.n_layers), weight=sched, max_new_tokens=1
            ).logits
        for key, lp in logits.items():
            method, setting = key.split("|")
            for b, it in enumerate(kept):
                p_yes = float(lp[b, yes].exp() / (lp[b, yes].exp() + lp[b, no].exp()))
                answer = config.yes if lp[b, yes] > lp[b, no] else config.no
                out["probes"].append(
                    it.record(
                        item=it.id.rpartition(":")[0],
                        probe=it.kind,
                        method=method,
                        setting=setting,
                        split=split_of(it.clip),
                        answer=answer,
                        p_yes=p_yes,
                        correct=answer == it.expected,
                    )
                )


def _descriptions(adapter, chunk, config, grid, vocabulary, scorer, layers, out) -> None:
    inputs, kept = _prepared(adapter, chunk, out)
    if not kept:
        return
    inputs, definition, sizes = _groups(adapter, inputs, kept, config)
    for b, it in enumerate(kept):
        out["sets"].append(it.record(definition=definition, **{f"n_{k}": int(v[b]) for k, v in sizes.items()}))
    for method, name, values in [(m, n, v) for m, options in grid.items() for n, v in options]:
        start = time.perf_counter()
        if method == "plain":
            trace = generate(adapter, inputs, max_new_tokens=config.max_new_tokens)
        elif method == "guided":
            sched = P2Schedule(values["base"], layers)
            trace = generate_guided(
                adapter,
                inputs,
                _guided("last+generated", adapter.n_layers),
                weight=sched,
                max_new_tokens=config.max_new_tokens,
            )
        else:
            ivs = _interventions(method, values, adapter.n_layers, "last+generated")
            trace = generate(adapter, inputs, ivs, max_new_tokens=config.max_new_tokens)
        seconds = time.perf_counter() - start
        tokens = int((trace.tokens >= 0).sum())
        out["costs"].append(
            {
                "id": kept[0].id,
                "method": method,
                "setting": name,
                "seconds": seconds,
                "tokens": tokens,
                "rows": len(kept),
            }
        )
        for b, it in enumerate(kept):
            named, wrong = scorer(trace.text[b], it, vocabulary)
            out["descriptions"].append(
                it.record(
                    method=method,
                    setting=name,
                    split=split_of(it.clip),
                    text=trace.text[b],
                    named=",".join(named),
                    hallucinated=",".join(wrong),
                    n_named=len(named),
                    n_hallucinated=len(wrong),
                )
            )


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------
def _balanced(df: pd.DataFrame) -> float:
    """Mean of the accuracy on present probes and on absent probes (NaN when either is missing)."""
    present, absent = df[~df.probe.isin(ABSENT)], df[df.probe.isin(ABSENT)]
    if present.empty or absent.empty:
        return math.nan
    return 0.5 * (present.correct.mean() + absent.correct.mean())


def chosen_settings(probes: pd.DataFrame) -> dict[str, str]:
    """method -> the setting with the best balanced accuracy on the dev split (ties: the first in grid order)."""
    dev = probes[probes.split == "dev"]
    out = {}
    for method, sel in probes.groupby("method", sort=False):
        options = list(dict.fromkeys(sel.setting))
        scores = [_balanced(dev[(dev.method == method) & (dev.setting == o)]) for o in options]
        finite = [(sc, -i) for i, sc in enumerate(scores) if sc == sc]
        out[method] = options[-max(finite)[1]] if finite else options[0]
    return out


def _per_item_balanced(df: pd.DataFrame) -> pd.Series:
    """Per clip: the mean of its present-probe accuracy and its absent-probe accuracy (for paired intervals)."""
    df = df.assign(absent=df.probe.isin(ABSENT))
    per = df.groupby(["item", "absent"]).correct.mean().unstack()
    return per.mean(axis=1)


@dataclass(frozen=True)
class Summary:
    """Test-split figures, each method at the setting chosen on the dev split (``chosen``): ``balanced`` (mean of
    present and absent probe accuracy), ``present`` / ``absent`` accuracy, ``by_probe`` accuracies, ``gain``
    (balanced accuracy minus plain's, paired per clip: mean, 95% low, high), ``chair_i`` (hallucinated / named
    labels in descriptions) and ``chair_s`` (share of descriptions with a hallucinated label), ``cost`` (seconds
    per generated token over plain's); ``cross_gain``: steer_cross's gain; ``n_test``: clips in the test split."""

    n_items: int
    n_test: int
    cross_gain: float | None
    chosen: dict[str, str] = field(default_factory=dict)
    balanced: dict[str, float | None] = field(default_factory=dict)
    present: dict[str, float | None] = field(default_factory=dict)
    absent: dict[str, float | None] = field(default_factory=dict)
    by_probe: dict[str, dict[str, float | None]] = field(default_factory=dict)
    gain: dict[str, list[float | None]] = field(default_factory=dict)
    chair_i: dict[str, float | None] = field(default_factory=dict)
    chair_s: dict[str, float | None] = field(default_factory=dict)
    cost: dict[str, float | None] = field(default_factory=dict)
    definition: str | None = None


def summarize(tables: dict[str, pd.DataFrame]) -> Summary:
    probes = tables.get("probes", pd.DataFrame())
    desc = tables.get("descriptions", pd.DataFrame())
    costs = tables.get("costs", pd.DataFrame())
    sets = tables.get("sets", pd.DataFrame())
    if probes.empty or "method" not in probes:
        return Summary(0, 0, None)
    chosen = chosen_settings(probes)
    test = probes[probes.split == "test"]
    pick = [test[(test.method == m) & (test.setting == v)] for m, v in chosen.items()]
    at = dict(zip(chosen, pick, strict=True))
    plain = _per_item_balanced(at["plain"]) if "plain" in at and not at["plain"].empty else None
    out: dict[str, dict] = {
        k: {} for k in ("balanced", "present", "absent", "by_probe", "gain", "chair_i", "chair_s", "cost")
    }
    for m, df in at.items():
        out["balanced"][m] = num(_balanced(df), 3) if not df.empty else None
        out["present"][m] = num(df[~df.probe.isin(ABSENT)].correct.mean(), 3) if not df.empty else None
        out["absent"][m] = num(df[df.probe.isin(ABSENT)].correct.mean(), 3) if not df.empty else None
        out["by_probe"][m] = {k: num(g.correct.mean(), 3) for k, g in df.groupby("probe")}
        if plain is not None and m != "plain" and not df.empty:
            diff = (_per_item_balanced(df) - plain).dropna().to_numpy()
            out["gain"][m] = [num(v, 3) for v in mean_ci(diff)]
        d = desc[(desc.method == m) & (desc.setting == chosen[m]) & (desc.split == "test")] if not desc.empty else desc
        named = d.n_named.sum() if not d.empty else 0
        out["chair_i"][m] = num(d.n_hallucinated.sum() / named, 3) if named else None
        out["chair_s"][m] = num((d.n_hallucinated > 0).mean(), 3) if not d.empty else None
    if not costs.empty and "plain" in chosen:

        def per_token(m: str) -> float:
            c = costs[(costs.method == m) & (costs.setting == chosen[m])]
            return c.seconds.sum() / max(1, c.tokens.sum())

        base = per_token("plain")
        out["cost"] = {m: num(per_token(m) / base, 3) if base > 0 else None for m in chosen}
    gain = out["gain"].get("steer_cross")
    return Summary(
        n_items=int(probes.item.nunique()),
        n_test=int(test.item.nunique()),
        cross_gain=gain[0] if gain else None,
        chosen=chosen,
        definition=", ".join(sorted(sets.definition.dropna().unique())) or None if not sets.empty else None,
        **out,
    )


def tables(summaries: dict[str, Summary]) -> list[pd.DataFrame]:
    """Per model and method (at its dev-chosen setting): test-split yes/no accuracy (balanced, present, absent),
    the gain over plain decoding with its interval, CHAIR on descriptions and the cost per token."""
    from .tables import object_frame

    rows = {}
    for model, s in summaries.items():
        for m, setting in s.chosen.items():
            g = s.gain.get(m)
            rows[(model, m)] = {
                "setting (chosen on dev)": setting,
                "balanced accuracy": s.balanced.get(m),
                "present": s.present.get(m),
                "absent": s.absent.get(m),
                "gain over plain": g[0] if g else None,
                "gain 95% CI": f"{g[1]:+.3f} to {g[2]:+.3f}" if g and g[1] is not None else "",
                "CHAIR_i": s.chair_i.get(m),
                "CHAIR_s": s.chair_s.get(m),
                "cost per token (x plain)": s.cost.get(m),
                "n clips": s.n_test,
            }
    out = object_frame(rows)
    out.attrs["caption"] = (
        "Mitigation on the test split, each method at the setting chosen on the dev split. P2 released no numbers "
        "for its mitigation."
    )
    return [out]


def plot(tables_by_model: dict[str, dict[str, pd.DataFrame]]) -> Figure:
    """Per model: test-split accuracy on present and absent probes of each method at its dev-chosen setting."""
    fig = Figure(figsize=(5 * len(tables_by_model), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tables_by_model), squeeze=False)[0]
    for ax, (model, t) in zip(axes, tables_by_model.items(), strict=True):
        probes = t.get("probes", pd.DataFrame())
        if probes.empty:
            ax.set_title(f"{model}: no probes")
            ax.set_axis_off()
            continue
        chosen = chosen_settings(probes)
        test = probes[probes.split == "test"]
        methods = list(chosen)
        x = np.arange(len(methods))
        for k, (label, absent, color) in enumerate((("present", False, "#1b9e77"), ("absent", True, "#d95f02"))):
            vals = []
            for m in methods:
                df = test[(test.method == m) & (test.setting == chosen[m])]
                df = df[df.probe.isin(ABSENT) == absent]
                vals.append(df.correct.mean() if not df.empty else np.nan)
            ax.bar(x + (k - 0.5) * 0.38, vals, width=0.38, color=color, label=f"{label} probes")
        ax.set_xticks(x, [m.replace("_", " ") for m in methods], rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("method (at its dev-chosen setting)")
        ax.set_ylabel("yes/no accuracy (test split)")
        ax.set_title(f"{model}: n = {test.item.nunique()} clips")
    legend_outside(fig, axes)
    fig.suptitle("Hallucination mitigation: each method at its dev-chosen setting")
    return fig


def findings(summaries: dict[str, Summary]) -> list[Finding]:
    def said(s: Summary, m: str) -> str:
        g = s.gain.get(m)
        if not g or g[0] is None:
            return f"{m} not measured"
        ctrl = ", ".join(
            f"{c} {s.gain[c][0]:+.3f}"
            for c in ("steer_random", "steer_sinks")
            if s.gain.get(c) and s.gain[c][0] is not None
        )
        cost = s.cost.get(m)
        extra = f"; controls: {ctrl}" if ctrl and m == "steer_cross" else ""
        return (
            f"balanced accuracy {s.balanced.get('plain')} -> {s.balanced.get(m)} (gain {g[0]:+.3f}, 95% CI "
            f"{g[1]:+.3f} to {g[2]:+.3f}){extra}; CHAIR_i {s.chair_i.get('plain')} -> {s.chair_i.get(m)}; "
            f"cost x{cost}"
        )

    out = []
    for m, claim in (
        ("steer_cross", "Steering attention toward the cross-modal sinks reduces hallucination"),
        ("guided", "Adaptive guided decoding toward the cross-modal sinks reduces hallucination"),
    ):
        out.append(
            Finding(
                claim,
                "proposed; no numbers released (364 VGGSound animal clips, captions)",
                "; ".join(f"{model}: {said(s, m)}" for model, s in summaries.items()),
                verdict([difference_call(s.gain.get(m)) for s in summaries.values()]),
                "Yes/no probes with absent classes in both directions, test split, settings chosen on dev; the gain is "
                f"paired per clip. {DIFFERENCE_RULE}.",
            )
        )
    return out


CLAIM = "Relying on the cross-modal sinks (by steering or guided decoding) reduces hallucination"

SPEC = Analysis(
    name=NAME,
    title="Hallucination mitigation",
    claim=CLAIM,
    Config=Config,
    Summary=Summary,
    headline="cross_gain",
    collect=collect,
    summarize=summarize,
    findings=findings,
    plot=plot,
    tables=tables,
    default_config=Config(),
    needs=Needs(generation=True),
    paper="P2",
    about=__doc__,
)
