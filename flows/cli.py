"""The `orforge` command. Exit codes: 0 ok, 1 the run failed, 2 the user asked for something invalid (nothing
written), 130 interrupted (Ctrl-C; rerun to resume).

Every command validates its inputs before it starts a flow or writes a file. Every failure a user sees is one line:
library messages are cut to their first line, and Prefect's own per-run logging (task tracebacks, "Crash
detected!") stays off the console; it goes to the run's log file under `<work_dir>/logs/` when the command has a
config, and to the Prefect server's run logs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import orforge.flows  # noqa: F401  (sets Prefect's environment defaults before prefect is imported)
from orforge.core.config import BuildConfig, ConfigError, ModelSpec, RecipeConfig
from orforge.core.recipes import load_config

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

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
MAX_MESSAGE = 400
# Prefect's per-run loggers: task tracebacks, "Finished in state Failed", "Crash detected!".
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def one_line(text: object) -> str:
    """The first non-empty line of a message (libraries add advice and context on further lines), whitespace
    collapsed and cut to MAX_MESSAGE characters."""
    first = next((line for line in str(text).splitlines() if line.strip()), "")
    first = " ".join(first.split())
    return first if len(first) <= MAX_MESSAGE else first[: MAX_MESSAGE - 3] + "..."


def describe(error: BaseException) -> str:
    """`TypeName: first line of its message`, or the type name alone when the message is empty."""
    message = one_line(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(path: Path, recipe: str | None = None) -> RecipeConfig:
    """A config of any recipe, fully checked (categories resolve, a tree file loads); exit 2 with one line if not.
    `recipe`: the command only serves that recipe."""
    from orforge.flows.recipes import recipe as recipe_of

    try:
        cfg = load_config(path)
        recipe_of(cfg.recipe).check(cfg)
    except ConfigError as e:
        fail(one_line(f"{path}: {e}" if not str(e).startswith(str(path)) else e), 2)
    if recipe is not None and cfg.recipe != recipe:
        fail(f"{path}: recipe {cfg.recipe!r}: this command serves the {recipe} recipe only", 2)
    from orforge.flows.runner import RunnerError, task_runner

    try:
        task_runner(cfg.runner)  # its package is installed (nothing connects before a flow starts)
    except RunnerError as e:
        fail(f"{path}: runner.kind: {e}", 2)
    return cfg


def release_recipe(release: Path) -> str:
    """The recipe a release was built with (its manifest), or exit 2 for a folder that is not a release."""
    from orforge.outputs.release import read_manifest

    try:
        return read_manifest(release).recipe
    except Exception as e:  # noqa: BLE001 - a missing or foreign manifest is bad input
        fail(f"--release {release}: {describe(e)}", 2)


class _FolderMakingFileHandler(logging.FileHandler):
    """A file handler that creates the file (and its folder) only when the first record arrives."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def quiet_prefect_runs(log_file: Path | None) -> Iterator[None]:
    """Keep Prefect's flow- and task-run records off the console for the duration of a flow: they still reach the
    Prefect server (their own handler), and `log_file` when given. Restored afterwards (tests run many commands in
    one process)."""
    import prefect  # noqa: F401, PLC0415 - configures Prefect's logging first, so our settings are not overwritten

    loggers = [logging.getLogger(name) for name in PREFECT_RUN_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    handler = None
    if log_file is not None:
        handler = _FolderMakingFileHandler(log_file, delay=True, encoding="utf-8")
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for lg in loggers:
        lg.propagate = False
        if handler is not None:
            lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.propagate = propagate
            if handler is not None:
                lg.removeHandler(handler)
        if handler is not None:
            handler.close()


def run_log_file(cfg: BuildConfig | None, what: str) -> Path | None:
    """`<work_dir>/logs/<command>-<UTC time>.log` for a command that has a config (written only if Prefect logs)."""
    if cfg is None:
        return None
    return cfg.work_dir / "logs" / f"{what}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def run_flow(what: str, flow_fn, log_file: Path | None = None, **params) -> str:
    """Run a flow with progress bars; any failure becomes one line and exit code 1, an interrupt exit code 130 with
    how to resume."""
    from orforge.flows.progress import RichReporter, use_reporter

    from orforge.flows.common import start_temporary_server_outside_terminal_group

    details = ""
    try:
        start_temporary_server_outside_terminal_group()
        with quiet_prefect_runs(log_file):
            try:
                with use_reporter(RichReporter(err)):
                    return flow_fn(**params)
            finally:
                details = f" (details: {log_file})" if log_file is not None and log_file.is_file() else ""
    except KeyboardInterrupt:
        fail(f"{what} interrupted; finished shards and every answered request are kept: run it again to resume",
             INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the CLI turns any run failure into one clear line and exit 1
        fail(f"{what} failed: {describe(e)}{details}", 1)


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
def plan(config: ConfigOpt, as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")]
         = False) -> None:
    """Estimate a build before running it: requests and tokens per stage and role, and their cost where the config
    gives prices. Nothing is sent, no model is started and nothing is written."""
    import json

    from orforge.flows.plan import make_plan
    from orforge.flows.recipes import recipe

    cfg = load(config)
    try:
        estimate = make_plan(cfg, recipe(cfg.recipe).plan)
    except (ConfigError, ValueError) as e:  # e.g. an ingest file that cannot be read
        fail(f"{config}: {one_line(e)}", 2)
    if as_json:
        print(json.dumps(estimate.as_dict(), indent=2))
        return
    console.print(estimate.table())
    for note in estimate.notes:
        console.print(f"note: {escape(note)}", highlight=False)


@app.command()
def build(config: ConfigOpt, output: Annotated[Path | None, typer.Option(help="Release folder (default: "
          "<output_dir>/<name>/<timestamp>).")] = None) -> None:
    """Build a release with the config's recipe (orbench: seeds -> rewrites -> vote -> dedup -> panel; select:
    concept tree -> questions -> dedup and leak flags -> abstention splits)."""
    cfg = load(config)
    if output is not None and output.is_dir() and any(output.iterdir()):
        fail(f"--output {output} exists and is not empty; choose a new folder", 2)
    for what, path in (("--output", output) if output else (f"{config}: output_dir", cfg.output_dir / cfg.name),
                       (f"{config}: work_dir", cfg.work_dir), (f"{config}: cache_path", cfg.cache_path.parent)):
        if problem := _cannot_create_folder(path):
            fail(f"{what} {path}: {problem}", 2)
    from orforge.flows.recipes import recipe

    started = time.monotonic()
    from orforge.flows.runner import with_runner

    folder = run_flow("build", with_runner(recipe(cfg.recipe).build, cfg), run_log_file(cfg, "build"),
                      config_path=str(config),
                      output=str(output) if output else None)
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
    from orforge.outputs.release import read_manifest

    manifest = read_manifest(folder)
    table = new_table(f"orforge build: {folder}", "split", "rows", "rows per category (select: per target concept)")
    for split in manifest.splits:
        cats = ", ".join(f"{k} {v}" for k, v in split.by_category.items())
        table.add_row(split.name, str(split.rows), cats)
    console.print(table)
    usage = Table(title="requests and tokens per role")
    priced = manifest.currency is not None
    for col in ("role", "requests", "cached", "failures", "prompt tok", "completion tok",
                *([f"cost {manifest.currency}"] if priced else [])):
        usage.add_column(col, justify="right" if col != "role" else "left")
    for role, u in manifest.tokens.items():
        usage.add_row(role, *("-" if v is None else str(v) for v in (u.requests, u.cached, u.failures,
                                                                    u.prompt_tokens, u.completion_tokens)),
                      *([f"{u.cost:.4f}" if u.cost is not None else "-"] if priced else []))
    console.print(usage)
    if replicas := manifest.notes.get("replicas"):  # a role behind a base_url list (llm/replicas.py)
        table = Table(title="replicas")
        table.add_column("url", overflow="fold")
        for col in ("model", "requests", "failures", "peak in flight", "status"):
            table.add_column(col, justify="right" if col not in ("model", "status") else "left")
        for r in replicas:
            table.add_row(*(escape(str(r.get(k))) for k in ("url", "model", "requests", "failures", "peak_in_flight")),
                          "[red]taken out[/]" if r.get("taken_out") else "live")
        console.print(table)
        for r in replicas:
            if r.get("taken_out"):
                console.print(f"note: replica {escape(str(r['url']))} taken out: {escape(one_line(r.get('why')))}",
                              highlight=False, soft_wrap=True)
    for key, note in manifest.notes.items():
        if key in ("hard", "seed_budget_exhausted"):
            console.print(f"note: {key}: {note}")
    console.print(f"[green]done[/] in {seconds:.0f} s: {folder}")


def _each_replica(specs: list[tuple[str, ModelSpec]]) -> Iterator[tuple[str, ModelSpec, int]]:
    """(role, spec, sample index) with a base_url list split into one spec per replica, named `<label> @ <url>`, so
    `models check` pings every replica; each its own sample index, or the cache would answer all but the first."""
    for role, spec in specs:
        if not isinstance(spec.base_url, list):
            yield role, spec, 0
            continue
        for i, url in enumerate(spec.base_url):
            yield role, spec.model_copy(update={"base_url": url, "name": f"{spec.label} @ {url}"}), i


@app.command()
def evaluate(
    release: Annotated[Path, typer.Option(help="A release folder written by `orforge build`.")],
    config: ConfigOpt,
    benign_sample: Annotated[int | None, typer.Option(help="Also score a seeded sample of this many benign "
                                                      "prompts.", min=1)] = None,
) -> None:
    """Score the config's `targets:` on a release: rejection rates on hard (over-refusal) and toxic (safety) for
    orbench; abstention, generalization and specificity per technique for select."""
    cfg = load(config)
    built_with = release_recipe(release)
    if built_with != cfg.recipe:
        fail(f"--release {release} was built with recipe {built_with!r} but {config} is a {cfg.recipe!r} config", 2)
    if not cfg.targets:
        fail(f"{config}: targets: the config lists no models to evaluate", 2)
    if cfg.recipe == "select":
        return _evaluate_select(release, config, cfg)
    if cfg.recipe == "alert":
        return _evaluate_alert(release, config, cfg)
    from orforge.flows.evaluate import EvaluateInputError, evaluate_flow, load_splits

    try:
        load_splits(release, None, cfg.seed)
    except EvaluateInputError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - a damaged split file is bad input, not a crash
        fail(f"--release {release}: cannot read its splits: {describe(e)}", 2)
    from orforge.flows.runner import with_runner

    folder = Path(run_flow("evaluate", with_runner(evaluate_flow, cfg), run_log_file(cfg, "evaluate"),
                           release=str(release),
                           config_path=str(config), benign_sample=benign_sample))
    import polars as pl

    scores = pl.read_csv(folder / "scores.csv").filter(pl.col("category") == "all")
    table = new_table(f"rejection rates (95% Wilson interval): {folder}", "model", "split", "n", "rejection rate",
                      "95% CI")
    for row in scores.iter_rows(named=True):
        table.add_row(row["model"], row["split"], str(row["n"]), f"{row['rejection_rate']:.3f}",
                      f"{row['ci_low']:.3f} - {row['ci_high']:.3f}")
    console.print(table)
    contrast = pl.read_csv(folder / "contrast.csv", infer_schema_length=None).filter(pl.col("category") == "all")
    if contrast.height:
        table = new_table("contrast pairs (benign prompt, its toxic seed): share of decided pairs, 95% Wilson "
                          "interval", "model", "outcome", "pairs", "share", "95% CI")
        for row in contrast.iter_rows(named=True):
            share = "n/a" if row["rate"] is None else f"{row['rate']:.3f}"
            ci = "n/a" if row["ci_low"] is None else f"{row['ci_low']:.3f} - {row['ci_high']:.3f}"
            table.add_row(row["model"], row["meaning"], f"{row['n']} of {row['n_pairs']}", share, ci)
        console.print(table)
    console.print(f"plots: {folder / 'scatter.png'}, {folder / 'categories.png'}; report: {release / 'report.html'}")


def _check_readable(release: Path, read) -> None:
    """Exit 2 with one line, before any model is called, when `read(release)` cannot read what evaluate needs."""
    from orforge.flows.common import EvaluateInputError

    try:
        read(release)
    except EvaluateInputError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - a damaged release file is bad input, not a crash
        fail(f"--release {release}: cannot read it: {describe(e)}", 2)


def _evaluate_select(release: Path, config: Path, cfg) -> None:
    import polars as pl

    from orforge.flows.select import load_release_for_evaluation, select_evaluate_flow

    _check_readable(release, load_release_for_evaluation)
    from orforge.flows.runner import with_runner

    folder = Path(run_flow("evaluate", with_runner(select_evaluate_flow, cfg), run_log_file(cfg, "evaluate"),
                           release=str(release),
                           config_path=str(config)))
    scores = pl.read_csv(folder / "scores.csv")
    table = new_table(f"abstention (mean over concepts, 95% t-interval): {folder}", "model", "technique",
                      "abstention", "generalization", "specificity", "harmonic mean")

    def cell(row: dict, metric: str) -> str:
        value, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
        if value is None:
            return "n/a"
        return f"{value:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")

    for row in scores.iter_rows(named=True):
        table.add_row(row["model"], row["technique"], *(cell(row, m) for m in (
            "abstention_rate", "generalization_rate", "specificity", "harmonic_mean")))
    console.print(table)
    console.print(f"tables and plots in {folder}; report: {release / 'report.html'}")


def _evaluate_alert(release: Path, config: Path, cfg) -> None:
    import polars as pl

    from orforge.flows.alert import alert_evaluate_flow, load_release_prompts

    if cfg.evaluation is None:
        fail(f"{config}: evaluation: name the safety judges (evaluation.judges) to score an ALERT release", 2)
    _check_readable(release, load_release_prompts)
    from orforge.flows.runner import with_runner

    folder = Path(run_flow("evaluate", with_runner(alert_evaluate_flow, cfg), run_log_file(cfg, "evaluate"),
                           release=str(release),
                           config_path=str(config)))
    scores = pl.read_csv(folder / "safety_scores.csv")
    overall = scores.filter(pl.col("dimension").is_in(["overall", "attack_type"]))
    table = new_table(f"safety score = share judged safe (95% Wilson interval): {folder}", "model", "prompts",
                      "n", "safety score", "95% CI")
    for row in overall.iter_rows(named=True):
        ci = "n/a" if row["ci_low"] is None else f"{row['ci_low']:.3f} - {row['ci_high']:.3f}"
        score = "n/a" if row["safety_score"] is None else f"{row['safety_score']:.3f}"
        table.add_row(row["model"], row["group"], str(row["n"]), score, ci)
    console.print(table)
    console.print(f"tables and plots in {folder}; report: {release / 'report.html'}")


audit_app = typer.Typer(help="Moderator agreement, and human audits: draw a blinded sample, score the labels.")
app.add_typer(audit_app, name="audit")


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    release: Annotated[Path | None, typer.Option(help="A release folder written by `orforge build`.")] = None,
    human: Annotated[Path | None, typer.Option(help="Human labels: a filled-in audit_sample.csv (from `orforge "
                                               "audit sample`), or a CSV with `label` (toxic/benign) and `id` or "
                                               "`prompt`.")] = None,
    key: Annotated[Path | None, typer.Option(help="The sample's audit_key.csv (default: beside --human).")] = None,
) -> None:
    """Moderator agreement: pairwise and Fleiss' kappa, toxic rates, category confusion, the most contested prompts;
    with --human, each moderator's, the ensemble's and the panel's accuracy and kappa against people, per category."""
    if ctx.invoked_subcommand is not None:
        return
    if release is None:
        fail("--release is required (or use `orforge audit sample`)", 2)
    from orforge.flows.audit import AuditInputError, audit_flow, check_inputs
    from orforge.flows.recipes import recipe

    built_with = release_recipe(release)
    if not recipe(built_with).audits_moderators:
        fail(f"--release {release}: a {built_with} release has no moderator votes to audit", 2)
    try:
        check_inputs(release, human, key)
    except AuditInputError as e:
        fail(str(e), 2)
    folder = Path(run_flow("audit", audit_flow, release=str(release), human=str(human) if human else None,
                           key=str(key) if key else None))
    import polars as pl

    pairwise = pl.read_csv(folder / "pairwise.csv").filter(pl.col("category") == "all")
    if pairwise.is_empty():
        console.print("note: only one moderator (or judge) voted, so there is no pair to compare")
    table = new_table(f"moderator agreement: {folder}", "moderator a", "moderator b", "n", "raw agreement",
                      "Cohen's kappa")
    for row in pairwise.iter_rows(named=True):
        kappa = "n/a" if row["cohen_kappa"] is None else f"{row['cohen_kappa']:.3f}"
        table.add_row(row["moderator_a"], row["moderator_b"], str(row["n"]), f"{row['raw_agreement']:.3f}", kappa)
    console.print(table)
    if human is not None and (folder / "human.csv").exists():
        overall = pl.read_csv(folder / "human.csv", infer_schema_length=None).filter(pl.col("category") == "all")
        table = new_table("against the people (all categories; per category in human.csv)", "rater", "n",
                          "accuracy", "Cohen's kappa")
        for row in overall.iter_rows(named=True):
            table.add_row(row["rater"], str(row["n_matched"]), *("n/a" if row[c] is None else f"{row[c]:.3f}"
                                                                for c in ("accuracy", "cohen_kappa")))
        console.print(table)
        console.print(f"quoted in the card: {release / 'README.md'}")
    console.print(f"audit files in {folder}; report: {release / 'report.html'}")


@audit_app.command("sample")
def audit_sample(
    release: Annotated[Path, typer.Option(help="A release folder written by `orforge build`.")],
    n: Annotated[int, typer.Option("--n", help="Prompts to draw.", min=1)] = 200,
    stratify: Annotated[str | None, typer.Option(help="Strata, comma-separated, of category, decision, split: "
                                                 "proportional, at least one per stratum.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the release's config seed).")] = None,
    out: Annotated[Path | None, typer.Option(help="New folder for the files (default: "
                                             "<release>/audit/human-sample-n<N>-seed<S>).")] = None,
) -> None:
    """Write a blinded sample for people to label (audit_sample.csv: no votes, decisions or model names) and its key
    (audit_key.csv); then run `orforge audit --release DIR --human <filled-in audit_sample.csv>`."""
    from orforge.flows.audit import AuditInputError, sample

    built_with = release_recipe(release)
    if built_with != "orbench":
        fail(f"--release {release}: human-audit samples are drawn from orbench releases, not {built_with}", 2)
    strata = [c.strip() for c in (stratify or "").split(",") if c.strip()]
    try:
        folder, facts = sample(release, n, strata, seed, out)
    except AuditInputError as e:
        fail(str(e), 2)
    table = new_table(f"audit sample: {facts['n']} of {facts['population']} judged prompts, seed {facts['seed']}",
                      "stratum (" + (" / ".join(strata) or "none") + ")", "rows")
    for stratum, rows in facts["allocation"].items():
        table.add_row(stratum, str(rows))
    console.print(table)
    console.print(f"to label: {folder / 'audit_sample.csv'}; key (keep it from the labellers): "
                  f"{folder / 'audit_key.csv'}")


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

    from orforge.core.config import CategorySpec
    from orforge.flows.add_category import AddCategoryError, add_category_flow, existing_categories, plan

    cfg = load(config, recipe="orbench") if config else None
    new: list[CategorySpec] = []
    if name or description:
        if not (name and description):
            fail("--name and --description go together", 2)
        example_list: list[str] = []
        if examples is not None:
            if not examples.is_file():
                fail(f"--examples {examples}: no such file", 2)
            try:
                if examples.suffix == ".csv":
                    import polars as pl

                    example_list = pl.read_csv(examples, columns=["prompt"])["prompt"].drop_nulls().to_list()
                else:
                    example_list = [line.strip() for line in examples.read_text().splitlines() if line.strip()]
            except Exception as e:  # noqa: BLE001 - an unreadable examples file is bad input
                fail(f"--examples {examples}: cannot read it: {describe(e)}", 2)
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
    if (release / "manifest.json").is_file() and release_recipe(release) != "orbench":
        fail(f"--release {release}: add-category extends orbench releases only", 2)
    try:
        plan(release, new, cfg)
    except AddCategoryError as e:
        fail(str(e), 2)
    if output is not None and output.exists():
        fail(f"--output {output} already exists", 2)
    started = time.monotonic()
    from orforge.flows.runner import with_runner

    folder = run_flow("add-category", with_runner(add_category_flow, cfg), run_log_file(cfg, "add-category"),
                      release=str(release),
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
    load(config, recipe="orbench")
    from orforge.flows.schedule import ScheduleError
    from orforge.flows.schedule import serve as serve_schedule

    try:
        serve_schedule(config, cron, name)  # checks cron, name and server before registering anything
    except ScheduleError as e:
        fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - the CLI turns any serving failure into one clear line and exit 1
        fail(f"serve failed: {describe(e)}", 1)


@models_app.command("check")
def models_check(config: ConfigOpt) -> None:
    """Send one tiny structured request to every configured model; exit 1 if any fails."""
    from pydantic import BaseModel

    from orforge.llm.hub import LLMHub
    from orforge.llm.types import LLMRequest

    class Ping(BaseModel):
        ok: bool

    cfg = load(config)
    table = new_table("models check", "role", "name", "backend", "dialect", "result", "latency", "reply / error")
    failures: list[str] = []
    seen: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory() as tmp, LLMHub(Path(tmp) / "check.sqlite") as hub:
        for role, spec, ping in _each_replica(cfg.all_specs()):
            if (role, spec.label) in seen:
                continue
            seen.add((role, spec.label))
            request = LLMRequest.chat('Reply with the JSON object {"ok": true}.', response_model=Ping,
                                      sample_index=ping)
            start = time.monotonic()
            try:
                result = hub.model(spec, role).generate([request])[0]
                ok, detail = result.ok, (result.text if result.ok else result.error)
            except Exception as e:  # noqa: BLE001 - a model that cannot even start is a failed check
                ok, detail = False, describe(e)
            if not ok:
                failures.append(f"{role} {spec.label}: {detail}")
            table.add_row(role, spec.label, spec.backend, spec.dialect, "[green]ok[/]" if ok else "[red]failed[/]",
                          f"{time.monotonic() - start:.2f} s", (detail or "")[:120])
    console.print(table)
    for line in failures:
        err.print(f"[red]failed[/] {escape(one_line(line))}", highlight=False, soft_wrap=True)
    if failures:
        fail(f"{len(failures)} model(s) failed the check", 1)


@cache_app.command("stats")
def cache_stats(config: ConfigOpt) -> None:
    """Entries, size and tokens in the request cache, per backend and model."""
    from orforge.llm.cache import Cache

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
    from orforge.llm.cache import Cache

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
    method: Annotated[str, typer.Option(help="phrase | keyword | heuristic | judge | keyword_then_judge")]
    = "keyword",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config whose refusal.judge is the judge.")]
    = None,
    phrase: Annotated[str, typer.Option(help="The abstention token the `phrase` method looks for.")] = "ABSTAIN",
) -> None:
    """Add `refusal`, `label` and `method` columns to a file of model completions."""
    import polars as pl

    from orforge.moderators.abstention import classify_abstentions, methods

    if method not in methods():
        fail(f"--method must be one of {', '.join(methods())}, got {method!r}", 2)
    if method == "phrase" and not phrase.strip():
        fail("--phrase must not be empty", 2)
    if not input.is_file():
        fail(f"--input {input}: no such file", 2)
    if output.suffix not in (".csv", ".parquet"):
        fail(f"--output {output}: must end in .csv or .parquet", 2)
    if not output.parent.is_dir():
        fail(f"--output {output}: the folder {output.parent} does not exist", 2)
    try:
        frame = pl.read_parquet(input) if input.suffix == ".parquet" else pl.read_csv(input)
    except Exception as e:  # noqa: BLE001 - whatever polars or the file system says, it is unreadable input
        fail(f"--input {input}: cannot read it: {describe(e)}", 2)
    missing = [c for c in ("prompt", "response") if c not in frame.columns]
    if missing:
        fail(f"--input {input}: missing column(s) {', '.join(missing)}", 2)
    judge_spec = None
    if method in ("judge", "keyword_then_judge"):
        if config is None:
            fail(f"--method {method} needs --config with refusal.judge", 2)
        cfg = load(config)
        judge_spec = cfg.refusal.judge
        if judge_spec is None:
            fail(f"{config}: refusal.judge is not set", 2)
        cache_path = cfg.cache_path
    else:
        cache_path = None
    from orforge.llm.hub import LLMHub
    from orforge.outputs.atomic import write_csv, write_parquet

    with tempfile.TemporaryDirectory() as tmp, LLMHub(cache_path or Path(tmp) / "c.sqlite") as hub:
        judge = hub.model(judge_spec, "judge") if judge_spec else None
        result = classify_abstentions(frame, method, judge, phrase=phrase.strip())
    try:
        (write_parquet if output.suffix == ".parquet" else write_csv)(output, result.records)
    except OSError as e:
        fail(f"--output {output}: cannot write it: {describe(e)}", 1)
    counts = result.records["method"].value_counts().sort("method").rows()
    refused = result.records["refusal"].sum()
    console.print(f"{result.records.height} rows -> {output}: {refused} refusals; decided by "
                  + ", ".join(f"{m} {n}" for m, n in counts))


