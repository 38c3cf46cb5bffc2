"""Where a recipe's tasks run: Prefect's thread pool in the flow process (the default), or the worker processes of a
Dask cluster (prefect-dask) or of Ray (prefect-ray), as the config's `runner:` section says. See "Workers" in
docs/design/shared-parts.md.

On a cluster a task runs in another process, so whatever it touches of its `RunContext` crosses a process boundary:
- the hub: a RunContext pickles without its live `LLMHub` (threads, an event loop, SQLite). On a worker, `ctx.hub`
  is that process's own `WorkerHub` for the run, on the same cache file, with every endpoint's `max_concurrency`
  divided by the number of worker processes, so the cluster as a whole keeps each cap;
- accounting: a stage task run on a worker returns its value inside a `Shipped` together with what only the worker
  saw (shards reused and run, its hub's usage and replica rows so far, progress), and the flow process merges it
  as the task ends (`common.gather`), so manifests, run summaries and progress bars read as after a threads run;
- progress: a `Reporter` pickles into a `ProgressRecorder`, so bars move per finished shard, not per request.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import socket
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orforge.core.config import ModelSpec, RecipeConfig, RunnerConfig
from orforge.flows.progress import ProgressRecorder, StageProgress, reporter
from orforge.llm.hub import LLM, LLMHub
from orforge.llm.types import Usage

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.task_runners import TaskRunner

log = logging.getLogger("orforge.flows")

# A local Dask cluster's threads per worker process: tasks mostly wait on model calls, and the tasks of one process
# share its hub and its share of every cap.
LOCAL_DASK_THREADS = 4


class RunnerError(RuntimeError):
    """The configured runner cannot be used here (its package is not installed)."""


def _code_fingerprint() -> str:
    """sha256 of orforge's Python sources as this process imported them (read at import, so an edit made later is
    not mistaken for the loaded code): a worker running other code would unpickle records it does not understand."""
    digest = hashlib.sha256()
    for name in ("core", "llm", "generators", "moderators", "dedup", "outputs", "flows"):
        spec = importlib.util.find_spec(f"orforge.{name}")  # where it is installed, without importing it
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).rglob("*.py")):
                digest.update(f"{name}/{path.relative_to(folder)}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


CODE = _code_fingerprint()


class WorkerCodeError(RuntimeError):
    """A worker process runs other orforge code than the flow process."""


def check_code(flow_code: str) -> None:
    if flow_code != CODE:
        raise WorkerCodeError(f"worker {socket.gethostname()} (pid {os.getpid()}) runs other orforge code than the "
                              f"flow process (sources {CODE} here, {flow_code} there): install the same version on "
                              "every worker and restart the workers")


def task_runner(runner: RunnerConfig) -> TaskRunner:
    """The Prefect task runner the config's `runner:` section names."""
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner  # noqa: PLC0415

        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner  # noqa: PLC0415
        except ImportError:
            raise RunnerError("runner.kind dask needs prefect-dask: pip install 'orforge[dask]'") from None
        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": runner.processes(), "processes": True,
                                              "threads_per_worker": LOCAL_DASK_THREADS})
    try:
        from prefect_ray import RayTaskRunner  # noqa: PLC0415
    except ImportError:
        raise RunnerError("runner.kind ray needs prefect-ray: pip install 'orforge[ray]'") from None
    if runner.address == "auto":
        # An existing cluster or an error: prefect-ray calls a bare ray.init() for "auto", which starts a local node
        # of every CPU when it finds none, and caps divided by `workers` would no longer hold.
        return RayTaskRunner(address="auto", init_kwargs={"address": "auto"})
    if runner.address:
        return RayTaskRunner(address=runner.address)
    # "local": a new node of `workers` CPUs for this run, never one that RAY_ADDRESS or a running node would give
    # (ray.init refuses num_cpus for those). No dashboard: a node for one run, and it starts faster without one.
    return RayTaskRunner(init_kwargs={"address": "local", "num_cpus": runner.processes(), "include_dashboard": False})


def with_runner(flow: Flow, cfg: RecipeConfig | None) -> Flow:
    """`flow` with the task runner of `cfg` (unchanged without a config or with the default threads runner)."""
    if cfg is None or cfg.runner == RunnerConfig():
        return flow
    return flow.with_options(task_runner=task_runner(cfg.runner))


