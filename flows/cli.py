"""The `orforge` command. Exit codes: 0 ok, 1 the run failed, 2 the user asked for something invalid (nothing written).

Every command validates its inputs before it starts a flow or writes a file.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

import flows  # noqa: F401  (sets Prefect's environment defaults before prefect is imported)
from core.config import BuildConfig, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build over-refusal benchmark datasets: seemingly toxic prompts that over-cautious models refuse.")
models_app = typer.Typer(no_args_is_help=True, help="Check the configured models.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the request cache.")
refusal_app = typer.Typer(no_args_is_help=True, help="Detect refusals in model completions.")
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(refusal_app, name="refusal")

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="A YAML config (see configs/).")]


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(path: Path) -> BuildConfig:
    from core.categories import resolve_categories

    try:
        cfg = load_config(path)
        resolve_categories(cfg.categories, str(path))
        return cfg
    except ConfigError as e:
        fail(str(e), 2)


def run_flow(what: str, flow_fn, **params) -> str:
    """Run a flow with progress bars; any failure becomes one line and exit code 1 (interrupts say how to resume)."""
    from flows.progress import RichReporter, use_reporter

    try:
        with use_reporter(RichReporter(err)):
            return flow_fn(**params)
    except KeyboardInterrupt:
        fail(f"{what} interrupted; finished shards and every answered request are kept: run it again to resume", 1)
    except Exception as e:  # noqa: BLE001 - the CLI turns any run failure into one clear line and exit 1
        fail(f"{what} failed: {type(e).__name__}: {e}", 1)


def new_table(title: str, *columns: str) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    return table


@app.command("validate-config")
def validate_config(file: Annotated[Path, typer.Argument(help="The YAML config to check.")]) -> None:
    """Check a config without running anything: exit 0 when valid, 2 with the first problem otherwise."""
    cfg = load(file)
    console.print(f"[green]ok[/] {file}: {len(cfg.all_specs())} model roles, config hash {cfg.config_hash()[:12]}")


@app.command()
def build(config: ConfigOpt, output: Annotated[Path | None, typer.Option(help="Release folder (default: "
          "<output_dir>/<name>/<timestamp>).")] = None) -> None:
    """Run the build flow: seeds -> rewrites -> moderator vote -> dedup -> panel -> release."""
    cfg = load(config)
    if output is not None and output.is_dir() and any(output.iterdir()):
        fail(f"--output {output} exists and is not empty; choose a new folder", 2)
    for what, path in (("--output", output) if output else (f"{config}: output_dir", cfg.output_dir / cfg.name),
                       (f"{config}: work_dir", cfg.work_dir), (f"{config}: cache_path", cfg.cache_path.parent)):
        if problem := _cannot_create_folder(path):
            fail(f"{what} {path}: {problem}", 2)
    from flows.build import build_flow

    started = time.monotonic()
    folder = run_flow("build", build_flow, config_path=str(config), output=str(output) if output else None)
    _print_summary(Path(folder), time.monotonic() - started)


def _cannot_create_folder(path: Path) -> str | None:
    """Why a folder at `path` could not be created (or used), or None. Checked before the build spends anything."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _print_summary(folder: Path, seconds: float) -> None:
    from outputs.release import read_manifest

    manifest = read_manifest(folder)
    table = new_table(f"orforge build: {folder}", "split", "rows", "by category")
    for split in manifest["splits"]:
        cats = ", ".join(f"{k} {v}" for k, v in split["by_category"].items())
        table.add_row(split["name"], str(split["rows"]), cats)
    console.print(table)
    usage = Table(title="requests and tokens per role")
    for col in ("role", "requests", "cached", "failures", "prompt tok", "completion tok"):
        usage.add_column(col, justify="right" if col != "role" else "left")
    for role, u in manifest["tokens"].items():
        usage.add_row(role, *(str(u[k]) for k in ("requests", "cached", "failures", "prompt_tokens",
                                                    "completion_tokens")))
    console.print(usage)
    for key, note in manifest.get("notes", {}).items():
        if key in ("hard", "seed_budget_exhausted"):
            console.print(f"note: {key}: {note}")
    console.print(f"[green]done[/] in {seconds:.0f} s: {folder}")


