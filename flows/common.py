"""What several flows share: running a stage as a stored shard, collecting task results, release folder names,
the funnel artifact, and reading earlier releases' prompts.

`run_shard` reuses a stage's stored result when the hash of its inputs matches (`work_dir/<stage>/<key>.parquet`)
and otherwise computes and stores it, if it had no failures; every recipe's flow runs its stages through it, so a
rerun of any recipe skips finished shards.

Release folders are named `<YYYYmmdd-HHMMSS>-<run id>`: the UTC start time, so a listing sorts by age, plus six hex
digits drawn per run, so two runs started in the same second with the same output folder never pick the same
folder (the second used to do all its work and then fail to write its release).
"""

from __future__ import annotations

import concurrent.futures
import copyreg
import functools
import importlib
import inspect
import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from prefect import Task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from orforge.core.config import BuildConfig, GateStage, RecipeConfig, stable_hash
from orforge.core.manifest import Diversity
from orforge.core.records import FAILURES, QUALITY_REJECTIONS, QUALITY_REPAIRS, StageResult, empty
from orforge.dedup.embed import Embedder
from orforge.dedup.released import released_prompts
from orforge.flows import runner
from orforge.flows.progress import StageProgress
from orforge.generators import quality
from orforge.llm.hub import LLMHub
from orforge.llm.types import Usage
from orforge.outputs.atomic import write_json, write_parquet
from orforge.outputs.diversity import Measured, measure

log = logging.getLogger("orforge.flows")

TIME_FORMAT = "%Y%m%d-%H%M%S"
# The run id is optional so release folders written before it existed are still recognised.
RELEASE_NAME = re.compile(r"^(?P<time>\d{8}-\d{6})(?:-(?P<run>[0-9a-f]{6}))?$")
PUBLISHED = ("benign", "toxic", "hard")


def release_name(when: datetime) -> str:
    """`<YYYYmmdd-HHMMSS>-<run id>` for a run started at `when`."""
    return f"{when.astimezone(UTC).strftime(TIME_FORMAT)}-{secrets.token_hex(3)}"


def release_time(name: str) -> datetime:
    """The start time a release folder's name records; ValueError for a name that is not a release name."""
    match = RELEASE_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a release folder name (YYYYmmdd-HHMMSS-<run id>)")
    return datetime.strptime(match["time"], TIME_FORMAT).replace(tzinfo=UTC)


def new_folder(parent: Path, when: datetime | None = None) -> Path:
    """A folder under `parent` named for `when` (default now) and a fresh run id, that does not exist yet."""
    when = when or datetime.now(UTC)
    while (folder := parent / release_name(when)).exists():
        pass  # a 1-in-16M clash with an existing folder: draw another run id
    return folder


def release_folder(cfg: BuildConfig, when: datetime | None = None) -> Path:
    """The default folder of a new release of `cfg`: `<output_dir>/<name>/<YYYYmmdd-HHMMSS>-<run id>`."""
    return new_folder(cfg.output_dir / cfg.name, when)


def next_release_folder(cfg: BuildConfig, previous: Path | None) -> Path:
    """The folder for a new release that sorts after `previous`: named for now, or for one second after the previous
    release when that is not earlier (a clock step back, or a manual run next to a scheduled one)."""
    when = datetime.now(UTC).replace(microsecond=0)
    if previous is not None:
        when = max(when, release_time(previous.name) + timedelta(seconds=1))
    return release_folder(cfg, when)


def read_released_prompts(folders: list[Path]) -> pl.DataFrame:
    """prompt_id, prompt of the published splits of earlier releases (`dedup.against`), for dedup.released."""
    frames = [pl.read_parquet(path, columns=["prompt_id", "prompt"])
              for folder in folders for split in PUBLISHED if (path := Path(folder) / f"{split}.parquet").exists()]
    return released_prompts(frames)


def funnel_markdown(funnel_frame: pl.DataFrame) -> str:
    cols = funnel_frame.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in funnel_frame.iter_rows()]
    return "\n".join(lines)


