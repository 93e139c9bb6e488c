"""Find the files a scoring job reads: folder trees, globs and manifests, local or URIs.

Runs on the driver before Ray starts and reads listings only, never pixels, so a wrong
input fails fast with its name. The result is one row per distinct file::

    path   str   absolute local path or URI
    label  int8  0 NORMAL / 1 PNEUMONIA from the nearest NORMAL/PNEUMONIA folder or a
                 manifest's ``label`` column; -1 when unknown

Folder inputs list *every* file below them except hidden ones (names starting with ``.``),
whatever the extension: a stray non-image gets an error row in the output instead of
silently vanishing, and extensionless DICOM exports from a PACS are read too.
"""

from __future__ import annotations

import fnmatch
import glob
import os

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


def _list_folder(fs: pafs.FileSystem, base: str, like: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(io.full_path(fs, i.path, like) for i in infos
                  if i.type == pafs.FileType.File and _visible(i.path[len(base):]))


def _expand_glob(pattern: str) -> list[str]:
    """Files matching a glob. Locally ``**`` spans folders; in URIs ``*`` also spans folders."""
    if not io.is_uri(pattern):
        return sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                      if os.path.isfile(p) and _visible(os.path.basename(p)))
    cut = min(pattern.find(w) for w in _WILDCARDS if w in pattern)
    base_uri = pattern[:cut].rsplit("/", 1)[0]
    fs, base = io.resolve(base_uri)
    return [p for p in _list_folder(fs, base, base_uri) if fnmatch.fnmatchcase(p, pattern)]


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
    return pd.DataFrame({"path": paths, "label": labels})


def _expand(item: str) -> pd.DataFrame:
    """One ``--input`` value -> its files (raises :class:`DataError` naming it when it is wrong)."""
    if any(w in item for w in _WILDCARDS):
        paths = _expand_glob(item)
        if not paths:
            raise DataError(f"input {item!r}: the pattern matches no files")
        return pd.DataFrame({"path": paths, "label": [label_from_path(p) for p in paths]})
    fs, p = io.resolve(item)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input {item!r} does not exist")
    if info.type == pafs.FileType.Directory:
        paths = _list_folder(fs, p, item)
        if not paths:
            raise DataError(f"input folder {item!r} holds no files")
    elif item.lower().endswith(MANIFEST_EXTENSIONS):
        return _read_manifest(item)
    else:
        paths = [io.full_path(fs, p, item)]
    return pd.DataFrame({"path": paths, "label": [label_from_path(q) for q in paths]})


def list_inputs(inputs: list[str]) -> pd.DataFrame:
    """All files of all inputs, each once (first occurrence kept), with labels where known."""
    if not inputs:
        raise DataError("no input given: pass --input FOLDER, GLOB or MANIFEST (repeatable)")
    frames = [_expand(item) for item in inputs]
    df = pd.concat(frames, ignore_index=True).drop_duplicates("path", ignore_index=True)
    df["label"] = df["label"].astype("int8")
    return df