@app.command()
def evaluate(
    release: Annotated[Path, typer.Option(help="A release folder written by `orforge build`.")],
    config: ConfigOpt,
    benign_sample: Annotated[int | None, typer.Option(help="Also score a seeded sample of this many benign "
                                                      "prompts.", min=1)] = None,
) -> None:
    """Score the config's `targets:` on a release: rejection rates on hard (over-refusal) and toxic (safety)."""
    cfg = load(config)
    from flows.evaluate import EvaluateInputError, evaluate_flow, load_splits

    if not cfg.targets:
        fail(f"{config}: targets: the config lists no models to evaluate", 2)
    try:
        load_splits(release, None, cfg.seed)
    except EvaluateInputError as e:
        fail(str(e), 2)
    folder = Path(run_flow("evaluate", evaluate_flow, release=str(release), config_path=str(config),
                           benign_sample=benign_sample))
    import polars as pl

    scores = pl.read_csv(folder / "scores.csv").filter(pl.col("category") == "all")
    table = new_table(f"rejection rates (95% bootstrap interval): {folder}", "model", "split", "n", "rejection rate",
                      "95% CI")
    for row in scores.iter_rows(named=True):
        table.add_row(row["model"], row["split"], str(row["n"]), f"{row['rejection_rate']:.3f}",
                      f"{row['ci_low']:.3f} - {row['ci_high']:.3f}")
    console.print(table)
    console.print(f"plots: {folder / 'scatter.png'}, {folder / 'categories.png'}; report: {release / 'report.html'}")


@app.command()
def audit(
    release: Annotated[Path, typer.Option(help="A release folder written by `orforge build`.")],
    human: Annotated[Path | None, typer.Option(help="CSV with `label` (toxic/benign) and `id` or `prompt`.")]
    = None,
) -> None:
    """Moderator agreement: pairwise and Fleiss' kappa, toxic rates, category confusion, the most contested prompts."""
    from flows.audit import AuditInputError, audit_flow, check_inputs

    try:
        check_inputs(release, human)
    except AuditInputError as e:
        fail(str(e), 2)
    folder = Path(run_flow("audit", audit_flow, release=str(release), human=str(human) if human else None))
    import polars as pl

    pairwise = pl.read_csv(folder / "pairwise.csv").filter(pl.col("category") == "all")
    table = new_table(f"moderator agreement: {folder}", "moderator a", "moderator b", "n", "raw agreement",
                      "Cohen's kappa")
    for row in pairwise.iter_rows(named=True):
        kappa = "n/a" if row["cohen_kappa"] is None else f"{row['cohen_kappa']:.3f}"
        table.add_row(row["moderator_a"], row["moderator_b"], str(row["n"]), f"{row['raw_agreement']:.3f}", kappa)
    console.print(table)
    if (folder / "human.csv").exists():
        human_table = pl.read_csv(folder / "human.csv")
        for row in human_table.iter_rows(named=True):
            console.print(f"vs human: {row['rater']}: accuracy {row['accuracy']}, kappa {row['cohen_kappa']} "
                          f"({row['n_matched']} matched)")
    console.print(f"audit files in {folder}; report: {release / 'report.html'}")


