"""Executors: a local and a Ray run of one config give the same records row for row, a worker killed with
SIGKILL mid-unit loses only that unit (retried, recorded exactly once), a unit that keeps failing is recorded as
failed with its reason after one retry while the rest goes on, and a run resumes with the other executor.

The Ray tests run on a local Ray instance with 2 CPUs (two workers of one thread each), started once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import pytest
import ray  # installed by the test command (the [test] extra): no skip if it is missing
import torch

from avlens import load
from avlens.analyses import Analysis, get, register, unregister
from avlens.executors import LocalExecutor
from avlens.organism.world import LABEL_GROUPS, write_world
from avlens.reproduce import execute

MODEL = "organism:av-balanced"


# ---------------------------------------------------------------------------------------------------------
# Test analyses: a unit that sleeps (to be killed from outside), a unit that raises, and their records
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultConfig:
    """``marks``: a directory where each call leaves a file (unit, attempt, pid); ``fail``: ids whose unit raises;
    ``sleep``: seconds each call waits before answering."""

    marks: str = ""
    fail: tuple[str, ...] = ()
    sleep: float = 0.0
    questions: dict = field(default_factory=lambda: {"hear": "What do you hear?"})
    conditions: tuple = ("factual",)
    batch_size: int = 2


@dataclass(frozen=True)
class FaultSummary:
    n: int


def _fault_collect(adapter, items, config):
    first = items[0].id.replace("/", "_")
    marks = Path(config.marks)
    attempt = len(list(marks.glob(f"{first}.*"))) + 1
    (marks / f"{first}.{attempt}.{os.getpid()}").write_text("")
    time.sleep(config.sleep)
    if any(it.id in config.fail for it in items):
        raise ValueError(f"cannot read {items[0].id}")
    return {"items": [{"item": it.id, "layers": adapter.n_layers} for it in items]}


FAULTS = Analysis(
    name="faults",
    title="Faults",
    claim="Units fail and workers die",
    Config=FaultConfig,
    Summary=FaultSummary,
    headline="n",
    collect=_fault_collect,
    summarize=lambda t: FaultSummary(n=len(t.get("items", []))),
    findings=lambda s: [],
    plot=lambda tables: __import__("matplotlib.figure").figure.Figure(figsize=(2, 2)),
    paper="test",
    about="A test analysis of executor faults.",
)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs; this module's functions are sent to workers by value."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A counterfactual set of 6 organism clips (36 items)."""
    from avlens.data import counterfactual

    root = tmp_path_factory.mktemp("executors")
    manifest = write_world(root / "world", 6, seed=7100, workers=1)
    counterfactual(manifest, root / "cf", groups={k: list(v) for k, v in LABEL_GROUPS.items()}, seed=0)
    return root / "cf" / "manifest.jsonl"


@pytest.fixture
def faults():
    register(FAULTS)
    yield
    unregister(FAULTS.name)


def _run(out, manifest, config, executor, name, key=None):
    run_config = {"models": {"m": MODEL}, "analysis": name, "config": key or repr(config)}
    return execute(out, run_config, {}, {name: config}, None, manifest, executor=executor)


def _records(out: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted((out / "results").glob("*.parquet"))}


def _ray_executor(**kw):
    from avlens.executors.ray import RayExecutor

    return RayExecutor({"m": MODEL}, None, workers=2, **kw)


# ---------------------------------------------------------------------------------------------------------
# The same records, whichever executor
# ---------------------------------------------------------------------------------------------------------
def test_local_and_ray_runs_write_the_same_records_row_for_row_and_resume_each_other(cluster, world, tmp_path):
    config = replace(get("counterfactual").config(), batch_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each Ray worker has 1 of the 2 CPUs, so 1 thread: the same arithmetic here
    try:
        local = _run(tmp_path / "local", world, config, LocalExecutor({"m": load(MODEL)}), "counterfactual")
    finally:
        torch.set_num_threads(threads)
    executor = _ray_executor()
    try:
        remote = _run(tmp_path / "ray", world, config, executor, "counterfactual")
        # Half a run with Ray, resumed locally: delete half the units, as if Ctrl-C had stopped it there.
        units = sorted((tmp_path / "ray" / "units").iterdir())
        assert len(units) == 9  # 6 clips x 6 conditions x 2 questions = 72 items, in batches of 8
    finally:
        executor.close()
    a, b = _records(local.out), _records(remote.out)
    assert list(a) == ["counterfactual.answers"] and len(a["counterfactual.answers"]) == 72
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True)
    assert local.summary["counterfactual"]["m"] == remote.summary["counterfactual"]["m"]

    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "ray", mixed)
    for unit in units[::2]:
        shutil.rmtree(mixed / "units" / unit.name)
    torch.set_num_threads(1)
    try:
        resumed = _run(mixed, world, config, LocalExecutor({"m": load(MODEL)}), "counterfactual")
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(_records(resumed.out)["counterfactual.answers"], a["counterfactual.answers"])


# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_unit_loses_only_that_unit_which_is_recorded_exactly_once(cluster, world, faults, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    config = FaultConfig(marks=str(marks), sleep=1.0)
    executor = _ray_executor()
    killed: list[int] = []

    def kill_the_first_busy_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            started = sorted(marks.iterdir(), key=lambda p: p.stat().st_mtime)
            if started:  # a unit is inside collect, asleep: kill its worker
                pid = int(started[0].name.rsplit(".", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_busy_worker)
    killer.start()
    try:
        result = _run(tmp_path / "run", world, config, executor, "faults")
    finally:
        killer.join()
        executor.close()
    assert killed and executor.deaths == 1
    items = _records(result.out)["faults.items"].item
    assert items.is_unique and len(items) == 6  # 6 factual clips, "hear": every item once
    assert result.failed == {}
    attempts = {}
    for p in marks.iterdir():
        unit, _attempt, pid = p.name.rsplit(".", 2)
        attempts.setdefault(unit, []).append(int(pid))
    retried = [pids for pids in attempts.values() if len(pids) == 2]
    # only the killed unit ran twice, the second time on another (new) worker
    assert len(retried) == 1 and killed[0] in retried[0] and len(set(retried[0])) == 2
    assert all(len(p) == 1 for p in attempts.values() if p is not retried[0])


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_unit_that_fails_twice_is_recorded_with_its_reason_and_the_rest_goes_on(
    kind, cluster, world, faults, tmp_path
):
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = sorted(pd.read_json(world, lines=True).query("condition == 'factual'").id)
    bad = f"{ids[2]}/hear"  # the second unit (items 2 and 3)
    config = FaultConfig(marks=str(marks), fail=(bad,))
    executor = LocalExecutor({"m": load(MODEL)}) if kind == "local" else _ray_executor()
    try:
        result = _run(tmp_path / "run", world, config, executor, "faults", key="faults")
    finally:
        executor.close()
    [(unit, info)] = result.failed.items()
    assert unit == "faults/m/2-0001" and info["reason"] == f"ValueError: cannot read {bad}"
    assert "Traceback" in info["detail"] or "ValueError" in info["detail"]
    assert len(list(marks.glob(f"{bad.replace('/', '_')}.*"))) == 2  # tried, then once more
    assert sorted(_records(result.out)["faults.items"].item) == sorted(f"{i}/hear" for i in ids[:2] + ids[4:])
    # a resumed run tries the failed unit again; once it succeeds, its failure record goes
    healed = replace(config, fail=())
    again = _run(tmp_path / "run", world, healed, LocalExecutor({"m": load(MODEL)}), "faults", key="faults")
    assert again.failed == {} and not (tmp_path / "run" / "failed" / "faults%2Fm%2F2-0001.json").exists()
    assert sorted(_records(again.out)["faults.items"].item) == sorted(f"{i}/hear" for i in ids)


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------
def _avlens(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "avlens", *args], capture_output=True, text=True, env=env, **kw)


def test_executor_ray_without_ray_installed_exits_2_saying_how_to_install_it(world, tmp_path):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    args = ["run", "counterfactual", "--model", MODEL, "--data", str(world), "--out", str(tmp_path / "o")]
    done = _avlens(*args, "--executor", "ray", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "avlens: --executor ray needs Ray, an optional extra: pip install 'avlens[ray]' (or pip install ray)"
    ]
    bad = _avlens(*args, "--executor", "dask")
    assert bad.returncode == 2 and "unknown executor 'dask' (choose local or ray)" in bad.stderr
    assert "Traceback" not in bad.stderr + done.stderr


