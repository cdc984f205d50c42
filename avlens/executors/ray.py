"""The Ray executor: units on Ray actors that load the models once and keep them (``--executor ray``).

Each of ``workers`` actors holds every model of the run (and the base, if an analysis needs it), loaded when
first needed (the model hashes a run asks of every worker at its start, all at once; or its first unit). Each
actor is sent :data:`DEPTH` units at once (it computes one, the next waits), and their records come back to the
driver, which writes them into the run directory, so a Ray run writes exactly what a local run does. Faults:

- a worker that dies (killed, out of memory) loses only the unit it was computing (and the one waiting, which had
  not started): a new worker takes its place and both are sent again (up to :data:`MAX_CRASHES` times, then the
  unit is recorded as failed);
- a unit whose analysis raises is tried once more, on whichever worker is free, then recorded as failed with its
  reason (:data:`avlens.executors.ATTEMPTS`);
- Ctrl-C cancels the work in flight and stops the workers; what was written stays, and the run resumes.

Without an ``address`` a local Ray instance is started with the machine's CPUs and stopped at :meth:`close`;
with one (``ray://...`` or ``auto``) the executor joins that cluster. If Ray is already initialised in this
process (a notebook, the tests), that instance is used and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ..analyses import Analysis, get
from ..errors import InputError
from . import ATTEMPTS, Done, Failed, Tables, Unit, collect_unit, model_hash, reason_of

MAX_CRASHES = 3
"""Worker deaths a unit may cause (or suffer) before it is recorded as failed rather than sent again."""

DEPTH = 2
"""Units sent to each worker at once: it computes one while the next waits in its queue, so it does not sit idle
while the driver receives and writes the last one's records and sends it another."""

INSTALL = "--executor ray needs Ray, an optional extra: pip install 'avlens[ray]' (or pip install ray)"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL) from None
    return ray