@app.command("add-category")
def add_category(
    release: Annotated[Path, typer.Option(help="The release folder to extend.")],
    name: Annotated[str | None, typer.Option(help="The new category's name (lowercase, digits, - or _).")] = None,
    description: Annotated[str | None, typer.Option(help="One sentence saying what belongs in it.")] = None,
    examples: Annotated[Path | None, typer.Option(help="Example prompts, one per line (or a CSV with `prompt`).")]
    = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Models to use, and/or new categories in "
                                                "categories.custom (default: the release's own config).")] = None,
    output: Annotated[Path | None, typer.Option(help="New release folder (default: beside the old one).")] = None,
) -> None:
    """Add rejection categories to a release: a new release folder with the old rows unchanged plus the new ones."""
    from pydantic import ValidationError

    from core.config import CategorySpec
    from flows.add_category import AddCategoryError, add_category_flow, existing_categories, plan

    cfg = load(config) if config else None
    new: list[CategorySpec] = []
    if name or description:
        if not (name and description):
            fail("--name and --description go together", 2)
        example_list: list[str] = []
        if examples is not None:
            if not examples.is_file():
                fail(f"--examples {examples}: no such file", 2)
            if examples.suffix == ".csv":
                import polars as pl

                example_list = pl.read_csv(examples)["prompt"].to_list()
            else:
                example_list = [line.strip() for line in examples.read_text().splitlines() if line.strip()]
        try:
            new.append(CategorySpec(name=name, description=description, examples=example_list))
        except ValidationError as e:
            fail(f"--name {name!r}: {e.errors()[0]['msg']}", 2)
    elif cfg is not None:
        try:
            taken = existing_categories(release)
        except Exception:  # noqa: BLE001 - plan() below reports what is wrong with the release
            taken = set()
        new = [c for c in cfg.categories.custom if c.name not in taken]
    try:
        plan(release, new, cfg)
    except AddCategoryError as e:
        fail(str(e), 2)
    if output is not None and output.exists():
        fail(f"--output {output} already exists", 2)
    started = time.monotonic()
    folder = run_flow("add-category", add_category_flow, release=str(release),
                      categories=[c.model_dump() for c in new], config_path=str(config) if config else None,
                      output=str(output) if output else None)
    _print_summary(Path(folder), time.monotonic() - started)


@app.command()
def serve(
    config: ConfigOpt,
    cron: Annotated[str, typer.Option(help='When to rebuild, as cron: "0 3 * * 1" is Mondays at 03:00 UTC.')],
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the config's name).")] = None,
) -> None:
    """Rebuild on a schedule: register a cron deployment on the Prefect server at PREFECT_API_URL and serve it.

    Each run writes a new dated release with diff.json/diff.md against the previous one. Ctrl-C stops serving and
    pauses the deployment.
    """
    load(config)
    from flows.schedule import ScheduleError
    from flows.schedule import serve as serve_schedule

    try:
        serve_schedule(config, cron, name)  # checks cron, name and server before registering anything
    except ScheduleError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - the CLI turns any serving failure into one clear line and exit 1
        fail(f"serve failed: {type(e).__name__}: {e}", 1)


@models_app.command("check")
def models_check(config: ConfigOpt) -> None:
    """Send one tiny structured request to every configured model; exit 1 if any fails."""
    from pydantic import BaseModel

    from llm.hub import LLMHub
    from llm.types import LLMRequest

    class Ping(BaseModel):
        ok: bool

    cfg = load(config)
    table = new_table("models check", "role", "name", "backend", "dialect", "result", "latency", "reply / error")
    failures: list[str] = []
    seen: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory() as tmp, LLMHub(Path(tmp) / "check.sqlite") as hub:
        for role, spec in cfg.all_specs():
            if (role, spec.label) in seen:
                continue
            seen.add((role, spec.label))
            request = LLMRequest.chat('Reply with the JSON object {"ok": true}.', response_model=Ping)
            start = time.monotonic()
            try:
                result = hub.model(spec, role).generate([request])[0]
                ok, detail = result.ok, (result.text if result.ok else result.error)
            except Exception as e:  # noqa: BLE001 - a model that cannot even start is a failed check
                ok, detail = False, f"{type(e).__name__}: {e}"
            if not ok:
                failures.append(f"{role} {spec.label}: {detail}")
            table.add_row(role, spec.label, spec.backend, spec.dialect, "[green]ok[/]" if ok else "[red]failed[/]",
                          f"{time.monotonic() - start:.2f} s", (detail or "")[:120])
    console.print(table)
    for line in failures:
        err.print(f"[red]failed[/] {line}", highlight=False, soft_wrap=True)
    if failures:
        fail(f"{len(failures)} model(s) failed the check", 1)


