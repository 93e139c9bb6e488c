"""Find the files a scoring job reads: folder trees, globs and manifests, local or URIs.

Runs on the driver before Ray starts and reads listings only, never pixels, so a wrong
input fails fast with its name. The result is one row per distinct file::

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

import pandas as pd
import pyarrow.fs as pafs

from cxr_ray.data import io
from cxr_ray.data.catalog import CLASSES, DataError, label_from_name, manifest_paths, read_table

MANIFEST_EXTENSIONS = (".csv", ".parquet")
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


def _list_folder(fs: pafs.FileSystem, base: str, like: str) -> list[tuple[str, str]]:
    """(path, error) of every visible file below a folder (local: :func:`cxr_ray.data.io.walk_local`)."""
    if not io.is_uri(like):
        return io.walk_local(base)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted((io.full_path(fs, i.path, like), "") for i in infos
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


def _expand_glob(pattern: str) -> list[tuple[str, str]]:
    """Files matching a glob. Locally ``**`` spans folders; in URIs ``*`` also spans folders."""
    if not io.is_uri(pattern):
        pattern = os.path.abspath(os.path.expanduser(pattern))
    cut = min(pattern.find(w) for w in _WILDCARDS if w in pattern)
    if not io.is_uri(pattern):
        base = pattern[:cut].rsplit("/", 1)[0] or "/"
        if not os.path.isdir(base):
            return []
        skip = len(base.rstrip("/")) + 1  # match the part below the fixed base folder
        regex = _glob_regex(pattern[skip:])
        return [(p, e) for p, e in io.walk_local(base) if regex.match(p[skip:])]
    base_uri = pattern[:cut].rsplit("/", 1)[0]
    fs, base = io.resolve(base_uri)
    return [(p, e) for p, e in _list_folder(fs, base, base_uri) if fnmatch.fnmatchcase(p, pattern)]


def _read_manifest(path: str) -> pd.DataFrame:
    df = read_table(path)
    if "path" not in df.columns:
        raise DataError(f"manifest {path!r} lacks a 'path' column; found columns {list(df.columns)}")
    paths = manifest_paths(df, path)
    if "label" in df.columns:
        labels = [UNKNOWN_LABEL if pd.isna(v) else label_from_name(v, f"manifest {path!r} row {i}")
                  for i, v in enumerate(df["label"])]
    else:
        labels = [label_from_path(q) for q in paths]
    return pd.DataFrame({"path": paths, "label": labels, "error": ""})


def _frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"path": [p for p, _ in rows], "label": [label_from_path(p) for p, _ in rows],
                         "error": [e for _, e in rows]})


def _expand(item: str) -> pd.DataFrame:
    """One ``--input`` value -> its files (raises :class:`DataError` naming it when it is wrong)."""
    if any(w in item for w in _WILDCARDS):
        rows = _expand_glob(item)
        if not rows:
            raise DataError(f"input {item!r}: the pattern matches no files")
        return _frame(rows)
    fs, p = io.resolve(item)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound and not os.path.islink(item):
        raise DataError(f"input {item!r} does not exist")
    if info.type == pafs.FileType.Directory:
        rows = _list_folder(fs, p, item)
        if not rows:
            raise DataError(f"input folder {item!r} holds no files")
        return _frame(rows)
    if item.lower().endswith(MANIFEST_EXTENSIONS):
        return _read_manifest(item)
    return _frame([(io.full_path(fs, p, item), "")])


def _expand_named(item: str) -> pd.DataFrame:
    """:func:`_expand`, a folder that cannot be listed (permissions ...) named as the input's."""
    try:
        return _expand(item)
    except OSError as e:
        raise DataError(f"input {item!r}: {e}") from e


def list_inputs(inputs: list[str]) -> pd.DataFrame:
    """All files of all inputs, each once (first occurrence kept), with labels where known
    and the listing's ``error`` ("" for files to read)."""
    if not inputs:
        raise DataError("no input given: pass --input FOLDER, GLOB or MANIFEST (repeatable)")
    frames = [_expand_named(item) for item in inputs]
    df = pd.concat(frames, ignore_index=True).drop_duplicates("path", ignore_index=True)
    df["label"] = df["label"].astype("int8")
    return df
