"""Find the files a scoring job reads: folder trees, globs and manifests, local or URIs.

Reads listings only, never pixels. :func:`check_inputs` runs before Ray starts, so a wrong
input fails fast with its name; :func:`iter_inputs` then streams the rows in chunks, so an
archive of millions of files never sits in the driver's memory whole (it keeps an 8-byte
hash per path to drop duplicates). One row per distinct file::

    path   str   absolute local path or URI
    label  int8  0 NORMAL / 1 PNEUMONIA from the nearest NORMAL/PNEUMONIA folder or a
                 manifest's ``label`` column; -1 when unknown
    error  str   "" for a file to read; else why it cannot be (it still gets its output row)

Folder inputs list *every* entry below them that is not a folder, except hidden ones (names
starting with ``.``), whatever the extension: a stray non-image gets an error row in the
output instead of silently vanishing, and extensionless DICOM exports from a PACS are read
too. Local folders are walked like ``find`` (without ``-L``): a symlink to a file is read
through, a symlink to a folder is not followed (so a link cycle cannot repeat files) and gets
an error row saying so; FIFOs, sockets, devices and broken symlinks get error rows when read.
A file name that is not valid UTF-8 is listed with ``\\xNN`` escapes and an error row.
So the rows match ``find INPUT -not -type d -not -path '*/.*'``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from cxr_ray.data.catalog import CLASSES, label_from_name
from cxr_ray.errors import DataError
from cxr_ray.storage import uri as store

MANIFEST_EXTENSIONS = (".csv", ".parquet")
CHUNK_ROWS = 65_536  # rows per listing chunk: the driver holds about one chunk of paths
UNKNOWN_LABEL = -1
_WILDCARDS = ("*", "?", "[")


def label_from_path(path: str) -> int:
    """Label of the nearest enclosing ``NORMAL``/``PNEUMONIA`` folder (any case), else -1."""
    parts = path.replace("\\", "/").split("/")[:-1]
    for part in reversed(parts):
        if part.upper() in CLASSES:
            return CLASSES.index(part.upper())
    return UNKNOWN_LABEL


def _visible(rel: str) -> bool:
    return not any(p.startswith(".") for p in rel.replace("\\", "/").split("/") if p)


def _iter_folder(fs: pafs.FileSystem, base: str, like: str) -> Iterator[tuple[str, str]]:
    """(path, error) of every visible file below a folder (local: :func:`store.iter_local`).
    Object stores are listed by pyarrow in one call (their listing is flat, not a walk)."""
    if not store.is_uri(like):
        yield from store.iter_local(base)
        return
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    yield from sorted((store.full_path(i.path, like), "") for i in infos
                      if i.type == pafs.FileType.File and _visible(i.path[len(base):]))


def _glob_regex(pattern: str) -> re.Pattern:
    """A local glob as a regex: ``**/`` any folders (or none), ``*``/``?`` within one name,
    ``[...]`` a class; a leading ``.`` is never matched by a wildcard (hidden stays hidden)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append(r"(?:[^/.][^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r"(?:[^/.][^/]*/)*[^/.][^/]*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"(?![.])[^/]*" if i == 0 or pattern[i - 1] == "/" else r"[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            out.append(fnmatch.translate(pattern[i:end + 1])[4:-3])  # the class alone
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _iter_glob(pattern: str) -> Iterator[tuple[str, str]]:
    """Files matching a glob. Locally ``**`` spans folders; in URIs ``*`` also spans folders."""
    if not store.is_uri(pattern):
        pattern = os.path.abspath(os.path.expanduser(pattern))
    cut = min(pattern.find(w) for w in _WILDCARDS if w in pattern)
    if not store.is_uri(pattern):
        base = pattern[:cut].rsplit("/", 1)[0] or "/"
        if not os.path.isdir(base):
            return
        skip = len(base.rstrip("/")) + 1  # match the part below the fixed base folder
        regex = _glob_regex(pattern[skip:])
        yield from ((p, e) for p, e in store.iter_local(base) if regex.match(p[skip:]))
        return
    base_uri = pattern[:cut].rsplit("/", 1)[0]
    fs, base = store.resolve(base_uri)
    yield from ((p, e) for p, e in _iter_folder(fs, base, base_uri) if fnmatch.fnmatchcase(p, pattern))


def _manifest_batches(path: str) -> Iterator[pd.DataFrame]:
    """A CSV/Parquet manifest in record batches (``path`` and, when present, ``label``)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, p = store.resolve(path)
    try:
        if path.lower().endswith(".parquet"):
            reader = pq.ParquetFile(fs.open_input_file(p))
            names = reader.schema_arrow.names
            batches = reader.iter_batches(batch_size=CHUNK_ROWS, columns=[c for c in ("path", "label") if c in names])
        else:
            reader = pacsv.open_csv(  # batches of ~1 MB of CSV (some 10,000 rows)
                fs.open_input_stream(p), read_options=pacsv.ReadOptions(block_size=1 << 20),
                convert_options=pacsv.ConvertOptions(column_types={"path": "string", "label": "string"},
                                                     strings_can_be_null=True))
            names, batches = reader.schema.names, reader
        if "path" not in names:
            raise DataError(f"manifest {path!r} lacks a 'path' column; found columns {names}")
        for batch in batches:
            yield batch.to_pandas()
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"manifest {path!r} cannot be read: {e}") from e


def _iter_manifest(path: str) -> Iterator[pd.DataFrame]:
    """Rows of a manifest, relative paths taken relative to the manifest's folder."""
    base = path.rsplit("/", 1)[0] if store.is_uri(path) else os.path.dirname(os.path.abspath(path))
    row = 0
    for df in _manifest_batches(path):
        paths = [q if store.is_uri(q) or os.path.isabs(q) else store.join(base, q) for q in df["path"].astype(str)]
        if "label" in df.columns:
            labels = [UNKNOWN_LABEL if pd.isna(v) else label_from_name(v, f"manifest {path!r} row {row + i}")
                      for i, v in enumerate(df["label"])]
        else:
            labels = [label_from_path(q) for q in paths]
        row += len(df)
        yield pd.DataFrame({"path": paths, "label": labels, "error": ""})


def _chunks(rows: Iterator[tuple[str, str]]) -> Iterator[pd.DataFrame]:
    """(path, error) rows -> frames of up to CHUNK_ROWS rows, labels from the folders."""
    buf: list[tuple[str, str]] = []
    for row in rows:
        buf.append(row)
        if len(buf) == CHUNK_ROWS:
            yield _frame(buf)
            buf = []
    if buf:
        yield _frame(buf)


def _frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"path": [p for p, _ in rows], "label": [label_from_path(p) for p, _ in rows],
                         "error": [e for _, e in rows]})


def _iter_item(item: str) -> Iterator[pd.DataFrame]:
    """One ``--input`` value -> frames of its files."""
    if any(w in item for w in _WILDCARDS):
        yield from _chunks(_iter_glob(item))
        return
    fs, p = store.resolve(item)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        yield from _chunks(_iter_folder(fs, p, item))
    elif item.lower().endswith(MANIFEST_EXTENSIONS):
        yield from _iter_manifest(item)
    else:  # one file (or a broken symlink: its row says so)
        yield _frame([(store.full_path(p, item), "")])


def _check_item(item: str) -> None:
    """:class:`DataError` naming ``item`` when it is wrong; reads one entry or a header only."""
    if any(w in item for w in _WILDCARDS):
        if next(_iter_glob(item), None) is None:
            raise DataError(f"input {item!r}: the pattern matches no files")
        return
    fs, p = store.resolve(item)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound and not os.path.islink(item):
        raise DataError(f"input {item!r} does not exist")
    if info.type == pafs.FileType.Directory:
        if next(_iter_folder(fs, p, item), None) is None:
            raise DataError(f"input folder {item!r} holds no files")
    elif item.lower().endswith(MANIFEST_EXTENSIONS):
        next(_manifest_batches(item), None)  # readable, with a 'path' column


def _named(item: str, fn):
    """Run ``fn()``; a folder that cannot be listed (permissions ...) is named as the input's."""
    try:
        return fn()
    except OSError as e:
        raise DataError(f"input {item!r}: {e}") from e


def check_inputs(inputs: list[str]) -> None:
    """Fail fast, before Ray starts, on a missing input, an empty folder, a pattern matching
    nothing or an unreadable manifest (:class:`DataError` naming it). Cheap: no full listing."""
    if not inputs:
        raise DataError("no input given: pass --input FOLDER, GLOB or MANIFEST (repeatable)")
    for item in inputs:
        _named(item, lambda: _check_item(item))


class PathSet:
    """A set of paths kept as sorted 64-bit hashes (8 bytes a path, no strings)."""

    def __init__(self) -> None:
        self._hashes = np.empty(0, np.uint64)

    @staticmethod
    def hashes(paths: pd.Series) -> np.ndarray:
        return pd.util.hash_array(paths.to_numpy(dtype=object))

    def contains(self, paths: pd.Series) -> np.ndarray:
        """Boolean mask: which of ``paths`` are in the set."""
        return np.isin(self.hashes(paths), self._hashes, assume_unique=False)

    def add(self, paths: pd.Series) -> None:
        self._hashes = np.union1d(self._hashes, self.hashes(paths))

    def __len__(self) -> int:
        return len(self._hashes)


def iter_inputs(inputs: list[str]) -> Iterator[pd.DataFrame]:
    """Frames (``path``, ``label`` int8, ``error``) of up to :data:`CHUNK_ROWS` rows: every file
    of every input once (first occurrence kept). Call :func:`check_inputs` first."""
    seen = PathSet()
    for item in inputs:
        frames = _iter_item(item)
        while (df := _named(item, lambda: next(frames, None))) is not None:
            df = df[~df["path"].duplicated()]
            fresh = df[~seen.contains(df["path"])]
            seen.add(fresh["path"])
            if len(fresh):
                yield fresh.reset_index(drop=True).astype({"label": "int8"})


def list_inputs(inputs: list[str]) -> pd.DataFrame:
    """All files of all inputs as one frame (see :func:`iter_inputs`); for small inputs."""
    check_inputs(inputs)
    frames = list(iter_inputs(inputs))
    if not frames:
        return pd.DataFrame({"path": pd.Series([], dtype=object), "label": pd.Series([], dtype="int8"),
                             "error": pd.Series([], dtype=object)})
    return pd.concat(frames, ignore_index=True)
