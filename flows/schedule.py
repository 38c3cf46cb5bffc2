"""Scheduled rebuilds: the build flow on a cron schedule against a running Prefect server, and a diff per release.

`serve(config, cron)` registers `scheduled_build_flow` as a deployment with that schedule and runs it in this
process whenever the server says so (Prefect's `Flow.serve`). `prefect.yaml` at the repository root declares the
same deployment for work-pool users (`prefect deploy`).

Each scheduled run writes a new dated release `<output_dir>/<name>/<YYYYmmdd-HHMMSS>-<run id>`, reusing the request
cache and the stored shards, and writes `diff.json` and `diff.md` into it: prompts added and removed per split and
category, against the newest earlier release of the same name.

With `against_previous` (the default) the previous release's prompts also go into `dedup.against`, with one
exception: prompts this build generates again (same text, so the same prompt_id) are the released prompts
themselves, not near-duplicates of them, and stay. So a rebuild on an unchanged config writes the same splits
(empty diff) instead of an empty release, and a rebuild on a grown config keeps the released rows and adds only new
prompts that are not near-copies of released ones. See docs/design/scheduled-rebuilds.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from orforge.core.config import BuildConfig, load_config, stable_hash
from orforge.flows.build import build
from orforge.flows.common import RELEASE_NAME, next_release_folder
from orforge.outputs.diff import diff_markdown, diff_releases, write_diff
from orforge.outputs.release import MANIFEST

log = logging.getLogger("orforge.schedule")

FLOW_NAME = "orforge-scheduled-build"
SERVER_TIMEOUT_S = 10.0


class ScheduleError(RuntimeError):
    """A schedule cannot be set up (no server, bad cron, bad name); the message is one line for the user."""


# -- checks done before anything is registered ----------------------------------------------------------------------
def check_cron(cron: str) -> str:
    """The cron string if Prefect's own schedule model accepts it (five fields or an alias like @weekly)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron.strip()).cron
    except ValidationError:
        raise ScheduleError(f'--cron "{cron}" is not a valid cron schedule; expected five fields such as '
                            '"0 3 * * 1" (03:00 every Monday)') from None


def check_name(name: str) -> str:
    from prefect.types.names import BANNED_CHARACTERS

    bad = [c for c in BANNED_CHARACTERS if c in name]
    if not name.strip() or bad:
        raise ScheduleError(f"--name {name!r} is not a valid deployment name"
                            + (f" (no {' '.join(bad)})" if bad else ""))
    return name


def check_server(timeout: float = SERVER_TIMEOUT_S) -> str:
    """The API URL of a Prefect server that answers its health check; ScheduleError otherwise.

    Without PREFECT_API_URL, Prefect runs each flow on a temporary server that ends with the process; a schedule
    would live and die with it, so a real server is required.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ScheduleError("schedules need a running Prefect server: start one (`prefect server start`) and set "
                            "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(httpx_settings={"timeout": timeout}, sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ScheduleError(f"the Prefect server at PREFECT_API_URL={url} does not answer "
                            f"({type(problem).__name__}: {problem}); start it or fix the URL")
    return url


# -- releases -------------------------------------------------------------------------------------------------------
def latest_release(cfg: BuildConfig) -> Path | None:
    """The newest complete release of the config's name under its output_dir (dated folder with a manifest)."""
    root = cfg.output_dir / cfg.name
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if RELEASE_NAME.match(p.name) and (p / MANIFEST).is_file())
    return found[-1] if found else None


def with_previous_release(cfg: BuildConfig, previous: Path) -> BuildConfig:
    """`cfg` with the previous release added to `dedup.against`: released prompts that this build makes again are
    kept (see orforge.dedup.released), new near-copies of released prompts are dropped."""
    return cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"against": [*cfg.dedup.against, previous]})})


# -- the flow -------------------------------------------------------------------------------------------------------
@flow(name=FLOW_NAME, persist_result=False, log_prints=True)
def scheduled_build_flow(config_path: str, against_previous: bool = True) -> str:
    """Build a new dated release from the config (re-read every run) and diff it against the newest earlier one."""
    cfg = load_config(config_path)
    previous = latest_release(cfg)
    run_cfg = with_previous_release(cfg, previous) if against_previous and previous is not None else cfg
    folder = build(run_cfg, next_release_folder(cfg, previous))
    if previous is None:
        print(f"release {folder}: the first release of {cfg.name!r}, nothing to diff against")
        return str(folder)
    diff = diff_releases(previous, folder)
    write_diff(folder, diff)
    print(f"release {folder}: {diff['added']} prompts added, {diff['removed']} removed since {previous.name}")
    try:
        create_markdown_artifact(key=f"orforge-diff-{stable_hash(cfg.name, 8)}", markdown=diff_markdown(diff),
                                 description=f"Changes since release {previous.name}")
    except Exception as e:  # noqa: BLE001 - an artifact is a summary; failing to publish it must not fail the run
        log.warning("could not publish the diff artifact: %s", e)
    return str(folder)


def serve(config_path: Path | str, cron: str, name: str | None = None, against_previous: bool = True) -> None:
    """Register `scheduled_build_flow` for `config_path` with a cron schedule and serve it until interrupted.

    Checks come first (cron, name, config, server), so a ScheduleError or ConfigError means nothing was
    registered. Stopping the process pauses the schedule (Prefect's default for served flows).
    """
    from prefect.deployments.runner import EntrypointType

    cron = check_cron(cron)
    cfg = load_config(config_path)
    name = check_name(name or cfg.name)
    check_server()
    scheduled_build_flow.serve(
        name=name,
        cron=cron,
        parameters={"config_path": str(Path(config_path).resolve()), "against_previous": against_previous},
        description=f"orforge rebuild of {cfg.name!r} from {Path(config_path).resolve()}",
        tags=["orforge"],
        # The module path works from any working directory (orforge is installed), a file path only from the repo.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )

