"""Prompt templates: Markdown files beside the stage that uses them, loaded once, identified by their sha256.

A template file has a `## system` section and a `## user` section; `$name` placeholders are filled with
`string.Template` (so JSON braces in examples need no escaping).
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_SECTION = re.compile(r"^## (system|user)\s*$", re.M)


@dataclass(frozen=True)
class PromptTemplate:
    path: Path
    system: str
    user: str
    sha256: str

    def render(self, **values: object) -> tuple[str, str]:
        """(system, user) with placeholders filled; a missing value is an error, not a silent blank."""
        vals = {k: str(v) for k, v in values.items()}
        return string.Template(self.system).substitute(vals), string.Template(self.user).substitute(vals)


@cache
def load_template(path: Path) -> PromptTemplate:
    text = Path(path).read_text()
    parts = _SECTION.split(text)
    sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    if set(sections) != {"system", "user"}:
        raise ValueError(f"{path}: a template needs a '## system' and a '## user' section")
    return PromptTemplate(Path(path), sections["system"], sections["user"], hashlib.sha256(text.encode()).hexdigest())


def normalize(text: str) -> str:
    """Key for exact dedup: case-folded, whitespace collapsed, surrounding quotes and punctuation stripped."""
    return " ".join(text.casefold().split()).strip(" \"'`.!?;:,-")
