"""Find images, labels, patient ids and splits; carve a patient-grouped validation split.

The catalog is a pandas DataFrame, one row per image, with columns:

- ``path`` (str): absolute local path or URI of the image file
- ``label`` (int): 0 = NORMAL, 1 = PNEUMONIA
- ``patient`` (str): the manifest's ``patient`` column, a DICOM file's PatientID, else the id
  parsed from a Kermany file name (the file stem when the name has no known form)
- ``source_split`` (str): the folder/manifest split it came from (train, val, test)
- ``split`` (str): the split cxr_ray uses (after :func:`assign_splits`)
- ``size_bytes`` (int), ``mtime_ns`` (int): for the cache fingerprint (-1 when the file is missing)
- ``error`` (str): "" for a file to decode, else why the listing already knows it cannot be
  (a name that is not valid UTF-8); such files become bad-file rows of the cache

Everything here reads file names and listings only, never pixels, so it runs on the
driver before Ray starts and fails fast on a malformed dataset.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from cxr_ray.config import DataConfig
from cxr_ray.data.decode import DICOM_EXTENSIONS, dicom_patient_id
from cxr_ray.errors import DataError
from cxr_ray.storage import uri as store

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")  # index = label
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".dcm")
CATALOG_COLUMNS = ["path", "label", "patient", "source_split", "size_bytes", "mtime_ns", "error"]

# Kermany names: personN_bacteria_M / personN_virus_M (pneumonia); IM-XXXX-YYYY, IM-XXXX-YYYY-ZZZZ
# and NORMAL2-IM-XXXX-YYYY[-ZZZZ] (normal). The patient is personN / [NORMAL2-]IM-XXXX.
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)*$", re.IGNORECASE)
# Bump when patient parsing or the validation carve changes: it is part of the cache
# fingerprint, so caches split by an older rule are rebuilt instead of reused.
SPLIT_ALGORITHM = 2


def patient_id(path: str) -> str:
    """Patient id from a Kermany file name.

    ``person12_bacteria_45.jpeg`` -> ``person12``; ``IM-0115-0001.jpeg`` and
    ``IM-0115-0001-0002.jpeg`` -> ``IM-0115``; ``NORMAL2-IM-0381-0001.jpeg`` ->
    ``NORMAL2-IM-0381``; any case, any extension; anything else -> the file stem.
    """
    stem = PurePosixPath(path.replace("\\", "/")).stem
    m = _PERSON.match(stem)
    if m:
        return m.group(1).lower()
    m = _NORMAL.match(stem)
    if m:
        return m.group(1).upper()
    return stem


def label_from_name(name: object, where: str) -> int:
    """Map ``NORMAL``/``PNEUMONIA`` (any case) or 0/1 to a label index."""
    if isinstance(name, (int, np.integer)) and int(name) in (0, 1):
        return int(name)
    text = str(name).strip().upper()
    if text in CLASSES:
        return CLASSES.index(text)
    if text in ("0", "1"):
        return int(text)
    raise DataError(f"{where}: unknown label {name!r}; expected one of {list(CLASSES)} or 0/1")


def _list_dir(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(path)) if not i.base_name.startswith((".", "__"))]


def _scan_class_folder(fs: pafs.FileSystem, folder: pafs.FileInfo, like: str) -> list[tuple]:
    """(path, size, mtime_ns, error) of the images below a class folder. Local folders are
    walked without following folder symlinks (:func:`store.walk_local`), URIs through pyarrow."""
    if store.is_uri(like):
        infos = fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
        return [(store.full_path(i.path, like), i.size or 0, i.mtime_ns or 0, "") for i in infos
                if i.type == pafs.FileType.File and not i.base_name.startswith(".")
                and i.base_name.lower().endswith(IMAGE_EXTENSIONS)]
    return [(path, *_stat(path), error) for path, error in store.walk_local(folder.path)
            if path.lower().endswith(IMAGE_EXTENSIONS)]


def stat_paths(paths: list[str]) -> tuple[list[int], list[int]]:
    """(sizes, mtimes in ns) of local files and URIs (one listing call per URI filesystem);
    -1 for a file that is missing or cannot be read (it is reported when decoded)."""
    sizes, mtimes = [-1] * len(paths), [-1] * len(paths)
    remote: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        if store.is_uri(path):
            remote.setdefault(path.split("://", 1)[0] + "://" + path.split("://", 1)[1].split("/", 1)[0], []).append(i)
        else:
            sizes[i], mtimes[i] = _stat(path)
    for bucket, idx in remote.items():
        fs, _ = store.resolve(bucket)
        infos = fs.get_file_info([store.resolve(paths[i])[1] for i in idx])
        for i, info in zip(idx, infos):
            if info.type == pafs.FileType.File:
                sizes[i] = int(info.size or 0)
                mtimes[i] = int(info.mtime_ns or 0)
    return sizes, mtimes


def _stat(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a local file (through symlinks); (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except (OSError, ValueError):
        return -1, -1


def scan_layout(root: str) -> pd.DataFrame:
    """List ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*`` (class folders case-insensitive), or
    a labelled sample with only class folders, ``ROOT/{NORMAL,PNEUMONIA}/*`` (a hospital's
    sample to evaluate or calibrate on: its images are its ``test`` split).

    Raises :class:`DataError` naming the path for a missing root, no split or class folders, an
    unknown class folder, a missing or empty class folder.
    """
    fs, base = store.resolve(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataError(f"data root {root!r} does not exist or is not a folder")
    entries = [i for i in _list_dir(fs, base) if i.type == pafs.FileType.Directory]
    splits = {i.base_name.lower(): i for i in entries}
    found = [s for s in SPLITS if s in splits]
    if not found and {i.base_name.upper() for i in entries} & set(CLASSES):  # ROOT/{NORMAL,PNEUMONIA}
        splits, found = {"test": info}, ["test"]
    if not found:
        raise DataError(
            f"data root {root!r} has no split folders; expected ROOT/{{train,val,test}}/"
            f"{{NORMAL,PNEUMONIA}}/*.jpeg (or a labelled sample ROOT/{{NORMAL,PNEUMONIA}}/*), found "
            f"{sorted(splits) or 'nothing'}"
        )
    rows = []
    for split in found:
        classes = {}
        for c in _list_dir(fs, splits[split].path):
            if c.type != pafs.FileType.Directory:
                continue
            if c.base_name.upper() not in CLASSES:
                raise DataError(
                    f"unknown class folder {store.full_path(c.path, root)!r}; expected {list(CLASSES)}"
                )
            classes[c.base_name.upper()] = c
        for name in CLASSES:
            where = (store.join(root, splits[split].base_name, name) if splits[split] is not info
                     else store.join(root, name))
            if name not in classes:
                raise DataError(f"missing class folder {where!r} (expected {list(CLASSES)} in each split)")
            files = _scan_class_folder(fs, classes[name], root)
            if not files:
                raise DataError(f"class folder {where!r} has no {'/'.join(IMAGE_EXTENSIONS)} images")
            rows += [(path, CLASSES.index(name), split, size, mtime, error) for path, size, mtime, error in files]
    df = pd.DataFrame(rows, columns=["path", "label", "source_split", "size_bytes", "mtime_ns", "error"])
    df["patient"] = patients(df["path"])
    return df[CATALOG_COLUMNS].sort_values("path", ignore_index=True)


def patients(paths: pd.Series, given: pd.Series | None = None) -> pd.Series:
    """Patient id per image: ``given`` (a manifest's ``patient`` column) where set, else a
    DICOM file's PatientID, else :func:`patient_id` of the file name."""

    out = pd.Series([None] * len(paths), index=paths.index, dtype=object)
    if given is not None:
        text = given.astype("string").str.strip()
        out = text.where(text.notna() & (text != ""), None).astype(object)
    for i in out.index[out.isna()]:
        path = paths.at[i]
        dicom = dicom_patient_id(path) if path.lower().endswith(DICOM_EXTENSIONS) else None
        out.at[i] = dicom or patient_id(path)
    return out


def read_table(path: str) -> pd.DataFrame:
    """A CSV or Parquet manifest (local path or URI) as a DataFrame; :class:`DataError` names it."""
    if not store.exists(path):
        raise DataError(f"manifest {path!r} does not exist")
    fs, p = store.resolve(path)
    try:
        if path.lower().endswith(".parquet"):
            return pd.read_parquet(p, filesystem=fs)
        with fs.open_input_stream(p) as f:
            return pd.read_csv(f)
    except (OSError, ValueError) as e:
        raise DataError(f"manifest {path!r} cannot be read: {e}") from e


def manifest_paths(df: pd.DataFrame, path: str) -> list[str]:
    """The manifest's ``path`` column, relative entries taken relative to the manifest's folder."""
    base = path.rsplit("/", 1)[0] if store.is_uri(path) else os.path.dirname(os.path.abspath(path))
    return [p if store.is_uri(p) or os.path.isabs(p) else store.join(base, p) for p in df["path"].astype(str)]


def read_manifest(path: str) -> pd.DataFrame:
    """Read a CSV/Parquet manifest with ``path``, ``label`` and optional ``split`` and
    ``patient`` columns (a missing patient is taken from the file, see :func:`patients`).

    Relative image paths are taken relative to the manifest's folder. Rows without a split
    are treated as ``train``.
    """
    df = read_table(path)
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(f"manifest {path!r} lacks column(s) {missing}; found columns {list(df.columns)}")
    out = pd.DataFrame()
    out["path"] = manifest_paths(df, path)
    out["label"] = [label_from_name(v, f"manifest {path!r} row {i}") for i, v in enumerate(df["label"])]
    splits = df["split"].fillna("train").astype(str).str.lower() if "split" in df else "train"
    out["source_split"] = splits
    bad = sorted(set(out["source_split"]) - set(SPLITS))
    if bad:
        raise DataError(f"manifest {path!r}: unknown split value(s) {bad}; expected {list(SPLITS)}")
    out["patient"] = patients(out["path"], df["patient"] if "patient" in df else None)
    # the cache fingerprint must see an image re-exported at the same path: stat every row
    out["size_bytes"], out["mtime_ns"] = stat_paths(out["path"].tolist())
    out["error"] = ""
    if out.empty:
        raise DataError(f"manifest {path!r} lists no images")
    return out[CATALOG_COLUMNS].sort_values("path", ignore_index=True)


def load_catalog(root: str) -> pd.DataFrame:
    """Catalog of a dataset folder or manifest file (see module docstring for columns)."""
    if not root:
        raise DataError("no dataset given: set data.root (or pass --data ROOT)")
    if root.lower().endswith((".csv", ".parquet")):
        return read_manifest(root)
    return scan_layout(root)


def _carve_val(df: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """Pick validation patients per class until ~fraction of that class's images is reached."""
    rng = np.random.default_rng(seed)
    per_patient = df.groupby("patient").agg(n=("path", "size"), label=("label", lambda s: s.mode().iat[0]))
    val_patients: set[str] = set()
    for label in sorted(per_patient["label"].unique()):
        group = per_patient[per_patient["label"] == label]
        target = fraction * group["n"].sum()
        order = rng.permutation(np.array(sorted(group.index)))
        taken = 0
        for k, patient in enumerate(order):
            if taken >= target or k >= len(order) - 1:  # keep >= 1 patient per class in train
                break
            val_patients.add(patient)
            taken += int(group.at[patient, "n"])
    return df["patient"].isin(val_patients)


def assign_splits(catalog: pd.DataFrame, cfg: DataConfig, training: bool = True) -> pd.DataFrame:
    """Add the ``split`` column cxr_ray trains and reports on.

    ``grouped`` (default): pool the source train and val images and carve a validation split
    of ~``val_fraction`` of each class's images, whole patients at a time, seeded. The
    official val split has only 16 images, too few to select models or thresholds on.
    ``official``: keep the folders' splits. Test images always stay in ``test``.
    ``training=False`` (evaluation, calibration): a dataset without train or val images is
    fine (a hospital's labelled sample is all ``test``).
    """
    df = catalog.copy()
    if cfg.val_split == "official":
        df["split"] = df["source_split"]
        if training and not (df["split"] == "val").any():
            raise DataError("data.val_split='official' but the dataset has no val images")
    else:
        pool = df["source_split"] != "test"
        df["split"] = df["source_split"]
        is_val = _carve_val(df[pool], cfg.val_fraction, cfg.seed)
        df.loc[pool, "split"] = np.where(is_val, "val", "train")
    if training and not (df["split"] == "train").any():
        raise DataError("the dataset has no training images")
    return df


def shared_patients(df: pd.DataFrame, a: str, b: str) -> list[str]:
    """Patients with images in both split ``a`` and split ``b`` (sorted)."""
    in_a = set(df.loc[df["split"] == a, "patient"])
    return sorted(in_a & set(df.loc[df["split"] == b, "patient"]))


def check_patient_leaks(df: pd.DataFrame) -> list[str]:
    """Refuse a split where a patient is in both train and val; returns report lines.

    One patient's images are correlated: with a patient on both sides, validation (and so
    early stopping, the threshold and model selection) would partly grade memorised
    patients. A patient shared with ``test`` is reported as a warning line (``test``
    figures would be optimistic) but does not stop training.
    """
    lines = unnamed_patients_warning(df)
    leaks = shared_patients(df, "train", "val")
    if leaks:
        examples = [f"{p} ({', '.join(df.loc[df['patient'] == p, 'path'].head(2))})" for p in leaks[:5]]
        raise DataError(
            f"{len(leaks)} patient(s) have images in both train and val, so validation would grade "
            f"images of patients the model trained on; e.g. {'; '.join(examples)}. Use "
            f"data.val_split=grouped (carves val by patient) or fix the manifest's split column.")
    lines.append("patients shared between train and val: 0")
    if (df["split"] == "test").any():
        shared = sorted(set(shared_patients(df, "train", "test")) | set(shared_patients(df, "val", "test")))
        lines.append(f"patients shared between train/val and test: {len(shared)}"
                     + (f" (WARNING: test figures will be optimistic; e.g. {shared[:5]})" if shared else ""))
    return lines


# above this share of images without a patient id, the split by patient is a split by image
UNNAMED_PATIENTS_WARN = 0.5


def unnamed_patients_warning(df: pd.DataFrame) -> list[str]:
    """A loud line when most images name no patient: their file names are not Kermany's
    (``person12_bacteria_45``, ``IM-0115-0001``), no manifest ``patient`` column and no DICOM
    PatientID gave one, so each such image is its own patient (its file stem). The split by
    patient then falls back to a split by image, and "patients shared: 0" is no reassurance."""
    if df.empty:
        return []
    stems = df["path"].map(lambda p: PurePosixPath(str(p).replace("\\", "/")).stem)
    unnamed = int((df["patient"].astype(str) == stems).sum())
    if unnamed <= UNNAMED_PATIENTS_WARN * len(df):
        return []
    return [f"WARNING: {unnamed} of {len(df)} images ({unnamed / len(df):.0%}) name no patient (file names "
            f"are not Kermany's, no manifest 'patient' column, no DICOM PatientID): each is its own patient, "
            f"so the split by patient falls back to a split by image and images of one patient may sit in "
            f"both train and val (validation would be optimistic). Give a manifest with a 'patient' column "
            f"(--data manifest.csv with path,label,patient)"]


def split_leaks(df: pd.DataFrame) -> list[str]:
    """Patients whose images sit in more than one split, as readable problem lines."""
    spread = df.groupby("patient")["split"].agg(lambda s: sorted(set(s)))
    return [f"patient {p!r} appears in splits {s}" for p, s in spread.items() if len(s) > 1]
