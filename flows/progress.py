"""Progress a person can see: one rich bar per LLM stage (done/total, tokens, cost so far when priced, ETA).

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
    cost: float | None = None  # None until a priced model reports; in the config's one currency
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

    def __reduce__(self):
        # A task sent to a worker process (Dask, Ray) takes a recorder instead of this reporter: a worker has no bars
        # to draw, and the flow process replays what it recorded when the task ends (flows/runner.py).
        return ProgressRecorder, ()

    def start(self, name: str, total: int) -> None:
        """`total` more requests are expected for the stage (an estimate)."""
        with self._lock:
            state = self.stages.setdefault(name, StageState())
            if not state.running:
                state.running, state.run_estimate, state.run_start = True, 0, state.completed
            state.total += total
            state.run_estimate += total
            self._shown_start(name, state, total)

    def update(self, name: str, advance: int, tokens: int, cost: float | None = None) -> None:
        with self._lock:
            state = self.stages.setdefault(name, StageState())
            state.completed += advance
            state.tokens += tokens
            if cost is not None:
                state.cost = (state.cost or 0.0) + cost
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
        log.info("%s: %d requests done (estimated %d), %d tokens%s", name, state.completed - state.run_start,
                 state.run_estimate, state.tokens, cost_text(state.cost))


class StageProgress:
    """Callback for `LLM.generate(on_progress=...)`; thread-safe, summed across the stage's shards."""

    def __init__(self, reporter: Reporter, name: str, total: int):
        self.reporter, self.name, self._lock = reporter, name, threading.Lock()
        self._seen: dict[int, tuple[Usage, int, float | None]] = {}
        reporter.start(name, total)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __call__(self, advance: int, usage: Usage) -> None:
        # `usage` is the running total of one generate() call; pass on only what is new since its last report.
        # The usage object is kept with its totals: a freed object's id may be reused by the next call's, which
        # would then be taken for the old call and lose the tokens it had reported.
        with self._lock:
            total = usage.prompt_tokens + usage.completion_tokens
            kept, seen_tokens, seen_cost = self._seen.get(id(usage), (None, 0, None))
            if kept is not usage:
                seen_tokens, seen_cost = 0, None
            self._seen[id(usage)] = (usage, total, usage.cost)
            cost = None if usage.cost is None else usage.cost - (seen_cost or 0.0)
            self.reporter.update(self.name, advance, total - seen_tokens, cost)


class ProgressRecorder(Reporter):
    """What a reporter becomes in a worker process: it sums each stage's updates (requests, tokens, cost) for the
    flow process to replay on its own reporter, so the bars move as each shard's task ends."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: dict[str, list] = {}

    def update(self, name: str, *counts) -> None:
        with self._lock:
            seen = self.recorded.get(name)
            self.recorded[name] = list(counts) if seen is None else [
                b if a is None else a if b is None else a + b for a, b in zip(seen, counts)]

    def drain(self) -> dict[str, list]:
        with self._lock:
            recorded, self.recorded = self.recorded, {}
            return recorded

    def _shown_start(self, name: str, state: StageState, added: int) -> None:
        pass

    def _shown_done(self, name: str, state: StageState) -> None:
        pass


def cost_text(cost: float | None) -> str:
    """`, cost 0.0123` for a priced stage (in the config's currency), nothing for an unpriced one."""
    return "" if cost is None else f", cost {cost:.4f}"


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        super().__init__()
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]:>9,} tok{task.fields[cost]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
        )
        self._tasks: dict[str, int] = {}

    def _shown_start(self, name: str, state: StageState, added: int) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], total=state.total)
        else:
            self._tasks[name] = self.progress.add_task(name, total=state.total, completed=state.completed,
                                                       tokens=state.tokens, cost=cost_text(state.cost))

    def _shown_update(self, name: str, state: StageState) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], completed=state.completed, tokens=state.tokens,
                                 cost=cost_text(state.cost))

    def _shown_done(self, name: str, state: StageState) -> None:
        if name in self._tasks:
            self.progress.update(self._tasks[name], total=state.total, completed=state.completed, tokens=state.tokens,
                                 cost=cost_text(state.cost))


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
