"""Progress a person can see: one rich bar per LLM stage (done/total, tokens, ETA).

Flows report through `reporter()`; the CLI installs a rich reporter, anything else (tests, `serve`) gets a quiet one
that only logs stage totals.

A stage's total is an estimate made before it runs: the seed stage's is its call budget (calls go on only until
enough distinct seeds exist), and a reused shard counts the requests it would have made. So `done(name)` sets the
total to what was actually done, and a finished stage always reads N/N.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orforge.llm.types import Usage

log = logging.getLogger("orforge")


@dataclass
class StageState:
    """One stage's counts. A stage started again after it finished (a second `answer_all` for the same role)
    continues the same counts; `run_*` hold the current run's share, for the log line."""

    total: int = 0
    completed: int = 0
    tokens: int = 0
    running: bool = False
    run_estimate: int = 0
    run_start: int = 0


class Reporter:
    """Keeps every stage's counts; subclasses show them by overriding the `_shown_*` hooks (called under the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stages: dict[str, StageState] = {}

    def stage(self, name: str, total: int) -> StageProgress:
        return StageProgress(self, name, total)

    def start(self, name: str, total: int) -> None:
        """`total` more requests are expected for the stage (an estimate)."""
        with self._lock:
            state = self.stages.setdefault(name, StageState())
            if not state.running:
                state.running, state.run_estimate, state.run_start = True, 0, state.completed
            state.total += total
            state.run_estimate += total
            self._shown_start(name, state, total)

    def update(self, name: str, advance: int, tokens: int) -> None:
        with self._lock:
            state = self.stages.setdefault(name, StageState())
            state.completed += advance
            state.tokens += tokens
            self._shown_update(name, state)

    def done(self, name: str) -> None:
        """The stage ended: its total becomes what was done, whatever the estimate was."""
        with self._lock:
            state = self.stages.setdefault(name, StageState())
            state.total = state.completed
            state.running = False
            self._shown_done(name, state)

    # -- display hooks: the quiet default logs a line at the start and the end of each stage -----------------------
    def _shown_start(self, name: str, state: StageState, added: int) -> None:
        log.info("%s: up to %d requests", name, added)

    def _shown_update(self, name: str, state: StageState) -> None:
        pass

    def _shown_done(self, name: str, state: StageState) -> None:
        log.info("%s: %d requests done (estimated %d), %d tokens", name, state.completed - state.run_start,
                 state.run_estimate, state.tokens)


class StageProgress:
    """Callback for `LLM.generate(on_progress=...)`; thread-safe, summed across the stage's shards."""

    def __init__(self, reporter: Reporter, name: str, total: int):
        self.reporter, self.name, self._lock = reporter, name, threading.Lock()
        self._seen: dict[int, int] = {}
        reporter.start(name, total)

    def __call__(self, advance: int, usage: Usage) -> None:
        # `usage` is the running total of one generate() call; pass on only what is new since its last report.
        with self._lock:
            total = usage.prompt_tokens + usage.completion_tokens
            delta = total - self._seen.get(id(usage), 0)
            self._seen[id(usage)] = total
            self.reporter.update(self.name, advance, delta)


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        super().__init__()
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]:>9,} tok"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
        )
        self._tasks: dict[str, int] = {}

    def _shown_start(self, name: str, state: StageState, added: int) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], total=state.total)
        else:
            self._tasks[name] = self.progress.add_task(name, total=state.total, completed=state.completed,
                                                       tokens=state.tokens)

    def _shown_update(self, name: str, state: StageState) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], completed=state.completed, tokens=state.tokens)

    def _shown_done(self, name: str, state: StageState) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], total=state.total, completed=state.completed, tokens=state.tokens)


_current: Reporter = Reporter()


def reporter() -> Reporter:
    return _current


@contextmanager
def use_reporter(rep: Reporter):
    global _current
    previous, _current = _current, rep
    try:
        if isinstance(rep, RichReporter):
            with rep.progress:
                yield rep
        else:
            yield rep
    finally:
        _current = previous
