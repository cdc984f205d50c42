"""Path patching in ``route``: a path's patches equal forward hooks on the model's own decoder layers, every path
together from layer 0 is the clean run, and bad paths are refused in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import av_samples
from test_report import documented_columns

import avlens
from avlens.analyses import route
from avlens.analyses.common import items_from_manifest
from avlens.analyses.flow import with_other
from avlens.errors import InputError
from avlens.trace import Capture, run


@pytest.fixture(scope="module")
def pair(omni):
    """Interleaved clips, and the same clips with every frame zeroed (the corrupted run)."""
    samples = av_samples(5, 2, frames=8, seconds=4.0)
    blank = [replace(s, video=np.zeros_like(s.video)) for s in samples]
    clean, corrupt = omni.prepare(samples, interleave=True), omni.prepare(blank, interleave=True)
    n = omni.n_layers
    cap = [Capture.residual(range(n))]
    cs, rs = run(omni, clean, capture=cap), run(omni, corrupt, capture=cap)
    return clean, replace(corrupt, layout=with_other(corrupt.layout)), cs, rs


def _hooked(adapter, inputs, writes) -> torch.Tensor:
    """Last-position logits of the model's own forward with pre-hooks on its decoder layers writing, at layer i,
    values[i] at mask (B, L) for each (layers, mask, values) in writes."""
    handles = []
    for i, layer in enumerate(adapter.layers):

        def pre(_m, args, kwargs, i=i):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            for layers, mask, values in writes:
                if i in layers:
                    x[mask] = values[i][mask].to(x.dtype)
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return adapter.model(**adapter.model_inputs(inputs)).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("start", [0, 1])
def test_a_direct_path_equals_hooks_on_the_models_own_layers(omni, pair, start):
    _, corrupt, cs, rs = pair
    n, lay = omni.n_layers, corrupt.layout
    source, middle, direct = route.path_groups("p", ("video->last",))
    layout, patches = route.path_patches(
        lay, source, middle, direct, start, n, cs.captures["residual"], rs.captures["residual"], {}
    )
    got = run(omni, replace(corrupt, layout=layout), patches).logits.float()
    video = lay.mask("video") & lay.valid
    off = lay.valid & ~video & ~lay.mask("last")
    layers = range(start, n)
    want = _hooked(omni, corrupt, [(layers, video, cs.captures["residual"]), (layers, off, rs.captures["residual"])])
    assert (got - want).abs().max() < 1e-4
    assert (got - rs.logits.float()).abs().max() > 1e-4  # the patch does act


def test_a_two_hop_path_is_two_passes_of_hooks(omni, pair):
    """video->question->last: the question computed with the clean picture (all else frozen), then the answer
    reading that question with the picture and everything else corrupted."""
    _, corrupt, cs, rs = pair
    n, lay, start = omni.n_layers, corrupt.layout, 0
    clean_s, corrupt_s = cs.captures["residual"], rs.captures["residual"]
    source, middle, direct = route.path_groups("p", ("video->question", "question->last"))
    assert (source, middle, direct) == ("video", {"question"}, False)
    layout, patches = route.path_patches(lay, source, middle, direct, start, n, clean_s, corrupt_s, None)
    first = run(omni, replace(corrupt, layout=layout), patches, capture=[Capture.residual(range(n))])
    layout, patches = route.path_patches(
        lay, source, middle, direct, start, n, clean_s, corrupt_s, first.captures["residual"]
    )
    got = run(omni, replace(corrupt, layout=layout), patches).logits.float()
    video, question, last = (lay.mask(g) & lay.valid for g in ("video", "question", "last"))
    layers = range(start, n)
    # pass 1 by hooks: clean video, question free, the rest frozen; record the question's residuals
    seen = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kw, i=i: seen.__setitem__(i, (args[0] if args else kw["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, layer in enumerate(omni.layers)
    ]
    try:
        _hooked(omni, corrupt, [(layers, video, clean_s), (layers, lay.valid & ~video & ~question, corrupt_s)])
    finally:
        for h in handles:
            h.remove()
    # (the recording hooks ran before the writing ones: the question's values are the layer inputs, unwritten)
    want = _hooked(
        omni, corrupt, [(range(start + 1, n), question, seen), (layers, lay.valid & ~question & ~last, corrupt_s)]
    )
    assert (got - want).abs().max() < 1e-4


def test_every_path_from_layer_0_gives_the_clean_run(omni, pair):
    _, corrupt, cs, rs = pair
    n = omni.n_layers
    source, middle, direct = route.path_groups("all", route.PATHS[route.ALL_FROM_VIDEO])
    c, r = cs.captures["residual"], rs.captures["residual"]
    layout, patches = route.path_patches(corrupt.layout, source, middle, direct, 0, n, c, r, None)
    first = run(omni, replace(corrupt, layout=layout), patches, capture=[Capture.residual(range(n))])
    layout, patches = route.path_patches(corrupt.layout, source, middle, direct, 0, n, c, r, first.captures["residual"])
    got = run(omni, replace(corrupt, layout=layout), patches).logits
    assert (got - cs.logits).abs().max() < 1e-4


def test_bad_paths_are_refused_in_one_line():
    for edges in [
        (),
        ("video->last@same",),
        ("video->question", "audio->last"),
        ("question->video", "video->question"),
    ]:
        with pytest.raises(InputError) as e:
            route.Config(paths={"bad": edges})
        assert "\n" not in str(e.value)


def test_paths_on_the_vision_heavy_organism(tmp_path):
    from avlens.reproduce import _organism_data

    adapter = avlens.load("organism:av-vision-heavy")
    manifest = _organism_data(tmp_path, 4, 0, None)
    items = items_from_manifest(manifest, {"hear": "What do you hear?"}, conditions=("factual", "swapped"))
    config = route.Config(routes={"video->last": ("video->last",)})
    tables = {k: pd.DataFrame(v) for k, v in route.collect(adapter, items, config).items()}
    paths = tables["paths"]
    swapped = [it for it in items if it.condition == "swapped"]
    assert len(paths) == len(swapped) * len(route.PATHS) * adapter.n_layers
    every = paths[(paths.path == route.ALL_FROM_VIDEO) & (paths.from_layer == 0)]
    assert np.allclose(every.restored, 1.0, atol=1e-3) and (every.answer == every.answer_clean).all()
    s = route.summarize(tables)
    assert set(s.paths) == set(route.PATHS) and s.paths[route.ALL_FROM_VIDEO]["n"] == len(swapped)
    assert len(route.tables({"m": s})) == 2 and len(route.findings({"m": s})) == 2
    docs = documented_columns()
    missing = set(paths.columns) - docs["route.paths"] - docs["common"] - {"model"}
    assert not missing, sorted(missing)
