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
import functools
import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from orforge.core.config import BuildConfig, RecipeConfig, stable_hash
from orforge.core.records import FAILURES, StageResult, empty
from orforge.dedup.released import released_prompts
from orforge.flows.progress import StageProgress
from orforge.llm.hub import LLMHub
from orforge.llm.types import Usage
from orforge.outputs.atomic import write_json, write_parquet

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
    """What every task of a recipe's run needs: the config, the one hub, the work dir, and shard bookkeeping."""

    cfg: RecipeConfig
    hub: LLMHub
    work_dir: Path
    shards_reused: dict[str, int] = field(default_factory=dict)
    shards_run: dict[str, int] = field(default_factory=dict)


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


def wait_interruptibly(futures) -> None:
    """Wait for every task future, waking every INTERRUPT_POLL_S so a Ctrl-C is handled at once.

    A signal may land on any thread; Python only runs its handler (raising KeyboardInterrupt) when the main thread
    executes bytecode, and a main thread blocked in an untimed `future.result()` would sleep through the interrupt
    until that shard finished, while the task threads went on sending requests.
    """
    pending = {f.wrapped_future for f in futures}
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=INTERRUPT_POLL_S)


def collect(futures, schema: dict) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    wait_interruptibly(futures)
    results: list[StageResult] = [f.result() for f in futures]
    records = pl.concat([r.records for r in results], how="vertical") if results else empty(schema)
    failures = pl.concat([r.failures for r in results]) if results else empty(FAILURES)
    notes: dict = {}
    for r in results:
        for k, v in r.notes.items():
            notes.setdefault(k, {}).update(v) if isinstance(v, dict) else notes.__setitem__(k, v)
    return records, failures, notes




def tokens_by_role(usage: list[dict]) -> dict[str, dict]:
    """The hub's per-(role, model) usage rows summed per role, for the manifest and the card."""
    tokens: dict[str, dict] = {}
    for row in usage:
        role = tokens.setdefault(row["role"], {"requests": 0, "cached": 0, "failures": 0, "prompt_tokens": 0,
                                               "completion_tokens": 0})
        for k in role:
            role[k] += row[k]
    return tokens
