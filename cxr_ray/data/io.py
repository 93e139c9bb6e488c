"""Filesystem access for local paths and ``s3://`` / ``gs://`` URIs through pyarrow."""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow.fs as pafs

_URI_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "file://")


def is_uri(path: str) -> bool:
    """True for a remote/pyarrow URI such as ``s3://bucket/key``."""
    return path.startswith(_URI_SCHEMES)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for a local path or URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts under a local path or a URI."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def read_bytes(path: str) -> bytes:
    """Read a whole file from a local path or URI."""
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file to a local path or URI, creating parent folders."""
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def exists(path: str) -> bool:
    """True when a file or folder exists at the local path or URI."""
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def full_path(fs: pafs.FileSystem, path: str, like: str) -> str:
    """Turn a path inside ``fs`` back into the form of ``like`` (URI stays URI)."""
    if is_uri(like):
        scheme = like.split("://", 1)[0]
        return f"{scheme}://{path}"
    return path


def printable(path: str) -> tuple[str, str]:
    """(path as valid UTF-8, "" or the error for a name that is not valid UTF-8).

    ``os`` decodes such bytes to lone surrogates, which Parquet cannot store; they are shown
    as ``\\xNN`` escapes and the row is an error (rename the file to score it).
    """
    try:
        path.encode("utf-8")
        return path, ""
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return shown, "file name is not valid UTF-8 (shown with \\x escapes); rename the file to score it"


def iter_local(base: str) -> Iterator[tuple[str, str]]:
    """Every visible non-folder entry below the local folder ``base`` as (path, error), one
    folder at a time (names sorted within it), so memory holds one folder's listing; folder
    symlinks are not followed (an error row), like ``find`` without ``-L``."""
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as e:
            raise OSError(f"cannot list folder {printable(folder)[0]!r}: {e}") from e
        for entry in reversed(entries):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                shown, error = printable(entry.path)
                yield shown, error or (f"symlink to a folder ({os.readlink(entry.path)!r}), "
                                       f"not followed: list that folder itself to score it")
            else:
                yield printable(entry.path)
        stack += [e.path for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def walk_local(base: str) -> list[tuple[str, str]]:
    """:func:`iter_local` as one sorted list (small folders: a dataset's class folder)."""
    return sorted(iter_local(base))
