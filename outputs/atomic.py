"""Atomic writes: a file or a release folder appears whole or not at all.

A file is written to a temporary sibling in the same folder, flushed and fsynced, then `os.replace`d over the
target, so a crash leaves either the old file or the new one, never half of one. A release folder is built in a
hidden sibling (`.<name>.partial-XXXX`) and renamed into place at the end; on any error the sibling is removed and
`ReleaseWriteError` names the target and the cause.

A hard kill (SIGKILL, power loss) between creating a temporary and renaming it can leave a hidden
`.<name>.*` sibling behind; the target itself is never partial.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl


class ReleaseWriteError(RuntimeError):
    """A release folder could not be written; nothing partial was left at the target."""


def _umask() -> int:
    # Reading the umask with os.umask() briefly changes it for every thread; Linux exposes it read-only instead.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable. Some filesystems refuse fsync on a directory; the rename itself already happened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, writer: Callable[[BinaryIO], None]) -> Path:
    """Call `writer` with a binary file opened on a temporary sibling of `path`, then move it into place.

    If `writer` raises (or the disk fills up), the temporary is removed, `path` keeps whatever it held before,
    and the exception propagates.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; a release file should get the usual permissions.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    # Encode first: an unencodable string fails before anything touches the disk.
    return write_bytes(path, text.encode(encoding))


def write_json(path: Path | str, obj: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_parquet(path: Path | str, frame: pl.DataFrame) -> Path:
    return atomic_write(path, lambda fh: frame.write_parquet(fh))


def write_csv(path: Path | str, frame: pl.DataFrame) -> Path:
    return atomic_write(path, lambda fh: frame.write_csv(fh))


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def atomic_folder(path: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; rename it to `path` when the block ends without error.

    On any error inside the block (or while creating or renaming the folder) the temporary folder is removed and
    `ReleaseWriteError` is raised, chained to the cause. An existing non-empty `path` is an error unless
    `overwrite`; with `overwrite` the old folder is swapped out only after the new one is complete, and restored if
    the swap fails.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise ReleaseWriteError(f"cannot write release {final}: a file with that name exists")
    if _is_nonempty_dir(final) and not overwrite:
        raise ReleaseWriteError(f"cannot write release {final}: the folder exists and is not empty (overwrite=False)")

    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        _swap_into_place(tmp, final, overwrite)
        tmp = None
        _fsync_dir(final.parent)
    except ReleaseWriteError:
        raise
    except Exception as e:
        raise ReleaseWriteError(f"could not write release {final}: {type(e).__name__}: {e}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    if not _is_nonempty_dir(final):
        # Absent or an empty folder: rename(2) replaces an empty directory in one step.
        os.rename(tmp, final)
        return
    if not overwrite:
        raise FileExistsError(f"{final} appeared while the release was being written")
    old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
