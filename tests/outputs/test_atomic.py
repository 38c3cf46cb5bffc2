from __future__ import annotations

import contextlib
import json
import resource
import signal
from pathlib import Path

import polars as pl
import pytest

from orforge.outputs.atomic import (
    ReleaseWriteError,
    _umask,
    atomic_folder,
    atomic_write,
    write_bytes,
    write_csv,
    write_json,
    write_parquet,
    write_text,
)


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Make any write past `n_bytes` fail with EFBIG, like a disk that fills up mid-file (works as root too)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def unwritable_frame() -> pl.DataFrame:
    # polars cannot write Python objects to parquet: the writer raises after the temp file exists.
    return pl.DataFrame({"a": [1, 2], "b": pl.Series([object(), object()], dtype=pl.Object)})


def test_writers_round_trip(tmp_path):
    frame = pl.DataFrame({"prompt": ['has, comma and "quotes"\nand a newline', "plain"], "category": ["x", "y"]})
    write_parquet(tmp_path / "f.parquet", frame)
    write_csv(tmp_path / "f.csv", frame)
    write_json(tmp_path / "f.json", {"k": [1, "é"]})
    write_text(tmp_path / "f.txt", "héllo")
    write_bytes(tmp_path / "f.bin", b"\x00\x01")
    assert pl.read_parquet(tmp_path / "f.parquet").equals(frame)
    assert pl.read_csv(tmp_path / "f.csv").equals(frame)
    assert json.loads((tmp_path / "f.json").read_text()) == {"k": [1, "é"]}
    assert (tmp_path / "f.txt").read_text() == "héllo"
    assert (tmp_path / "f.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "f.csv", "f.json", "f.parquet", "f.txt"]
    # Not mkstemp's private 0600: the usual mode a new file gets.
    assert (tmp_path / "f.csv").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_writer_failing_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents")

    def half_then_crash(fh):
        fh.write(b"new contents, first half")
        fh.flush()
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_a_frame_whose_writer_raises_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        write_parquet(tmp_path / "x.parquet", unwritable_frame())
    assert list(tmp_path.iterdir()) == []


def test_disk_full_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    with file_size_limit(4096), pytest.raises(OSError, match="too large"):
        write_bytes(target, b"x" * 100_000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_a_parent_that_is_a_file_fails_cleanly(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError):
        write_text(tmp_path / "afile" / "x.txt", "hi")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_folder_appears_only_when_complete(tmp_path):
    final = tmp_path / "release"
    with atomic_folder(final) as tmp:
        write_text(tmp / "a.txt", "a")
        assert not final.exists()
        assert tmp.parent == tmp_path and tmp.name.startswith(".release.partial-")
    assert (final / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["release"]
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_an_error_inside_the_folder_removes_it(tmp_path):
    final = tmp_path / "release"
    with pytest.raises(ReleaseWriteError, match="release") as err:
        with atomic_folder(final) as tmp:
            write_text(tmp / "a.txt", "a")
            write_parquet(tmp / "b.parquet", unwritable_frame())
    assert err.value.__cause__ is not None
    assert list(tmp_path.iterdir()) == []


def test_disk_full_inside_the_folder_removes_it(tmp_path):
    with pytest.raises(ReleaseWriteError, match="too large"):
        with file_size_limit(4096), atomic_folder(tmp_path / "release") as tmp:
            write_text(tmp / "small.txt", "fits")
            write_bytes(tmp / "big.bin", b"x" * 100_000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under_a_file", "under_proc"])
def test_an_unwritable_target_raises_a_clear_error(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("")
        final = tmp_path / "afile" / "release"
    else:
        final = Path("/proc/orforge-test-release")  # root cannot create entries in /proc either
    with pytest.raises(ReleaseWriteError, match=str(final)):
        with atomic_folder(final) as tmp:
            write_text(tmp / "a.txt", "a")
    assert not final.exists()
    if where == "under_a_file":
        assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_an_existing_folder_needs_overwrite_and_survives_a_failed_rebuild(tmp_path):
    final = tmp_path / "release"
    with atomic_folder(final) as tmp:
        write_text(tmp / "v.txt", "1")

    with pytest.raises(ReleaseWriteError, match="exists"):
        with atomic_folder(final) as tmp:
            write_text(tmp / "v.txt", "2")
    assert (final / "v.txt").read_text() == "1"

    with pytest.raises(ReleaseWriteError):
        with atomic_folder(final, overwrite=True) as tmp:
            write_text(tmp / "v.txt", "2")
            raise RuntimeError("build failed")
    assert (final / "v.txt").read_text() == "1"

    with atomic_folder(final, overwrite=True) as tmp:
        write_text(tmp / "w.txt", "2")
    assert sorted(p.name for p in final.iterdir()) == ["w.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["release"]


def test_an_empty_existing_folder_is_filled_without_overwrite(tmp_path):
    (tmp_path / "release").mkdir()
    with atomic_folder(tmp_path / "release") as tmp:
        write_text(tmp / "a.txt", "a")
    assert (tmp_path / "release" / "a.txt").exists()