# -- the hub of a worker process ------------------------------------------------------------------------------------
class WorkerHub(LLMHub):
    """A worker process's hub for one run: the flow's cache file, every endpoint's cap divided among `processes`
    worker processes (at least one request each; the config check refuses a cap smaller than that)."""

    def __init__(self, cache_path: Path | str, processes: int):
        super().__init__(cache_path)
        self.processes = processes
        self.running = 0  # stage tasks using it now; an idle hub of a finished run may be closed
        self.id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    def model(self, spec: ModelSpec, role: str) -> LLM:
        share = max(1, spec.max_concurrency // self.processes)
        return super().model(spec.model_copy(update={"max_concurrency": share}), role)


_hubs: dict[tuple[str, str], WorkerHub] = {}
_hubs_lock = threading.Lock()


def worker_hub(cache_path: str, run_id: str, processes: int, running: int = 0) -> WorkerHub:
    """This process's hub for run `run_id` (one per run and cache file), created on first use. Creating one closes
    the hubs of other runs that no task is using; `running=1` marks a task as using it (release with `done_with`)."""
    key = (cache_path, run_id)
    with _hubs_lock:
        hub = _hubs.get(key)
        if hub is None:
            for other_key, other in list(_hubs.items()):
                if other.running == 0:
                    other.close()
                    del _hubs[other_key]
            if not _hubs:
                atexit.register(close_worker_hubs)  # registering twice is harmless: close is idempotent
            hub = _hubs[key] = WorkerHub(cache_path, processes)
        hub.running += running
        return hub


def done_with(hub: WorkerHub) -> None:
    with _hubs_lock:
        hub.running -= 1


def close_worker_hubs() -> None:
    with _hubs_lock:
        hubs = list(_hubs.values())
        _hubs.clear()
    for hub in hubs:
        hub.close()


def worker_hub_usage() -> dict[str, dict]:
    """{run id: {"hub": id, "cache_path": path, "usage": usage rows, "replicas": replica rows}} of this process's
    hubs: what a test asks every Dask worker (`client.run`) to show that the calls were made there."""
    with _hubs_lock:
        return {run: {"hub": hub.id, "cache_path": path, "usage": hub.usage_rows(), "replicas": hub.replica_rows()}
                for (path, run), hub in _hubs.items()}


# -- what a task on a worker sends back -----------------------------------------------------------------------------
@dataclass
class Shipped:
    """A stage task's value from a worker process, with what only the worker saw."""

    value: Any
    run_id: str
    hub_id: str | None = None
    usage: dict[tuple[str, str], dict] = field(default_factory=dict)  # the worker hub's totals so far, per role/model
    replicas: list[dict] = field(default_factory=list)  # its replica_rows() so far (base_url lists), per replica
    shards_reused: dict[str, int] = field(default_factory=dict)
    shards_run: dict[str, int] = field(default_factory=dict)
    progress: dict[str, list] = field(default_factory=dict)


_contexts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # run id -> the flow process's RunContext


def register(ctx) -> None:
    _contexts[ctx.run_id] = ctx


def ship(ctx, value: Any, arguments: dict[str, Any], hub: WorkerHub | None) -> Shipped:
    """Pack a finished task's value with the worker's shard counts, hub usage and the progress of its arguments."""
    progress: dict[str, list] = {}
    for arg in arguments.values():
        if isinstance(arg, StageProgress) and isinstance(arg.reporter, ProgressRecorder):
            progress.update(arg.reporter.drain())
    usage = {key: dict(vars(u)) for key, u in list(hub.usage.items())} if hub is not None else {}
    replicas = hub.replica_rows() if hub is not None else []
    return Shipped(value, ctx.run_id, hub.id if hub is not None else None, usage, replicas,
                   dict(ctx.shards_reused), dict(ctx.shards_run), progress)


def arrive(shipped: Shipped) -> Any:
    """In the flow process: merge what a worker's task saw into the run's context and reporter; its value."""
    ctx = _contexts.get(shipped.run_id)
    if ctx is None:  # the run is over (a straggler): nothing to merge into
        return shipped.value
    with ctx.merge_lock:
        for mine, theirs in ((ctx.shards_reused, shipped.shards_reused), (ctx.shards_run, shipped.shards_run)):
            for stage, n in theirs.items():
                mine[stage] = mine.get(stage, 0) + n
        if shipped.hub_id is not None:
            # A worker hub's usage only grows; its tasks send totals (which may arrive out of order), so the flow
            # keeps the largest seen per field and adds to its own hub only what is new.
            seen = ctx.worker_usage.setdefault(shipped.hub_id, {})
            for key, totals in shipped.usage.items():
                before = seen.get(key, {})
                after = {k: v if before.get(k) is None else before[k] if v is None else max(v, before[k])
                         for k, v in totals.items()}
                seen[key] = after
                delta = {k: v if before.get(k) is None else v - before[k] for k, v in after.items()}
                ctx.hub.usage[key].add(Usage(**delta))
            if shipped.replicas:  # totals too, summed per replica into the flow hub's replica_rows()
                ctx.hub.add_replica_rows(shipped.hub_id, shipped.replicas)
    for stage, counts in shipped.progress.items():
        reporter().update(stage, *counts)
    return shipped.value