def test_ctrl_c_stops_a_ray_run_and_it_resumes_locally_to_the_records_of_an_uninterrupted_run(tmp_path):
    # 24 clips (144 items, 9 units of about 1.2 s each): the run cannot finish in the moment between its first
    # saved unit and the interrupt (with 3 units, one CI run did, and exited 0)
    from avlens.data import counterfactual

    manifest = write_world(tmp_path / "world", 24, seed=7100, workers=1)
    groups = {k: list(v) for k, v in LABEL_GROUPS.items()}
    world = counterfactual(manifest, tmp_path / "cf", groups=groups, seed=0).manifest
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["run", "counterfactual", "--model", MODEL, "--data", str(world), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "avlens", *args, "--executor", "ray", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 240
    while (time.time() < deadline and not (out / "units").is_dir()) or not any((out / "units").glob("[!.]*")):
        time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = len([p for p in (out / "units").iterdir() if not p.name.startswith(".")])
    whole = _avlens(*[a if a != str(out) else str(tmp_path / "whole") for a in args], env=env)
    assert whole.returncode == 0, whole.stderr
    units = len(list((tmp_path / "whole" / "units").glob("[!.]*")))
    assert f"saved {saved} of {units} units in {out}; re-run the same command to resume" in err
    assert "Traceback" not in err and 1 <= saved < units
    resumed = _avlens(*args, "--executor", "local", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {saved} of {units} units already done, skipped" in resumed.stderr
    a = pd.read_parquet(out / "results" / "counterfactual.answers.parquet")
    b = pd.read_parquet(tmp_path / "whole" / "results" / "counterfactual.answers.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)


# ---------------------------------------------------------------------------------------------------------
# The activation store, filled by Ray workers
# ---------------------------------------------------------------------------------------------------------
def test_ray_workers_fill_an_activation_store_that_a_later_run_reuses_with_probes_equal_to_memory(
    cluster, tmp_path, monkeypatch
):
    manifest = write_world(tmp_path / "world", 16, seed=7200, workers=1)  # 4 classes twice: probes fit
    config = replace(get("probe").config(), conditions=("factual",), folds=2, batch_size=4)
    store = tmp_path / "store"

    def probes(out: Path) -> pd.DataFrame:
        return pd.read_parquet(out / "results" / "probe.probes.parquet")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        memory = _run(tmp_path / "memory", manifest, config, LocalExecutor({"m": load(MODEL)}), "probe")
    finally:
        torch.set_num_threads(threads)
    said: list[str] = []
    executor = _ray_executor()
    try:
        run_config = {"models": {"m": MODEL}, "analysis": "probe", "store": True}
        filled = execute(
            tmp_path / "filled", run_config, {"model_sha256": {"m": "w"}}, {"probe": config}, None, manifest,
            executor=executor, store=store, log=said.append,
        )  # fmt: skip
    finally:
        executor.close()
    adapter = load(MODEL)
    per = 3 * (adapter.n_layers + 1) * adapter.hidden_size * 4  # 3 sites x every layer's residual x float32
    assert said == [
        f"activation store {store / 'm'}: {per / 1e6:.3f} MB per sample, {per * 16 / 1e6:.1f} MB for 16 samples "
        "of probe (float32)"
    ]
    shards = sorted((store / "m" / "shards").iterdir())
    assert len(shards) == 4  # one per unit of 4 items
    features = pd.read_parquet(filled.out / "results" / "probe.features.parquet")
    assert "vector" not in features and {"shard", "row"} <= set(features.columns)
    # A later run on the same store computes nothing: the model is never run.
    import avlens.analyses.probe as probe_module

    monkeypatch.setattr(probe_module, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("forward")))
    reused = execute(
        tmp_path / "reused", run_config, {"model_sha256": {"m": "w"}}, {"probe": config}, None, manifest,
        executor=LocalExecutor({"m": adapter}), store=store,
    )  # fmt: skip
    assert reused.failed == {} and filled.failed == {}
    assert len(probes(memory.out)) > 0
    pd.testing.assert_frame_equal(probes(filled.out), probes(memory.out), check_exact=True)
    pd.testing.assert_frame_equal(probes(reused.out), probes(memory.out), check_exact=True)