@cache_app.command("stats")
def cache_stats(config: ConfigOpt) -> None:
    """Entries, size and tokens in the request cache, per backend and model."""
    from llm.cache import Cache

    cfg = load(config)
    if not cfg.cache_path.exists():
        console.print(f"no cache yet at {cfg.cache_path}")
        return
    cache = Cache(cfg.cache_path)
    stats = cache.stats()
    cache.close()
    table = new_table(f"cache {stats['path']}: {stats['entries']} entries, {stats['bytes'] / 1e6:.1f} MB",
                      "backend", "model", "entries", "prompt tok", "completion tok")
    for row in stats["by_model"]:
        table.add_row(row["backend"], row["model"], str(row["entries"]), str(row["prompt_tokens"]),
                      str(row["completion_tokens"]))
    console.print(table)


@cache_app.command("clear")
def cache_clear(config: ConfigOpt, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Delete every cached answer (the next build asks the models again)."""
    from llm.cache import Cache

    cfg = load(config)
    if not cfg.cache_path.exists():
        console.print(f"no cache at {cfg.cache_path}")
        return
    if not yes and not typer.confirm(f"delete every entry in {cfg.cache_path}?"):
        raise typer.Exit(1)
    cache = Cache(cfg.cache_path)
    n = cache.clear()
    cache.close()
    console.print(f"removed {n} entries from {cfg.cache_path}")


@refusal_app.command("classify")
def refusal_classify(
    input: Annotated[Path, typer.Option("--input", "-i", help="CSV or parquet with columns prompt, response.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV or parquet to write (by extension).")],
    method: Annotated[str, typer.Option(help="keyword | judge | keyword_then_judge")] = "keyword",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config whose refusal.judge is the judge.")]
    = None,
) -> None:
    """Add `refusal`, `label` and `method` columns to a file of model completions."""
    import polars as pl

    from moderators.refusal import classify_refusals

    if method not in ("keyword", "judge", "keyword_then_judge"):
        fail(f"--method must be keyword, judge or keyword_then_judge, got {method!r}", 2)
    if not input.is_file():
        fail(f"--input {input}: no such file", 2)
    if output.suffix not in (".csv", ".parquet"):
        fail(f"--output {output}: must end in .csv or .parquet", 2)
    try:
        frame = pl.read_parquet(input) if input.suffix == ".parquet" else pl.read_csv(input)
    except Exception as e:  # noqa: BLE001
        fail(f"--input {input}: cannot read it: {e}", 2)
    missing = [c for c in ("prompt", "response") if c not in frame.columns]
    if missing:
        fail(f"--input {input}: missing column(s) {', '.join(missing)}", 2)
    judge_spec = None
    if method != "keyword":
        if config is None:
            fail(f"--method {method} needs --config with refusal.judge", 2)
        cfg = load(config)
        judge_spec = cfg.refusal.judge
        if judge_spec is None:
            fail(f"{config}: refusal.judge is not set", 2)
        cache_path = cfg.cache_path
    else:
        cache_path = None
    from llm.hub import LLMHub
    from outputs.atomic import write_csv, write_parquet

    with tempfile.TemporaryDirectory() as tmp, LLMHub(cache_path or Path(tmp) / "c.sqlite") as hub:
        judge = hub.model(judge_spec, "judge") if judge_spec else None
        result = classify_refusals(frame, method, judge)
    (write_parquet if output.suffix == ".parquet" else write_csv)(output, result.records)
    counts = result.records["method"].value_counts().sort("method").rows()
    refused = result.records["refusal"].sum()
    console.print(f"{result.records.height} rows -> {output}: {refused} refusals; decided by "
                  + ", ".join(f"{m} {n}" for m, n in counts))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