def publish_funnel_artifact(cfg: BuildConfig, funnel_frame: pl.DataFrame, folder: Path) -> None:
    """A Prefect markdown artifact with the release's per-category funnel; a summary, so failing to publish it is
    logged and never fails the run."""
    try:
        create_markdown_artifact(
            key=f"orforge-funnel-{stable_hash(cfg.name, 8)}",
            markdown=f"## orforge build `{cfg.name}`\n\nRelease: `{folder}`\n\n{funnel_markdown(funnel_frame)}\n",
            description="Per-category funnel of the build",
        )
    except Exception as e:  # noqa: BLE001 - an artifact is a summary; failing to publish it must not fail the build
        log.warning("could not publish the funnel artifact: %s", e)


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a function for the child (between fork and exec) asking the kernel to SIGTERM it when its parent
    dies; resolved here in the parent, so the child does no library loading after fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def start_temporary_server_outside_terminal_group() -> None:
    """Without PREFECT_API_URL, start Prefect's temporary server now, in a session of its own.

    A Ctrl-C in a terminal goes to the whole foreground process group. Prefect starts its temporary server in
    orforge's group, so it died with the same keystroke, and everything the interrupted build still had to tell it
    (task and flow states) went into Prefect's client retries against a dead server: minutes instead of seconds.
    In its own session only orforge sees the interrupt; the server is still stopped when orforge exits (Prefect's
    atexit hook), and on Linux also when orforge is killed outright (a parent-death signal).
    """
    from prefect.settings import get_current_settings  # noqa: PLC0415

    if get_current_settings().api.url:
        return
    import prefect.server.api.server as server_module  # noqa: PLC0415

    server = server_module.SubprocessASGIServer()  # the instance Prefect's client uses, reused once running
    if server.running:
        return
    popen = functools.partial(subprocess.Popen, start_new_session=True, preexec_fn=_parent_death_signal())
    # Prefect has no option for this; its module's `subprocess` is swapped only while the server process starts.
    server_module.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
    try:
        server.start()
    finally:
        server_module.subprocess = subprocess


class EvaluateInputError(ValueError):
    """A release cannot be evaluated with this config (wrong kind of release, missing or unreadable files, no
    targets): exit code 2, nothing written."""


# -- running stages as stored shards --------------------------------------------------------------------------------
TASK_OPTS = dict(cache_policy=NO_CACHE, persist_result=False, retries=0)


@dataclass
class RunContext:
    """What every task of a recipe's run needs: the config, the one hub, the work dir, and shard bookkeeping.

    It crosses to a worker process (a Dask or Ray runner) without the live hub: there `hub` is the worker's own hub
    for the run (flows/runner.py), and the shard counts start empty, to be shipped back with the task's value.
    """

    cfg: RecipeConfig
    hub: LLMHub
    work_dir: Path
    shards_reused: dict[str, int] = field(default_factory=dict)
    shards_run: dict[str, int] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: secrets.token_hex(8), repr=False)

    _worker = None  # on a worker process: (cache path, run id, worker processes) of the hub `hub` stands for

    def __post_init__(self) -> None:
        self.merge_lock = threading.Lock()
        self.worker_usage: dict[str, dict] = {}  # per worker hub: the largest usage totals it shipped
        runner.register(self)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("hub", "merge_lock", "worker_usage")}
        # Paths absolute, so a worker started elsewhere (another cwd) finds the same files.
        cache_path = str(Path(self.cfg.cache_path).resolve())
        return {**state, "work_dir": Path(self.work_dir).resolve(), "shards_reused": {}, "shards_run": {},
                "_worker": (cache_path, self.run_id, self.cfg.runner.processes()), "_code": runner.CODE}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, merge_lock=threading.Lock(), worker_usage={})

    def __getattr__(self, name: str):
        # Only reached for what is not set: `hub` of a context unpickled on a worker, made on first use.
        worker = self.__dict__.get("_worker")
        if name != "hub" or worker is None:
            raise AttributeError(name)
        self.__dict__["hub"] = hub = runner.worker_hub(*worker)
        return hub

    def __dask_tokenize__(self) -> str:
        return self.run_id  # Dask hashes what a task is sent; the context is one per run

    @property
    def on_worker(self) -> bool:
        return self._worker is not None


