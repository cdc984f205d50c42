"""The run directory: resume after SIGKILL without loss or duplicates, atomic unit writes, config refusal."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import avlens
from avlens.errors import AvlensError
from avlens.runs import RunDir, config_hash, unit_key

CONFIG = {"analysis": "counterfactual", "layers": [0, 1, 2], "seed": 0}

# A run of many small units, two tables per unit. It is spawned and killed many times, so it loads
# avlens.runs without the package __init__ (which imports torch and takes seconds): a bare package module
# whose __path__ is the avlens directory lets the relative imports of runs.py work unchanged.
WORKER = r"""
import sys, time, types
package = types.ModuleType("avlens")
package.__path__ = [sys.argv[1]]
sys.modules["avlens"] = package
from avlens.runs import RunDir

out, n_units, pause, stall = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
if stall >= 0:  # hang inside unit `stall`'s write, after its shards are written and before its commit point
    import os
    rename, calls = os.rename, [0]
    def stalling_rename(src, dst):
        calls[0] += 1
        if calls[0] > stall:
            print("in-write", flush=True)
            time.sleep(600)
        return rename(src, dst)
    os.rename = stalling_rename
run = RunDir.open(out, {"analysis": "kill-test", "units": n_units}, meta={"seed": 0})
print("ready", flush=True)
for i in range(n_units):
    unit = f"kill/group-{i % 3}/batch-{i:03d}"
    if run.done(unit):
        continue
    layers = [{"unit": i, "layer": l, "score": i * 0.5 + l, "ok": l % 2 == 0, "label": f"s{i}",
               "note": None if l else "first", "vec": [float(i), float(l), 0.25]} for l in range(4)]
    heads = [{"unit": i, "layer": l, "head": h, "weight": (i + l + h) / 7.0} for l in range(2) for h in range(3)]
    run.write_many(unit, {"layers": layers, "heads": heads})
    time.sleep(pause)