class Worker:
    """A Ray actor's state: the run's models, loaded on first use and kept for every later unit."""

    def __init__(self, models: Mapping[str, str], base: str | None, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.names = dict(models)
        self.base_name = base
        self.adapters: dict[str, Any] = {}

    def _adapter(self, label: str) -> Any:
        if label not in self.adapters:
            from .. import load

            self.adapters[label] = load(self.base_name if label == "base" else self.names[label])
        return self.adapters[label]

    def pid(self) -> int:
        """The worker's process id (to watch or kill it)."""
        return os.getpid()

    def peak_memory(self) -> int:
        """The worker process's peak resident memory, in bytes."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def model_hashes(self) -> dict[str, str]:
        labels = [*self.names, *(["base"] if self.base_name else [])]
        return {label: model_hash(self._adapter(label)) for label in labels}

    def model_dims(self) -> dict[str, tuple[int, int]]:
        return {label: (self._adapter(label).n_layers, self._adapter(label).hidden_size) for label in self.names}

    def run(self, spec: Analysis, unit: Unit) -> Tables:
        base = self._adapter("base") if spec.needs.base and self.base_name else None
        return collect_unit(spec, self._adapter(unit.model), unit, base)


class RayExecutor:
    """Units on ``workers`` Ray actors, each with ``gpus_per_worker`` GPUs (0: CPU only) and ``cpus_per_worker``
    CPUs and torch threads (default: the cluster's CPUs shared among the workers; 1 with GPUs)."""

    name = "ray"

    def __init__(
        self,
        models: Mapping[str, str],
        base: str | None = None,
        *,
        workers: int = 2,
        gpus_per_worker: float = 0.0,
        address: str | None = None,
        cpus_per_worker: int | None = None,
    ) -> None:
        if workers < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        if gpus_per_worker < 0:
            raise InputError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}")
        ray = _ray()
        self.ray = ray
        self.names = dict(models)
        self.base_name = base
        self.labels = list(self.names)
        self.has_base = base is not None
        self.workers = workers
        self.gpus = gpus_per_worker
        self.started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no prompt, no report home
            cpus = os.cpu_count() or 1
            options: dict[str, Any] = {"address": address} if address else {"num_cpus": max(cpus, workers)}
            ray.init(**options, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            self.started = True
        total = int(ray.cluster_resources().get("CPU", workers))
        # By default each worker gets its share of the CPUs (1 beside a GPU), and torch's threads match it (Ray
        # sets OMP_NUM_THREADS the same way).
        share = max(1, total // workers) if gpus_per_worker == 0 else 1
        self.cpus_per_worker = cpus_per_worker or share
        self.actor_class = ray.remote(Worker)
        self._pids: dict[Any, Any] = {}  # actor -> its pid, or the reference of its pid() task, sent at creation
        self.actors = [self._new_actor() for _ in range(workers)]
        self.deaths = 0
        self.in_flight: dict[str, int] = {}  # unit name -> the pid of the worker it was sent to (for tests, watching)

    def _new_actor(self) -> Any:
        options = self.actor_class.options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus, max_restarts=0)
        actor = options.remote(self.names, self.base_name, self.cpus_per_worker)
        # Asked now, so that it runs before any unit: an actor runs its tasks in order, and asking later would
        # wait behind the unit it computes (and hold up sending units to the other workers).
        self._pids[actor] = actor.pid.remote()
        return actor

    def worker_pids(self) -> list[int]:
        """The process ids of the live workers."""
        return [self._pid(a) for a in self.actors]

    def peak_memory(self) -> list[int]:
        """Each live worker's peak resident memory, in bytes."""
        return self.ray.get([a.peak_memory.remote() for a in self.actors])

    def model_hashes(self) -> dict[str, str]:
        """Every model's hash, asked of every worker at once: each loads its models now, all in parallel."""
        hashes = self.ray.get([a.model_hashes.remote() for a in self.actors])
        if any(h != hashes[0] for h in hashes):
            raise InputError(f"the workers loaded different weights for the same models: {hashes}")
        return hashes[0]

    def model_dims(self) -> dict[str, tuple[int, int]]:
        return self.ray.get(self.actors[0].model_dims.remote())

    def run(self, units: Sequence[Unit], done: Done, failed: Failed) -> None:
        """Send units to the workers, :data:`DEPTH` at a time each, until every one is done or failed (see the
        module docstring)."""
        ray = self.ray
        specs = {name: ray.put(get(name)) for name in {u.analysis for u in units}}
        queue: deque[tuple[Unit, int, int]] = deque((u, 0, 0) for u in units)  # unit, errors, worker deaths
        free = {actor: DEPTH for actor in self.actors}  # actor -> units it may still take
        flying: dict[Any, tuple[Any, Unit, int, int]] = {}
        try:
            while queue or flying:
                while queue and any(free.values()):
                    actor = max(free, key=free.__getitem__)  # first slots first: every worker busy before any queues
                    free[actor] -= 1
                    unit, errors, crashes = queue.popleft()
                    ref = actor.run.remote(specs[unit.analysis], unit)
                    flying[ref] = (actor, unit, errors, crashes)
                    self.in_flight[unit.name] = self._pid(actor)
                ready, _ = ray.wait(list(flying), num_returns=1)
                for ref in ready:
                    actor, unit, errors, crashes = flying.pop(ref)
                    self.in_flight.pop(unit.name, None)
                    try:
                        tables = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # the analysis raised: its worker is fine
                        free[actor] += 1
                        if errors + 1 < ATTEMPTS:
                            queue.append((unit, errors + 1, crashes))
                        else:
                            cause = e.cause if isinstance(e.cause, BaseException) else e
                            failed(unit, reason_of(cause), str(e))
                    except ray.exceptions.RayError as e:  # the worker died: replace it, send its units again
                        if actor in free:  # the first of its units to come back replaces it
                            self.deaths += 1
                            del free[actor]
                            free[self._replace(actor)] = DEPTH
                        if crashes + 1 < MAX_CRASHES:
                            queue.appendleft((unit, errors, crashes + 1))
                        else:
                            failed(unit, f"its worker died {crashes + 1} times ({type(e).__name__})", str(e))
                    else:
                        free[actor] += 1
                        done(unit, tables)
        except KeyboardInterrupt:  # stop the work in flight now (actor tasks cannot be cancelled: end the actors)
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self.actors = []
            raise

    def _pid(self, actor: Any) -> int:
        """The actor's process id (-1 if it died before telling)."""
        if not isinstance(self._pids[actor], int):
            try:
                self._pids[actor] = self.ray.get(self._pids[actor], timeout=60)
            except self.ray.exceptions.RayError:
                self._pids[actor] = -1
        return self._pids[actor]

    def _replace(self, actor: Any) -> Any:
        self.actors.remove(actor)
        self._pids.pop(actor, None)
        new = self._new_actor()
        self.actors.append(new)
        return new

    def close(self) -> None:
        """Stop the workers, and the local Ray instance if this executor started it."""
        for actor in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