def shard_task(**options):
    """`@task` (with TASK_OPTS) for a stage task whose first parameter is the RunContext. On a worker process the
    task's value travels back inside a `runner.Shipped`, with the shards, usage and progress only the worker saw;
    `gather` and `collect` unpack it. In the flow process (the threads runner) the task is the function itself."""

    def decorate(fn):
        signature = inspect.signature(fn)
        first = next(iter(signature.parameters))

        @functools.wraps(fn)
        def run(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            ctx = arguments[first]
            if not ctx.on_worker:
                return fn(*args, **kwargs)
            runner.check_code(ctx._code)
            hub = runner.worker_hub(*ctx._worker, running=1)
            ctx.__dict__["hub"] = hub
            try:
                return runner.ship(ctx, fn(*args, **kwargs), arguments, hub)
            finally:
                runner.done_with(hub)

        return ShardTask(fn=run, **{**TASK_OPTS, **options})

    return decorate


class ShardTask(Task):
    """A stage task, sent to a worker process by its module and name (orforge is installed there). cloudpickle
    would send a decorated function by value, with the whole Prefect task around it, twice per submission (Dask
    hashes what it sends): that cost more than a small shard's own work."""

    def _by_name(self) -> tuple[str, str] | None:
        module = sys.modules.get(self.fn.__module__)
        found = getattr(module, self.fn.__qualname__, None) if module is not None else None
        return (self.fn.__module__, self.fn.__qualname__) if found is self else None

    def __reduce__(self):
        name = self._by_name()
        if name is None:  # a copy (with_options): by value, as any task
            return copyreg.__newobj__, (type(self),), self.__dict__
        return _shard_task_named, name

    def __dask_tokenize__(self):
        return self._by_name() or id(self)


def _shard_task_named(module: str, name: str) -> ShardTask:
    return getattr(importlib.import_module(module), name)


def run_shard(ctx: RunContext, stage: str, key_material: object, compute: Callable[[], StageResult],
              progress: StageProgress | None = None, requests: int = 0) -> StageResult:
    """Reuse the stage's stored shard when its key matches; otherwise compute it and store it if it is complete.

    A reused shard moves the stage's progress bar by the `requests` it would have made.
    """
    key = stable_hash(key_material, 24)
    folder = ctx.work_dir / stage
    records_path, notes_path = folder / f"{key}.parquet", folder / f"{key}.notes.json"
    if records_path.exists():
        ctx.shards_reused[stage] = ctx.shards_reused.get(stage, 0) + 1
        if progress is not None:
            progress(requests, Usage())
        notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
        return StageResult(pl.read_parquet(records_path), empty(FAILURES), notes)
    result = compute()
    ctx.shards_run[stage] = ctx.shards_run.get(stage, 0) + 1
    if result.failures.is_empty():
        folder.mkdir(parents=True, exist_ok=True)
        write_json(notes_path, result.notes)
        write_parquet(records_path, result.records)  # written last: its presence marks the shard done
    return result


def gated(ctx: RunContext, result: StageResult, stage: GateStage, text_column: str, id_column: str,
          instruction: quality.Instruction | None = None, source_column: str | None = None,
          category_column: str = "category", rekey=None) -> StageResult:
    """A generation task's result through the quality gate with the config's rules for `stage`: `records` keeps
    the rows that passed (a repaired row with its repaired text and the id `rekey(row)` gives it), `rejected` holds
    the others and `repaired` the repairs. Applied after `run_shard` returns, so the stored generation shard (and its
    key) does not depend on the gate's settings."""
    checked = quality.gate(result.records, text_column, ctx.cfg.quality.for_stage(stage), stage, id_column=id_column,
                           category_column=category_column, source_column=source_column, instruction=instruction,
                           rekey=rekey)
    return StageResult(checked.kept, result.failures, result.notes, checked.rejected, checked.repaired)


def rejections(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """The quality gate's rejected rows of a run (QUALITY_REJECTIONS), in a stable order."""
    return (pl.concat(parts) if parts else empty(QUALITY_REJECTIONS)).sort("stage", "category", "id")


def repairs(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """The rows the quality gate repaired in a run (QUALITY_REPAIRS), in a stable order."""
    return (pl.concat(parts) if parts else empty(QUALITY_REPAIRS)).sort("stage", "category", "id", "original_id")


def shards(frame: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    return [frame.slice(i, size) for i in range(0, frame.height, size)] or []


class StageFailedError(RuntimeError):
    """Every request of a stage failed (a dead endpoint, a wrong model name or key): the build stops rather than
    write a release built from nothing."""


def require_some(stage: str, succeeded: int, failures: pl.DataFrame) -> None:
    if succeeded == 0 and failures.height:
        first = failures.row(0, named=True)
        raise StageFailedError(f"every {stage} request failed ({failures.height} failures); first failure, "
                               f"{first['model']}: {first['reason']}")


INTERRUPT_POLL_S = 0.2


def _done_signal(wrapped) -> concurrent.futures.Future:
    """A concurrent.futures.Future that is done when the runner's own future is: the thread pool's is one already,
    a Ray ObjectRef converts, a Dask future calls back."""
    if isinstance(wrapped, concurrent.futures.Future):
        return wrapped
    if hasattr(wrapped, "future"):  # ray.ObjectRef
        return wrapped.future()
    signal_ = concurrent.futures.Future()
    wrapped.add_done_callback(lambda _: signal_.set_result(None))
    return signal_


def gather(futures) -> list:
    """Every task future's value, in order, waking every INTERRUPT_POLL_S so a Ctrl-C is handled at once.

    A signal may land on any thread; Python only runs its handler (raising KeyboardInterrupt) when the main thread
    executes bytecode, and a main thread blocked in an untimed `future.result()` would sleep through the interrupt
    until that shard finished, while the task threads went on sending requests. Each task's value is taken as it
    ends, so one from a worker process is merged into the run (its shards, usage and progress) right away; a failed
    task raises after every other has ended, in the order given.
    """
    waiting = {_done_signal(f.wrapped_future): i for i, f in enumerate(futures)}
    values: dict[int, object] = {}
    while waiting:
        done, _ = concurrent.futures.wait(waiting, timeout=INTERRUPT_POLL_S,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for signal_ in done:
            i = waiting.pop(signal_)
            value = _arrived(futures[i])
            if not isinstance(value, BaseException):
                values[i] = value
    return [values[i] if i in values else futures[i].result() for i in range(len(futures))]


def _arrived(future):
    """A finished task future's value (unpacked and merged into the run when a worker shipped it), or its error."""
    value = future.result(raise_on_failure=False)
    return runner.arrive(value) if isinstance(value, runner.Shipped) else value


class Overlap:
    """Stage tasks whose values start more tasks as they arrive, so that a category goes on to its next stage while
    another is still in an earlier one: no barrier between stages where the next one needs only this shard's or this
    category's results.

        overlap = Overlap()
        overlap.add(seeds_task.submit(ctx, name, prog), then=lambda result: ...submit its rewrites, add them...)
        overlap.wait()

    `then(value)` runs in the flow's thread (where Prefect tasks are submitted from), in the order the tasks end.
    `wait()` returns when nothing is pending, waking every INTERRUPT_POLL_S like `gather` so a Ctrl-C is handled at
    once. After a task failed nothing new is started: the ones running end, then the first failed task (in the order
    they were added) raises.
    """

    def __init__(self) -> None:
        self._waiting: dict[concurrent.futures.Future, tuple[int, object, Callable[[object], None]]] = {}
        self._added = 0
        self._failed: list[tuple[int, object]] = []

    def add(self, future, then: Callable[[object], None]) -> None:
        self._waiting[_done_signal(future.wrapped_future)] = (self._added, future, then)
        self._added += 1

    def wait(self) -> None:
        while self._waiting:
            done, _ = concurrent.futures.wait(self._waiting, timeout=INTERRUPT_POLL_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for signal_ in sorted(done, key=lambda d: self._waiting[d][0]):
                n, future, then = self._waiting.pop(signal_)
                value = _arrived(future)
                if isinstance(value, BaseException):
                    self._failed.append((n, future))
                elif not self._failed:
                    then(value)
        if self._failed:
            min(self._failed, key=lambda f: f[0])[1].result()


def result_of(future):
    """One task future's value (see `gather`)."""
    return gather([future])[0]


def collect(futures, schema: dict, rejected: list[pl.DataFrame] | None = None,
            repaired: list[pl.DataFrame] | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Records, failures and merged notes of finished stage tasks; with `rejected` (`repaired`), each result's
    quality-gate rejections `StageResult.rejected` (repairs `StageResult.repaired`) are appended to that list."""
    return combine(gather(futures), schema, rejected, repaired)


def combine(results: list[StageResult], schema: dict, rejected: list[pl.DataFrame] | None = None,
            repaired: list[pl.DataFrame] | None = None) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """`collect` of results already there, in the order given."""
    records = pl.concat([r.records for r in results], how="vertical") if results else empty(schema)
    failures = pl.concat([r.failures for r in results]) if results else empty(FAILURES)
    if rejected is not None:
        rejected += [r.rejected for r in results if r.rejected is not None]
    if repaired is not None:
        repaired += [r.repaired for r in results if r.repaired is not None]
    notes: dict = {}
    for r in results:
        for k, v in r.notes.items():
            notes.setdefault(k, {}).update(v) if isinstance(v, dict) else notes.__setitem__(k, v)
    return records, failures, notes




def tokens_by_role(usage: list[dict]) -> dict[str, dict]:
    """The hub's per-(role, model) usage rows summed per role, for the manifest and the card."""
    tokens: dict[str, dict] = {}
    for row in usage:
        counts = ("requests", "cached", "failures", "prompt_tokens", "completion_tokens")
        role = tokens.setdefault(row["role"], dict.fromkeys(counts, 0))
        for k in counts:
            role[k] += row[k]
        if row.get("cost") is not None:  # only priced models have a cost; a role with none of them has no cost key
            role["cost"] = role.get("cost", 0.0) + row["cost"]
    return tokens


def published_diversity(splits: dict[str, pl.DataFrame]) -> list[Measured]:
    """OR-Bench's published splits (benign, toxic, hard) to measure, by prompt and per category."""
    return [Measured(name, splits[name]) for name in PUBLISHED if name in splits]


def release_diversity(cfg: RecipeConfig, items: list[Measured], threshold: float) -> Diversity | None:
    """The diversity table (`outputs.diversity.measure`) of a release's published frames, with the embeddings from
    the run's store (the build's dedup has usually embedded every prompt already); None when `diversity.enabled` is
    off."""
    if not cfg.diversity.enabled:
        return None
    with Embedder(cfg.work_dir / "embeddings.sqlite") as embedder:
        return measure(items, embedder, sample=cfg.diversity.sample, seed=cfg.seed, threshold=threshold)