run.consolidate()
print("finished", flush=True)
"""


def _spawn(script: Path, out: Path, n_units: int, pause: float, stall: int = -1) -> subprocess.Popen:
    package_dir = str(Path(avlens.__file__).parent)
    cmd = [sys.executable, str(script), package_dir, str(out), str(n_units), str(pause), str(stall)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.splitlines()[-1] == "finished"


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values(keys).reset_index(drop=True)


def test_killed_run_resumes_to_the_records_of_an_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n_units, pause = 200, 0.004

    reference = tmp_path / "reference"
    _finish(_spawn(script, reference, n_units, 0.0))

    out = tmp_path / "killed"
    # First a kill that lands inside a unit's write for sure: the worker hangs before the commit point of
    # its 31st write (shards written, fsynced, not yet renamed) and says so; it is killed right there.
    proc = _spawn(script, out, n_units, pause, stall=30)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert proc.stdout.readline().strip() == "in-write", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any((out / "units").glob(".tmp-*")), "the kill inside a write left no temporary directory"
    progress = [len(RunDir.load(out).units())]
    assert progress == [30]
    # Then kills at random moments, which land wherever they land (between writes or inside one).
    rng = random.Random(1234)
    for _ in range(4):
        proc = _spawn(script, out, n_units, pause)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress.append(len(RunDir.load(out).units()))
    assert progress[-1] < n_units, f"the kills came too late to interrupt anything: {progress}"
    assert progress == sorted(progress), "a kill lost units that were already done"
    _finish(_spawn(script, out, n_units, 0.0))

    done, ref = RunDir.load(out), RunDir.load(reference)
    assert done.units() == ref.units() and len(done.units()) == n_units
    assert done.table_names() == ["heads", "layers"]
    for name, keys in {"layers": ["unit", "layer"], "heads": ["unit", "layer", "head"]}.items():
        got, want = _sorted(done.table(name), keys), _sorted(ref.table(name), keys)
        assert not got.duplicated(keys).any()
        pd.testing.assert_frame_equal(got, want)
        pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "results" / f"{name}.parquet"), keys), want)
    leftovers = [p for p in out.rglob(".tmp-*")]
    assert leftovers == []
    assert len(json.loads((out / "run.json").read_text())["resumes"]) == len(progress)


@pytest.mark.parametrize("crash_at", ["second shard", "rename"])
def test_interrupted_unit_write_is_not_done_and_is_redone(tmp_path, monkeypatch, crash_at):
    run = RunDir.open(tmp_path, CONFIG)
    run.write("u/0", "a", [{"x": 0}])
    records = {"a": [{"x": 1}], "b": [{"y": 1.5}]}

    if crash_at == "second shard":
        real = pq.write_table

        def write_table(table, where, *args, **kwargs):
            if "y" in table.column_names:
                raise OSError("disk full (simulated)")
            return real(table, where, *args, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)
    else:

        def rename(src, dst):
            raise OSError("crash before the rename (simulated)")

        monkeypatch.setattr(os, "rename", rename)

    with pytest.raises(OSError, match="simulated"):
        run.write_many("u/1", records)
    monkeypatch.undo()

    assert not run.done("u/1")
    assert run.units() == ["u/0"]
    assert run.table("a")["x"].tolist() == [0]
    assert run.table("b").empty
    run.write_many("u/1", records)  # redone
    assert run.done("u/1")
    assert run.table("a")["x"].tolist() == [0, 1]
    assert run.table("b")["y"].tolist() == [1.5]


def test_changed_config_is_refused_with_a_clear_message(tmp_path):
    RunDir.open(tmp_path, CONFIG).close()
    changed = {**CONFIG, "layers": [0, 1], "extra": True}
    with pytest.raises(AvlensError) as e:
        RunDir.open(tmp_path, changed)
    message = str(e.value)
    assert config_hash(CONFIG)[:12] in message and config_hash(changed)[:12] in message
    assert "extra, layers" in message
    assert "another --out" in message and "delete" in message


def test_changed_meta_is_refused(tmp_path):
    RunDir.open(tmp_path, CONFIG, meta={"model_sha256": "aaa", "seed": 0}).close()
    with pytest.raises(AvlensError, match="model_sha256"):
        RunDir.open(tmp_path, CONFIG, meta={"model_sha256": "bbb", "seed": 0})
    RunDir.open(tmp_path, CONFIG, meta={"seed": 0}).close()  # a subset agrees


def test_same_config_resumes(tmp_path):
    with RunDir.open(tmp_path, CONFIG, meta={"seed": 0}) as run:
        run.write("batch/0", "scores", [{"i": 0, "v": 0.5}])
        started = run.info["started"]
    # Key order and tuple-vs-list do not change the canonical config.
    reordered = {"seed": 0, "layers": (0, 1, 2), "analysis": "counterfactual"}
    with RunDir.open(tmp_path, reordered, meta={"seed": 0}) as run:
        assert run.done("batch/0") and not run.done("batch/1")
        run.write("batch/1", "scores", [{"i": 1, "v": 1.5}])
        assert run.table("scores")["i"].tolist() == [0, 1]
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"] == json.loads(json.dumps(CONFIG))
    assert info["config_hash"] == config_hash(CONFIG)
    assert info["started"] == started and len(info["resumes"]) == 1
    assert set(info["versions"]) == {"python", "torch", "transformers", "avlens", "numpy"}
    assert info["meta"] == {"seed": 0}


def test_temp_leftovers_are_ignored_and_cleaned(tmp_path):
    with RunDir.open(tmp_path, CONFIG) as run:
        run.write("u/0", "t", [{"x": 0}])
    # What a run killed in the middle of a unit, a consolidation and a write_json leaves behind.
    half = tmp_path / "units" / ".tmp-u%2F1-abcd"
    half.mkdir()
    pq.write_table(pa.table({"x": [99]}), half / "t.parquet")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / ".tmp-t.parquet-xyz").write_bytes(b"PAR1 half")
    (tmp_path / ".tmp-summary.json-xyz").write_text("{")

    reader = RunDir.load(tmp_path)  # a reader ignores them
    assert reader.units() == ["u/0"] and reader.table("t")["x"].tolist() == [0]
    assert not reader.done("u/1")
    with RunDir.open(tmp_path, CONFIG) as run:  # and the next writer deletes them
        assert list(tmp_path.rglob(".tmp-*")) == []
        assert run.table("t")["x"].tolist() == [0]


def test_value_types_empty_tables_and_consolidate(tmp_path):
    with RunDir.open(tmp_path, CONFIG) as run:
        assert run.table("missing").empty
        run.write("u/0", "t", [{"s": "a", "i": 1, "f": 0.5, "b": True, "n": None, "vec": [0.1, 0.2]}])
        run.write("u/1", "t", [{"s": "b", "i": 2, "f": 1, "b": False, "n": 3.5, "vec": None}])  # int in a float column
        run.write("u/2", "t", [])  # no records: done, no shard
        run.write_many("u/3", {})
        assert run.done("u/2") and run.done("u/3")
        df = run.table("t")
        assert df["s"].tolist() == ["a", "b"] and df["i"].tolist() == [1, 2]
        assert df["f"].tolist() == [0.5, 1.0] and df["b"].tolist() == [True, False]
        assert pd.isna(df["n"][0]) and df["n"][1] == 3.5
        assert list(df["vec"][0]) == [0.1, 0.2] and df["vec"][1] is None
        paths = run.consolidate()
        assert list(paths) == ["t"]
        pd.testing.assert_frame_equal(pd.read_parquet(paths["t"]), df)


def test_bad_records_write_nothing(tmp_path):
    with RunDir.open(tmp_path, CONFIG) as run:
        with pytest.raises(ValueError, match="missing"):
            run.write("u/0", "t", [{"a": 1, "b": 2}, {"a": 1}])
        run.write("u/0", "t", [{"a": 1, "b": 2}])
        with pytest.raises(ValueError, match="differ from those already written"):
            run.write("u/1", "t", [{"a": 1, "c": 2}])
        with pytest.raises(ValueError, match="table name"):
            run.write("u/1", "../t", [{"a": 1}])
        assert run.units() == ["u/0"]
        with pytest.raises(AvlensError, match="already done"):
            run.write("u/0", "t", [{"a": 1, "b": 2}])
    # The column check also holds for a later process, which learns the columns from the shards.
    with RunDir.open(tmp_path, CONFIG) as run, pytest.raises(ValueError, match="differ"):
        run.write("u/1", "t", [{"a": 1}])


def test_one_writer_at_a_time_and_read_only_load(tmp_path):
    run = RunDir.open(tmp_path, CONFIG)
    with pytest.raises(AvlensError, match="in use"):
        RunDir.open(tmp_path, CONFIG)
    run.close()
    RunDir.open(tmp_path, CONFIG).close()
    with pytest.raises(AvlensError, match="not open for writing"):
        RunDir.load(tmp_path).write("u", "t", [{"a": 1}])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AvlensError, match="not a run directory"):
        RunDir.open(tmp_path / "other", CONFIG)


def test_unit_names_round_trip(tmp_path):
    names = ["counterfactual/vision-heavy/batch-003", "a b%c", ".hidden", "..", "x__y", "x/_y"]
    assert len({unit_key(n) for n in names}) == len(names)
    assert all("/" not in unit_key(n) and not unit_key(n).startswith(".") for n in names)
    with RunDir.open(tmp_path, CONFIG) as run:
        for n in names:
            run.write(n, "t", [{"unit": n}])
        assert run.units() == sorted(names)
        assert all(run.done(n) for n in names)
        assert sorted(run.table("t")["unit"]) == sorted(names)


def test_write_json_is_atomic_and_readable(tmp_path):
    with RunDir.open(tmp_path, CONFIG) as run:
        path = run.write_json("summary", {"accuracy": 0.5, "layers": [1, 2]})
        assert path == tmp_path / "summary.json"
        assert run.read_json("summary.json") == {"accuracy": 0.5, "layers": [1, 2]}
        run.write_json("summary.json", {"accuracy": 0.75})
        assert run.read_json("summary") == {"accuracy": 0.75}
        with pytest.raises(ValueError):
            run.write_json("run.json", {})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


# ---------------------------------------------------------------------------------------------------------
# Files follow the umask; run.json is strict JSON; the data's identity is its content
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_result_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        with RunDir.open(tmp_path / "run", {"a": 1}) as run:
            run.write_many("u/0", {"logits": [{"x": 1.0}]})
            run.consolidate()
            run.write_json("summary", {"x": 1})
    finally:
        os.umask(old)
    root = tmp_path / "run"
    files = [root / "run.json", root / "summary.json", root / "results" / "logits.parquet"]
    files += list((root / "units").glob("*/*.parquet"))
    dirs = list((root / "units").iterdir())
    assert len(files) == 4 and len(dirs) == 1
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
    for p in dirs:
        assert stat.S_IMODE(p.stat().st_mode) == dir_mode, p


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_run_json_holds_null_for_missing_values(tmp_path):
    config = {"threshold": float("nan"), "range": [1.0, float("inf")], "nested": {"x": float("-inf")}}
    with RunDir.open(tmp_path / "run", config, meta={"score": float("nan")}) as run:
        run.write_json("other", {"v": float("nan")})
    info = _strict((tmp_path / "run" / "run.json").read_text())
    assert info["config"] == {"threshold": None, "range": [1.0, None], "nested": {"x": None}}
    assert info["meta"] == {"score": None}
    assert _strict((tmp_path / "run" / "other.json").read_text()) == {"v": None}
    with RunDir.open(tmp_path / "run", config):  # the same config with NaN resumes
        pass


def _content(rows: dict[str, str], media: dict[str, list[int] | None] | None = None) -> dict:
    digest = hashlib.sha256(json.dumps([rows, media], sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "rows": rows, "media": media or {}}


def test_changed_data_is_refused_saying_what_changed(tmp_path):
    rows = {"a": "1", "b": "2", "c": "3"}
    with RunDir.open(tmp_path / "run", {"x": 1}, data=_content(rows)) as run:
        assert run.info["data"]["rows"] == rows
    with RunDir.open(tmp_path / "run", {"x": 1}, data=_content(dict(rows))):
        pass  # the same content resumes
    more = {"a": "1", "b": "9", "d": "4", "e": "5", "f": "6"}
    with pytest.raises(
        AvlensError, match=r"the manifest's rows differ from the run's \(3 added, 1 removed, 1 changed\)"
    ):
        RunDir.open(tmp_path / "run", {"x": 1}, data=_content(more))
    with pytest.raises(AvlensError, match=r"media file /m/a.mp4 changed since the run started"):
        RunDir.open(tmp_path / "run", {"x": 1}, data=_content(rows, {"/m/a.mp4": [10, 1]}))
    run = RunDir.open(tmp_path / "run", {"x": 1})  # bound later (data built once the directory is open)
    with pytest.raises(AvlensError, match="1 removed"):
        run.bind_data(_content({"a": "1", "b": "2"}))
    run.close()
