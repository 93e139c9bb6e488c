"""Scoring inputs: folders, globs, manifests; labels from folders; fast, named errors."""

import pandas as pd
import pytest

from cxr_ray.data.listing import label_from_path, list_inputs
from cxr_ray.errors import DataError


@pytest.fixture
def tree(tmp_path):
    for rel in ["a/NORMAL/x1.jpeg", "a/PNEUMONIA/deep/x2.png", "a/misc/x3.dcm", "a/.hidden/x4.jpeg",
                "a/.x5.jpeg", "b/x6.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def test_folder_lists_every_visible_file_with_folder_labels(tree):
    df = list_inputs([str(tree / "a")])
    names = {p.rsplit("/", 1)[1]: lab for p, lab in zip(df["path"], df["label"])}
    assert names == {"x1.jpeg": 0, "x2.png": 1, "x3.dcm": -1}


def test_globs_manifests_and_duplicates(tree, monkeypatch):
    monkeypatch.chdir(tree)
    pd.DataFrame({"path": ["x6.jpeg", str(tree / "a/NORMAL/x1.jpeg")], "label": ["PNEUMONIA", None]}).to_csv(
        tree / "b" / "m.csv", index=False)
    df = list_inputs(["a/**/*.jpeg", str(tree / "b" / "m.csv"), str(tree / "a")])
    assert df["path"].is_unique and all(p.startswith("/") for p in df["path"])
    by_name = dict(zip(df["path"].str.rsplit("/", n=1).str[1], df["label"]))
    assert by_name == {"x1.jpeg": 0, "x6.jpeg": 1, "x2.png": 1, "x3.dcm": -1}  # first occurrence wins


@pytest.mark.parametrize("inputs, message", [
    ([], "no input given"),
    (["/nonexistent/folder"], "'/nonexistent/folder' does not exist"),
    (["/nonexistent/*.jpeg"], "matches no files"),
])
def test_bad_inputs_name_the_input(inputs, message):
    with pytest.raises(DataError, match=message):
        list_inputs(inputs)


def test_manifest_without_path_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\nx.jpeg,NORMAL\n")
    with pytest.raises(DataError, match="m.csv' lacks a 'path' column"):
        list_inputs([str(tmp_path / "m.csv")])


def test_label_from_path():
    assert label_from_path("s3://b/test/pneumonia/p.jpeg") == 1
    assert label_from_path("/x/NORMAL/sub/p.jpeg") == 0
    assert label_from_path("/x/NORMAL.jpeg") == -1


def test_listing_streams_in_chunks_and_drops_duplicates_across_them(tree, monkeypatch):
    from cxr_ray.data import listing

    manifest = tree / "big.parquet"
    paths = [f"/archive/{i:05d}.jpeg" for i in range(2500)]
    x1 = str(tree / "a" / "NORMAL" / "x1.jpeg")
    pd.DataFrame({"path": paths + paths[:300] + [x1], "label": ["NORMAL"] * 2801}).to_parquet(manifest)
    monkeypatch.setattr(listing, "CHUNK_ROWS", 1000)
    chunks = list(listing.iter_inputs([str(manifest), str(tree / "a")]))
    # 1000-row batches; the repeats in the third dropped; the folder's x1 was in the manifest
    assert [len(c) for c in chunks] == [1000, 1000, 501, 2]
    assert pd.concat(chunks)["path"].is_unique and (chunks[0]["label"] == 0).all()
    done = listing.PathSet()
    done.add(pd.Series(paths[:10]))
    assert done.contains(pd.Series([paths[0], paths[10]])).tolist() == [True, False] and len(done) == 10


def test_inputs_are_checked_before_any_listing(tree):
    from cxr_ray.data.listing import check_inputs

    check_inputs([str(tree / "a"), str(tree / "a" / "**" / "*.jpeg")])
    (tree / "bad.csv").write_text("file,label\nx.jpeg,NORMAL\n")
    with pytest.raises(DataError, match="bad.csv' lacks a 'path' column"):
        check_inputs([str(tree / "a"), str(tree / "bad.csv")])