def default_embedding_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orforge" / "embeddings.sqlite"


@app.command()
def stats(
    file: Annotated[Path, typer.Argument(help="A CSV, JSONL or parquet file with a text column.")],
    column: Annotated[str, typer.Option(help="The column holding the text.")] = "prompt",
    by: Annotated[str | None, typer.Option(help="Also measure each value of this column (e.g. category).")] = None,
    sample: Annotated[int, typer.Option(help="At most this many prompts per group, drawn with --seed.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    threshold: Annotated[float, typer.Option(help="Cosine at which two prompts share a cluster (the dedup "
                                                  "threshold).")] = 0.9,
    json_output: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    embedding_cache: Annotated[Path | None, typer.Option(help="Where MiniLM vectors are kept between runs (default: "
                                                              "~/.cache/orforge/embeddings.sqlite).")] = None,
) -> None:
    """Diversity of any prompt file: Self-BLEU, Distinct-1/2, mean MiniLM cosine and clusters, as in a release."""
    from orforge.dedup.embed import Embedder
    from orforge.flows.prompt_files import read_prompt_file
    from orforge.outputs.diversity import Measured, measure, method_note, reference_note, summary_rows

    if sample < 2:
        fail(f"--sample must be at least 2, got {sample}", 2)
    if not 0.0 < threshold <= 1.0:
        fail(f"--threshold must be in (0, 1], got {threshold}", 2)
    try:
        frame = read_prompt_file(file, column)
    except ValueError as e:
        fail(str(e), 2)
    if by is not None and by not in frame.columns:
        fail(f"{file}: no `{by}` column to group by (columns: {', '.join(frame.columns)})", 2)
    started = time.monotonic()
    try:
        with Embedder(embedding_cache or default_embedding_cache()) as embedder:
            diversity = measure([Measured(file.name, frame, column=column, by=by)], embedder, sample=sample,
                                seed=seed, threshold=threshold)
            encoded, reused = embedder.texts_encoded, embedder.cache_hits
    except Exception as e:  # noqa: BLE001 - an unusable cache folder or a broken model install: the run failed
        fail(f"stats failed: {describe(e)}", 1)
    seconds = time.monotonic() - started
    if json_output:
        console.print_json(diversity.model_dump_json())
    else:
        rows = [{k: v for k, v in row.items() if k != "split"} for row in summary_rows(diversity, references=False)]
        table = new_table(f"Diversity of {file.name}", *rows[0])
        for row in rows:
            table.add_row(*(escape(v) for v in row.values()))
        console.print(table)
        console.print(reference_note(diversity), highlight=False)
        console.print(method_note(diversity, references=False), highlight=False)
    err.print(f"{frame.height:,} rows in {seconds:.1f} s; {encoded:,} texts embedded, {reused:,} from the store",
              highlight=False)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
