"""Turn a release written now into one as an orforge of manifest schema 1 wrote it (see core/manifest.py).

Schema 2 added only optional fields: the quality gate's counts, `cost` per role and model with `currency`, and
`diversity`; with them came the files `quality_rejections.parquet` and `contrast_pairs.*`, which an older orforge
did not write either. Both the fields and those files are taken out, and the file hashes kept consistent, so
`verify_release` still passes on the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_2_FILES = ("quality_rejections.parquet", "contrast_pairs.csv", "contrast_pairs.parquet")


def as_schema_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A manifest dict (as written now) without what schema 2 added, claiming `schema_version: 1`."""
    old = {k: v for k, v in raw.items() if k not in ("currency", "diversity")}
    old["schema_version"] = 1
    old["counts"] = {k: v for k, v in raw["counts"].items() if k not in ("quality_rejections", "quality_repairs")}
    old["tokens"] = {role: {k: v for k, v in usage.items() if k != "cost"} for role, usage in raw["tokens"].items()}
    old["usage"] = [{k: v for k, v in row.items() if k != "cost"} for row in raw["usage"]]
    old["files"] = {name: h for name, h in raw["files"].items() if name not in SCHEMA_2_FILES}
    return old


def rewrite_as_schema_1(folder: Path) -> dict[str, Any]:
    """Rewrite `folder`'s manifest.json in schema 1 and delete the files schema 2 brought; returns the new dict."""
    path = folder / "manifest.json"
    old = as_schema_1(json.loads(path.read_text()))
    for name in SCHEMA_2_FILES:
        (folder / name).unlink(missing_ok=True)
    path.write_text(json.dumps(old, indent=2))
    return old
