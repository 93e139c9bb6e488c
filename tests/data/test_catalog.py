import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_ray.config import DataConfig
from cxr_ray.data.catalog import (
    assign_splits,
    check_patient_leaks,
    load_catalog,
    patient_id,
    read_manifest,
    scan_layout,
    split_leaks,
)
from cxr_ray.errors import DataError


@pytest.mark.parametrize("name, patient", [
    ("person12_bacteria_45.jpeg", "person12"), ("person1_virus_6.jpeg", "person1"),
    ("PERSON1000_Virus_1681.JPG", "person1000"), ("person7_bacteria_29.png", "person7"),
    ("IM-0115-0001.jpeg", "IM-0115"), ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-IM-0381"),
    ("IM-0551-0001-0001.jpeg", "IM-0551"), ("IM-0551-0001-0002.jpeg", "IM-0551"),
    ("NORMAL2-IM-1096-0001-0003.jpeg", "NORMAL2-IM-1096"), ("normal2-im-1096-0001.PNG", "NORMAL2-IM-1096"),
    ("im-0115-0001.dcm", "IM-0115"), ("IM-0115-0001", "IM-0115"),
    ("/a/b/scan_77.png", "scan_77"), ("s3://bucket/x/IM-0001-0002.jpg", "IM-0001"),
])
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def test_manifest_patient_column_wins_and_dicom_patient_id(tmp_path):
    from cxr_ray.data.synthetic import write_dicom

    _img(tmp_path / "a.png")
    _img(tmp_path / "IM-0001-0001.png")
    write_dicom(tmp_path / "scan.dcm", np.full((16, 16), 100, np.uint16), patient_id="PAT-42")
    pd.DataFrame({"path": ["a.png", "IM-0001-0001.png", "scan.dcm"], "label": [0, 0, 1],
                  "patient": ["P1", None, ""]}).to_csv(tmp_path / "m.csv", index=False)
    df = read_manifest(str(tmp_path / "m.csv"))
    by_name = dict(zip(df["path"].map(lambda p: p.rsplit("/", 1)[1]), df["patient"]))
    assert by_name == {"a.png": "P1", "IM-0001-0001.png": "IM-0001", "scan.dcm": "PAT-42"}


