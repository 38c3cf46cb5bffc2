"""Structured-output dialects: how a response schema is put into a chat request.

- `json_schema`: OpenAI's and vLLM's server form, `{"type": "json_schema", "json_schema": {"name", "schema"}}`.
- `json_object`: llama.cpp server's form, `{"type": "json_object", "schema": ...}` (it rejects `json_schema`).
- `none`: no request field; the schema goes into the prompt and the reply is parsed leniently.
"""

from __future__ import annotations

import json
import re

from orforge.core.config import Dialect


def response_format(dialect: Dialect, schema: dict, name: str) -> dict | None:
    if dialect == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if dialect == "json_object":
        return {"type": "json_object", "schema": schema}
    return None


def schema_instruction(schema: dict) -> str:
    """Appended to the last user message when the dialect is `none`: the model sees the schema as text."""
    return "\n\nAnswer with one JSON object only, no prose, matching this JSON schema:\n" + json.dumps(schema)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def extract_json(text: str, lenient: bool) -> str:
    """The JSON part of a reply: strips a Markdown fence; when lenient, takes the outermost {...} span."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    if lenient and not stripped.startswith("{"):
        start, end = stripped.find("{"), stripped.rfind("}")
        if 0 <= start < end:
            return stripped[start : end + 1]
    return stripped
