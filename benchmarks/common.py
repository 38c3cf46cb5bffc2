"""Shared helpers for the benchmark scripts: the machine they ran on, the exact command, tables, and the loopback
OpenAI-compatible server (tests/fakeserver.py) run in a child process.

Run on its own it prints the machine description and exits (so `make benchmarks`, which runs every
benchmarks/*.py, passes over it quickly):

    .venv/bin/python benchmarks/common.py
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

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
        message = conn.recv()  # EOFError if the parent died: the process ends (the server thread is a daemon)
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
                if self._conn.poll(15):
                    self._conn.recv()
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


# -- the two clients under comparison ---------------------------------------------------------------------------
#
# Both return (wall seconds for the batch, CPU seconds of this process meanwhile, number of requests answered).
# Client construction is outside the timing on both sides; both use the same httpx pool size (the one llm/
# configures), so the pool is never what differs. CPU seconds are less sensitive than wall time to other work on
# the machine; they include the server's only when the server runs in a thread of this process.

FAKE_MODEL = "fake-model"
MAX_TOKENS = 64
TIMEOUT_S = 30.0
MAX_RETRIES = 2


class Verdict(BaseModel):
    """Moderation-like structured reply (the fake server answers with a minimal valid instance)."""

    verdict: Literal["toxic", "benign"]
    category: Literal["deception", "privacy", "violence", "none"]


def prompts(n: int, tag: str) -> list[str]:
    """Distinct per batch, so no request is a cache hit and no two requests of a batch are merged."""
    return [f"Benchmark batch {tag}, request {i}: is asking how to pick the lock of my own shed harmful?"
            for i in range(n)]


def fake_spec(base_url: str, concurrency: int):
    from orforge.core.config import ModelSpec

    return ModelSpec(backend="openai", base_url=base_url, model=FAKE_MODEL, max_concurrency=concurrency,
                     max_tokens=MAX_TOKENS, timeout_s=TIMEOUT_S, max_retries=MAX_RETRIES)


def run_llm(base_url: str, texts: list[str], concurrency: int, kind: str) -> tuple[float, float, int]:
    """One LLM.generate() over the batch through a fresh LLMHub on a fresh cache (every request a miss)."""
    from orforge.llm.hub import LLMHub
    from orforge.llm.types import LLMRequest

    response_model = Verdict if kind == "json" else None
    requests = [LLMRequest.chat(t, response_model=response_model) for t in texts]
    with tempfile.TemporaryDirectory() as tmp, LLMHub(Path(tmp) / "cache.sqlite") as hub:
        llm = hub.model(fake_spec(base_url, concurrency), role="bench")
        cpu, started = time.process_time(), time.perf_counter()
        results = llm.generate(requests)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, sum(r.ok for r in results)


def pool_limits(concurrency: int):
    import httpx

    size = concurrency * 2 + 16  # what llm/backends/openai_compat.py configures
    return httpx.Limits(max_connections=size, max_keepalive_connections=size)


async def _bare(base_url: str, texts: list[str], concurrency: int, kind: str) -> tuple[float, float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=MAX_RETRIES, timeout=TIMEOUT_S,
                                http_client=openai.DefaultAsyncHttpxClient(limits=pool_limits(concurrency),
                                                                           timeout=TIMEOUT_S))
    semaphore = asyncio.Semaphore(concurrency)
    response_format = ({"type": "json_schema", "json_schema": {"name": "Verdict",
                                                              "schema": Verdict.model_json_schema()}}
                       if kind == "json" else openai.NOT_GIVEN)

    async def one(text: str) -> bool:
        async with semaphore:
            resp = await client.chat.completions.create(
                model=FAKE_MODEL, messages=[{"role": "user", "content": text}], temperature=0.0,
                max_tokens=MAX_TOKENS, seed=0, response_format=response_format)
        content = resp.choices[0].message.content
        if kind == "json":
            Verdict.model_validate_json(content)
        return content is not None

    try:
        cpu, started = time.process_time(), time.perf_counter()
        outcomes = await asyncio.gather(*(one(t) for t in texts), return_exceptions=True)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await client.close()
    return seconds, cpu, sum(o is True for o in outcomes)


def run_bare(base_url: str, texts: list[str], concurrency: int, kind: str) -> tuple[float, float, int]:
    """asyncio + AsyncOpenAI + asyncio.Semaphore(concurrency) + gather: the loop anyone would write by hand."""
    return asyncio.run(_bare(base_url, texts, concurrency, kind))


def footer() -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at end {load} (a load above nproc means other work shared the machine: numbers are lower)")


if __name__ == "__main__":
    header("benchmarks/common.py: shared helpers (no measurement); the machine these benchmarks run on",
           packages=("openai", "httpx", "aiohttp", "llama_cpp_python", "polars", "faiss-cpu", "torch"))