def _img(path, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(path)


def _layout(root, splits=("train", "val"), n=3):
    for s in splits:
        for c in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                name = f"IM-{i:04d}-0001.jpeg" if c == "NORMAL" else f"person{i}_virus_{i}.jpeg"
                _img(root / s / c / f"{s}{name}" if s != "train" else root / s / c / name)
    return root


def test_scan_layout_labels_and_splits(tmp_path):
    root = _layout(tmp_path / "d", splits=("train", "val", "test"))
    (root / "train" / "NORMAL" / "notes.txt").write_text("ignored")
    df = scan_layout(str(root))
    assert len(df) == 18
    assert set(df["source_split"]) == {"train", "val", "test"}
    normal = df[df["path"].str.contains("/NORMAL/")]
    assert (normal["label"] == 0).all() and (df.loc[~df.index.isin(normal.index), "label"] == 1).all()


def test_class_folders_case_insensitive(tmp_path):
    _img(tmp_path / "train" / "normal" / "IM-0001-0001.png")
    _img(tmp_path / "train" / "Pneumonia" / "person1_virus_1.jpg")
    df = scan_layout(str(tmp_path))
    assert sorted(df["label"]) == [0, 1]


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_catalog(str(tmp_path / "nope"))


def test_root_without_splits(tmp_path):
    _img(tmp_path / "x.jpeg")
    with pytest.raises(DataError, match="no split folders"):
        load_catalog(str(tmp_path))


def test_unknown_class_folder_named(tmp_path):
    root = _layout(tmp_path)
    _img(root / "train" / "COVID" / "a.jpeg")
    with pytest.raises(DataError, match=r"train/COVID"):
        scan_layout(str(root))


def test_missing_class_folder_named(tmp_path):
    _img(tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(DataError, match=r"missing class folder .*train/PNEUMONIA"):
        scan_layout(str(tmp_path))


def test_empty_class_folder_named(tmp_path):
    root = _layout(tmp_path)
    for f in (root / "val" / "PNEUMONIA").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"val/PNEUMONIA.*no"):
        scan_layout(str(root))


def test_manifest_csv_and_missing_column(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "person3_virus_1.png")
    pd.DataFrame({"path": ["imgs/a.png", "imgs/person3_virus_1.png"], "label": ["normal", 1],
                  "split": ["train", "test"]}).to_csv(tmp_path / "m.csv", index=False)
    df = read_manifest(str(tmp_path / "m.csv"))
    assert list(df["label"]) == [0, 1] and list(df["source_split"]) == ["train", "test"]
    assert df["path"].iloc[0] == str(tmp_path / "imgs" / "a.png")
    pd.DataFrame({"path": ["imgs/a.png"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet.*lacks column.*label"):
        load_catalog(str(tmp_path / "bad.parquet"))


def test_manifest_bad_label(tmp_path):
    pd.DataFrame({"path": ["a.png"], "label": ["covid"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match="unknown label 'covid'"):
        read_manifest(str(tmp_path / "m.csv"))


def _patients_catalog(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.7)
        for k in range(int(rng.integers(1, 4))):
            name = f"person{p}_virus_{k}.jpeg" if label else f"IM-{p:04d}-{k:04d}.jpeg"
            rows.append({"path": f"/d/train/x/{name}", "label": label, "source_split": "train",
                         "size_bytes": 1, "mtime_ns": 1})
    rows.append({"path": "/d/test/x/IM-9999-0001.jpeg", "label": 0, "source_split": "test",
                 "size_bytes": 1, "mtime_ns": 1})
    df = pd.DataFrame(rows)
    df["patient"] = df["path"].map(patient_id)
    return df


def test_grouped_split_no_leak_stratified_seeded():
    df = _patients_catalog()
    a = assign_splits(df, DataConfig(val_fraction=0.2, seed=1))
    assert split_leaks(a) == []
    assert a.loc[a["source_split"] == "test", "split"].eq("test").all()  # test never touched
    for label in (0, 1):
        part = a[(a["label"] == label) & (a["source_split"] == "train")]
        share = (part["split"] == "val").mean()
        assert 0.15 <= share <= 0.3, (label, share)
    assert a["split"].tolist() == assign_splits(df, DataConfig(val_fraction=0.2, seed=1))["split"].tolist()
    assert a["split"].tolist() != assign_splits(df, DataConfig(val_fraction=0.2, seed=2))["split"].tolist()


def test_train_val_patient_leak_refused_with_examples(tmp_path):
    root = _layout(tmp_path)
    _img(root / "val" / "NORMAL" / "IM-0000-0009.jpeg")  # patient IM-0000 also has a train image
    df = assign_splits(load_catalog(str(root)), DataConfig(val_split="official"))
    with pytest.raises(DataError, match=r"1 patient\(s\) have images in both train and val.*IM-0000"):
        check_patient_leaks(df)
    grouped = assign_splits(load_catalog(str(root)), DataConfig(val_split="grouped", val_fraction=0.3))
    assert check_patient_leaks(grouped)[0] == "patients shared between train and val: 0"


def test_official_split_keeps_folders(tmp_path):
    root = _layout(tmp_path)
    df = assign_splits(load_catalog(str(root)), DataConfig(val_split="official"))
    assert (df["split"] == df["source_split"]).all()


def test_hospital_file_names_without_patients_are_said_loudly(tmp_path):
    """A hospital export (``scan_0001.png``) names no patient: the split falls back to images,
    and the report says so before anything trains; a manifest's patient column silences it."""
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            for i in range(6):
                _img(tmp_path / "site" / split / label / f"scan_{split}_{label}_{i:04d}.png")
    df = assign_splits(load_catalog(str(tmp_path / "site")), DataConfig(val_fraction=0.3))
    lines = check_patient_leaks(df)
    assert lines[0].startswith("WARNING: 24 of 24 images (100%) name no patient") and "'patient' column" in lines[0]
    paths = sorted(str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site").rglob("*.png"))
    pd.DataFrame({"path": paths, "label": [0 if "NORMAL" in p else 1 for p in paths],
                  "split": [p.split("/")[0] for p in paths],
                  "patient": [f"P{i // 2}" for i in range(len(paths))]}
                 ).to_csv(tmp_path / "site" / "m.csv", index=False)
    named = assign_splits(load_catalog(str(tmp_path / "site" / "m.csv")), DataConfig(val_fraction=0.3))
    assert not any(line.startswith("WARNING") for line in check_patient_leaks(named))
