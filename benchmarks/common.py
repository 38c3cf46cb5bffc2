"""Shared helpers for the benchmark scripts: the machine they ran on, the exact command, tables, and the loopback
OpenAI-compatible server (tests/fakeserver.py) run in a child process.

Run on its own it prints the machine description and exits (so `make benchmarks`, which runs every
benchmarks/*.py, passes over it quickly):

    .venv/bin/python benchmarks/common.py
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Nothing in a benchmark may reach the network for model files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- the machine and the command ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(packages: Iterable[str] = ("openai", "httpx", "aiohttp")) -> str:
    """One line: cores, CPU, RAM, Python and the versions of the packages that matter to the numbers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{p} {package_version(p)}" for p in packages)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"nproc {cores}, CPU '{cpu_model()}', {mem_gb:.0f} GiB RAM, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; {versions}; load average at start {load}")


def command() -> str:
    """The command that produced this output, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    python = Path(sys.executable)
    try:
        python_text = str(python.relative_to(REPO))
    except ValueError:
        python_text = str(python)
    return " ".join([python_text, script_text, *map(shlex.quote, sys.argv[1:])])


def header(title: str, packages: Iterable[str] = ("openai", "httpx", "aiohttp")) -> None:
    print(f"# {title}")
    print(f"machine: {machine(packages)}")
    print(f"command: {command()}")
    print(flush=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -- the loopback server in its own process ----------------------------------------------------------------------


def _serve(conn, latency_s: float) -> None:
    """Child process: a FakeServer until the parent says stop; then report what it saw."""
    from tests.fakeserver import FakeServer

    server = FakeServer(latency_s=latency_s).start()
    conn.send(server.port)
    while True:
        message = conn.recv()
        if message == "stats":
            chats = server.chat_requests
            conn.send({"chat_requests": len(chats), "max_in_flight": server.max_in_flight,
                       "faults": sum(1 for r in chats if r.fault), "cpu_s": time.process_time()})
        elif message == "reset":
            latency = server.latency_s
            server.reset()
            server.latency_s = latency
            conn.send("ok")
        else:
            break
    server.stop()
    conn.send("stopped")


class ServerProcess:
    """tests.fakeserver.FakeServer in a child process on 127.0.0.1, so the server's CPU is not the client's.

    In a thread of the measuring process the server's aiohttp loop competes with the client for the GIL, and the
    benchmark would then measure the server as much as the client.
    """

    def __init__(self, latency_s: float = 0.0):
        ctx = multiprocessing.get_context("spawn")  # no forked copy of the parent's threads or event loops
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child_conn, latency_s), daemon=True, name="fake-openai")
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the loopback server process did not start within 60 s")
        self.port: int = self._conn.recv()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        """Chat requests received, most in flight at once, faults served, and the server process's CPU seconds."""
        self._conn.send("stats")
        return self._conn.recv()

    def reset(self) -> None:
        """Forget recorded requests (the server keeps every request it received; long runs would grow)."""
        self._conn.send("reset")
        self._conn.recv()

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send("stop")
                self._conn.poll(15) and self._conn.recv()
            except (BrokenPipeError, EOFError):
                pass
            self._proc.join(15)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerThread:
    """The same server in a thread of this process (the test-suite arrangement), for comparison."""

    def __init__(self, latency_s: float = 0.0):
        from tests.fakeserver import FakeServer

        self.server = FakeServer(latency_s=latency_s).start()
        self.port = self.server.port
        self.base_url = self.server.url + "/v1"

    def stats(self) -> dict:
        chats = self.server.chat_requests
        return {"chat_requests": len(chats), "max_in_flight": self.server.max_in_flight,
                "faults": sum(1 for r in chats if r.fault), "cpu_s": None}  # shared with the client: not separable

    def reset(self) -> None:
        latency = self.server.latency_s
        self.server.reset()
        self.server.latency_s = latency

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(where: str, latency_s: float = 0.0) -> ServerProcess | ServerThread:
    if where == "process":
        return ServerProcess(latency_s)
    if where == "thread":
        return ServerThread(latency_s)
    raise ValueError(f"server must be 'process' or 'thread', got {where!r}")


if __name__ == "__main__":
    header("benchmarks/common.py: shared helpers (no measurement); the machine these benchmarks run on",
           packages=("openai", "httpx", "aiohttp", "llama_cpp_python", "polars", "faiss-cpu", "torch"))
