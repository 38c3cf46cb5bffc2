"""Progress a person can see: one rich bar per LLM stage (done/total, tokens, ETA).

Flows report through `reporter()`; the CLI installs a rich reporter, anything else (tests, `serve`) gets a quiet one
that only logs stage totals.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llm.types import Usage

log = logging.getLogger("orforge")


class Reporter:
    def stage(self, name: str, total: int) -> StageProgress:
        return StageProgress(self, name, total)

    def update(self, name: str, advance: int, tokens: int) -> None:  # pragma: no cover - quiet default
        pass

    def start(self, name: str, total: int) -> None:
        log.info("%s: %d requests", name, total)

    def done(self, name: str) -> None:
        pass


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
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tokens]:>9,} tok"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
        )
        self._tasks: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self, name: str, total: int) -> None:
        with self._lock:
            if name in self._tasks:
                self.progress.update(self._tasks[name], total=self.progress.tasks[self._tasks[name]].total + total)
            else:
                self._tasks[name] = self.progress.add_task(name, total=total, tokens=0)
                self._tokens[name] = 0

    def update(self, name: str, advance: int, tokens: int) -> None:
        with self._lock:
            self._tokens[name] += tokens
            self.progress.update(self._tasks[name], advance=advance, tokens=self._tokens[name])


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
