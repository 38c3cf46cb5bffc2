"""orforge: benchmark datasets about how language models refuse, built as resumable Prefect flows.

`orforge` is the one import root. Its subpackages live in the repository's top-level folders (core/, llm/,
generators/, moderators/, dedup/, outputs/, flows/) and are mapped under this name by `package-dir` in
pyproject.toml, so `from orforge.llm.hub import LLMHub` works in an editable and a normal install alike, and no bare
`llm` or `core` package ever reaches site-packages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("orforge")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
