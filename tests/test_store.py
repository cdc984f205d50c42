"""The activation store: shards written atomically and read lazily, and the probe fitted from it equal to the
probe fitted in memory, on the organism."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import avlens
from avlens import store as store_module
from avlens.analyses import probe
from avlens.analyses.common import Item
from avlens.errors import AvlensError
from avlens.models import Sample
from avlens.organism.world import WorldConfig, render_clip
from avlens.store import ActivationStore, estimate_bytes

MODEL = "ab" * 32


def _arrays(seed: int, n: int = 5, d: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"{site}/{layer}": rng.standard_normal((n, d)).astype(np.float32)
        for site in ("audio", "last")
        for layer in (0, 1)
    }


def _rows(n: int = 5) -> list[dict]:
    return [{"id": f"clip{i}", "layer": 0, "label": None if i == 2 else "bird", "p": 0.5} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------
def test_a_shard_gives_back_what_was_written_float32_bit_exact(tmp_path):
    store = ActivationStore.open(tmp_path / "s", model_sha256=MODEL)
    shard = store.shard("probe/vision-heavy/32-0003")
    assert not shard.exists and store.shards() == []
    arrays, rows = _arrays(0), _rows()
    shard.write(rows, arrays, meta={"errors": [{"id": "x", "reason": "no audio"}]})
    assert shard.exists and store.shards() == ["probe/vision-heavy/32-0003"]
    assert shard.path.name == "probe%2Fvision-heavy%2F32-0003.safetensors"  # one file name, decodable
    again = ActivationStore.load(tmp_path / "s").shard("probe/vision-heavy/32-0003")
    assert again.rows() == rows
    assert again.meta() == {"errors": [{"id": "x", "reason": "no audio"}]}
    assert again.arrays() == sorted(arrays)
    for name, a in arrays.items():
        got = again.array(name)
        assert got.dtype == np.float32 and np.array_equal(got, a)
    with pytest.raises(KeyError, match="video/0"):
        again.array("video/0")


def test_float16_keeps_float16_precision_in_half_the_bytes(tmp_path):
    arrays = _arrays(1, n=64, d=256)
    sizes = {}
    for dtype in ("float32", "float16"):
        store = ActivationStore.open(tmp_path / dtype, model_sha256=MODEL, dtype=dtype)
        store.shard("u").write(_rows(64), arrays)
        sizes[dtype] = store.nbytes
        assert sizes[dtype] - estimate_bytes(64, 4, 256, dtype) < 20_000  # the rest is the header (rows as JSON)
        for name, a in arrays.items():
            got = store.read(name)
            assert got.dtype == np.float32
            assert np.array_equal(got, a.astype(dtype).astype(np.float32))
            assert np.allclose(got, a, rtol=2**-11, atol=2**-24)
    assert 0.45 < sizes["float16"] / sizes["float32"] < 0.55
    big = ActivationStore.open(tmp_path / "float16", model_sha256=MODEL, dtype="float16").shard("v")
    with pytest.raises(AvlensError, match="range"):  # not silently stored as infinity
        big.write([], {"last/0": np.full((1, 4), 1e5, np.float32)})
    assert not big.exists


def test_read_concatenates_the_shards_in_the_order_given(tmp_path):
    store = ActivationStore.open(tmp_path, model_sha256=MODEL)
    parts = {name: _arrays(seed, n=seed + 1) for seed, name in enumerate(["b", "a", "c"])}
    for name, arrays in parts.items():
        store.shard(name).write(_rows(len(next(iter(arrays.values())))), arrays)
    store.shard("empty").write([], {})  # a unit of which no item had the site: no rows
    assert store.shards() == ["a", "b", "c", "empty"]
    order = ["c", "a", "empty", "b"]
    got = store.read("audio/1", order)
    assert np.array_equal(got, np.concatenate([parts[s]["audio/1"] for s in ("c", "a", "b")]))
    assert np.array_equal(store.read("last/0"), np.concatenate([parts[s]["last/0"] for s in ("a", "b", "c")]))
    with pytest.raises(KeyError):
        store.read("video/0")
    with pytest.raises(AvlensError, match="not written"):
        store.read("audio/1", ["a", "missing"])


def test_read_of_one_array_reads_no_other(tmp_path, monkeypatch):
    store = ActivationStore.open(tmp_path, model_sha256=MODEL)
    for seed, name in enumerate(["u1", "u2"]):
        store.shard(name).write(_rows(), _arrays(seed))
    read = []
    real = store_module.safe_open

    class Spy:  # safe_open, recording which tensors are read (safetensors' own class cannot be patched)
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):  # get_slice, get_tensors...: anything else would be a read we did not see
            raise AssertionError(f"read through {name}")

    monkeypatch.setattr(store_module, "safe_open", Spy)
    x = store.read("last/1")
    assert x.shape == (10, 16)
    assert read == ["last/1", "last/1"]  # once per shard, nothing else


def test_a_shard_killed_while_written_is_never_a_shard(tmp_path, monkeypatch):
    store = ActivationStore.open(tmp_path, model_sha256=MODEL)
    # A real crash: a writer process SIGKILLed at the commit point leaves its complete temporary file behind.
    code = f"""
        import os, signal, numpy as np
        from avlens.store import ActivationStore
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        shard = ActivationStore.load({str(tmp_path)!r}).shard("u")
        shard.write([{{"id": 1}}], {{"last/0": np.ones((1, 4), np.float32)}})
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()
    left = list((tmp_path / "shards").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".tmp-") and left[0].stat().st_size > 0
    assert store.shards() == [] and not store.shard("u").exists and store.nbytes == 0
    with pytest.raises(AvlensError, match="not written"):
        store.read("last/0", ["u"])

    # An exception at the commit point (in this process): nothing is left, and the unit is simply redone.
    def fail(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(store_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        store.shard("v").write(_rows(), _arrays(0))
    monkeypatch.undo()
    assert not store.shard("v").exists and store.shards() == []
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [left[0].name]
    assert store.remove_temporaries() == [left[0].name]
    store.shard("u").write(_rows(), _arrays(0))
    assert store.shards() == ["u"]


def test_a_store_refuses_another_model_dtype_or_a_second_write(tmp_path):
    path = tmp_path / "store"
    store = ActivationStore.open(path, model_sha256=MODEL)
    store.shard("u").write(_rows(), _arrays(0))
    with pytest.raises(AvlensError, match=r"already written"):
        store.shard("u").write(_rows(), _arrays(1))
    assert np.array_equal(store.shard("u").array("last/0"), _arrays(0)["last/0"])  # the first write stands
    with pytest.raises(AvlensError) as e:
        ActivationStore.open(path, model_sha256="cd" * 32)
    assert str(path) in str(e.value) and "model_sha256" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AvlensError, match="dtype 'float32' \\(given 'float16'\\)"):
        ActivationStore.open(path, model_sha256=MODEL, dtype="float16")
    with pytest.raises(AvlensError, match="bfloat16"):
        ActivationStore.open(tmp_path / "other", model_sha256=MODEL, dtype="bfloat16")
    assert ActivationStore.open(path, model_sha256=MODEL).shards() == ["u"]  # the same model reopens
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(AvlensError, match="not an activation store"):
        ActivationStore.open(tmp_path / "notes", model_sha256=MODEL)
    with pytest.raises(AvlensError, match=r"no store\.json"):
        ActivationStore.load(tmp_path / "notes")


# ---------------------------------------------------------------------------------------------------------
# The probe from a store, on the organism
# ---------------------------------------------------------------------------------------------------------
SMALL = WorldConfig(height=56, width=56, fps=2)


def _item(i: int, seen: str, heard: str | None, condition: str, problem: str | None = None) -> Item:
    """An in-memory clip of the organism's world showing ``seen`` and playing ``heard`` (None: no audio)."""
    frames, wave = render_clip(seen, heard or seen, seed=i, cfg=SMALL)
    sample = Sample("What do you hear?", video=frames, audio=wave if heard else None, video_audio=False)
    sample.id = f"clip{i}__{condition}/hear"
    return Item(sample.id, sample, condition, "hear", heard, seen, heard or "nothing", problem)


@pytest.fixture(scope="module")
def organism_units():
    """The av-balanced organism and 3 units of 20 items: factual and swapped clips of 2 heard and 2 seen
    labels, an item without audio (no audio rows), one that cannot be built (an errors row) and two
    video-only clips of a class each (too few to probe: skipped rows)."""
    adapter = avlens.load("organism:av-balanced")
    items = []
    for i in range(16):
        heard = ("bird", "drum")[i % 2]
        seen = heard if i < 8 else ("engine", "clock")[(i // 2) % 2]
        items.append(_item(i, seen, heard, "factual" if i < 8 else "swapped"))
    items += [_item(16, "bell", None, "factual"), _item(17, "bell", "bee", "factual", problem="no media")]
    items += [_item(18, "bell", None, "video_only"), _item(19, "gong", None, "video_only")]  # skipped: 1 item a class
    units = {f"probe/organism/6-{k:04d}": items[k::3] for k in range(3)}
    return adapter, units


def test_the_probe_from_a_store_equals_the_probe_in_memory(organism_units, tmp_path, monkeypatch):
    adapter, units = organism_units
    config = probe.Config(folds=2, batch_size=8)
    store = ActivationStore.open(tmp_path, model_sha256=MODEL)
    memory = {u: probe.collect(adapter, items, config) for u, items in units.items()}
    stored = {u: probe.collect(adapter, items, config, store=store.shard(u)) for u, items in units.items()}
    assert store.shards() == sorted(units)

    for u in units:
        assert stored[u]["errors"] == memory[u]["errors"]
        for m, s in zip(memory[u]["features"], stored[u]["features"], strict=True):
            assert {k: v for k, v in m.items() if k != "vector"} == {
                k: v for k, v in s.items() if k not in ("row", "shard")
            }
            assert s["shard"] == u
            assert np.array_equal(store.shard(u).array(f"{s['site']}/{s['layer']}")[s["row"]], m["vector"])
    assert sum(len(t["errors"]) for t in memory.values()) == 1
    for u in units:  # one row of its array per record: the item without audio has no audio rows
        records = pd.DataFrame(stored[u]["features"])
        for name in store.shard(u).arrays():
            site, layer = name.split("/")
            assert len(store.shard(u).array(name)) == ((records.site == site) & (records.layer == int(layer))).sum()
    assert (pd.DataFrame(stored["probe/organism/6-0001"]["features"]).id == "clip16__factual/hear").any()

    in_memory = probe.finalize({"features": pd.DataFrame([r for t in memory.values() for r in t["features"]])}, config)
    features = pd.DataFrame([r for t in stored.values() for r in t["features"]])
    assert "vector" not in features
    from_store = probe.finalize({"features": features}, config, store=ActivationStore.load(tmp_path))
    # conditions, targets, sites, layers, control
    assert len(in_memory["probes"]) == 2 * 2 * 3 * (adapter.n_layers + 1) * 2
    assert len(in_memory["skipped"]) == 2  # video_only: video and last sites, visual label
    pd.testing.assert_frame_equal(from_store["probes"], in_memory["probes"])
    pd.testing.assert_frame_equal(from_store["skipped"], in_memory["skipped"])

    # A second run over the same store runs no model and gives the same records.
    def no_forward(*args, **kwargs):
        raise AssertionError("a forward was run although the unit's shard exists")

    monkeypatch.setattr(probe, "run", no_forward)
    again = {u: probe.collect(adapter, items, config, store=store.shard(u)) for u, items in units.items()}
    assert again == stored
    with pytest.raises(AvlensError, match="other items"):  # a unit of other items under the same name
        probe.collect(adapter, units["probe/organism/6-0000"][:2], config, store=store.shard("probe/organism/6-0001"))
