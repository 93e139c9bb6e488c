"""apps/score/output.py directly: the output schema, atomic part files, the writer's part
sizes, reading back, and the checks that keep runs, models and schemas apart."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxr_ray.apps.score.output import (
    JOB_FILE,
    LEASE_FILE,
    TMP_DIR,
    OutputFolder,
    PartWriter,
    check_output,
    output_schema,
    to_output_table,
)
from cxr_ray.data.listing import UNKNOWN_LABEL
from cxr_ray.errors import ScoreError
from cxr_ray.storage.lease import acquire


def _batch(n: int, errors: tuple[int, ...] = (), start: int = 0) -> dict[str, np.ndarray]:
    """A scoring actor's output batch of ``n`` rows; rows ``errors`` could not be read."""
    err = np.asarray(["cannot identify image" if i in errors else "" for i in range(n)], dtype=object)
    return {"path": np.asarray([f"/d/{start + i}.png" for i in range(n)], dtype=object),
            "prob_pneumonia": np.linspace(0.1, 0.9, n).astype(np.float32),
            "threshold": np.full(n, 0.5, np.float32), "model": np.full(n, "run/best@epoch3#abc", dtype=object),
            "width": np.where(err == "", 640, 0).astype(np.int32),
            "height": np.where(err == "", 480, 0).astype(np.int32),
            "error": err, "label": np.asarray([i % 2 for i in range(n)], np.int8),
            "scored_at": np.full(n, np.datetime64("2026-11-29T10:00:00", "us"))}


def test_output_table_nulls_what_an_unreadable_file_does_not_have():
    batch = _batch(4, errors=(2,))
    batch["label"][3] = UNKNOWN_LABEL
    table = to_output_table(batch, with_labels=True)
    assert table.schema == output_schema(True)
    t = table.to_pydict()
    assert t["prediction"] == ["NORMAL", "NORMAL", None, "PNEUMONIA"]  # p 0.1, 0.37, -, 0.9 at 0.5
    assert [p is None for p in t["prob_pneumonia"]] == [False, False, True, False]
    assert t["width"] == [640, 640, None, 640]
    assert t["error"] == [None, None, "cannot identify image", None]
    assert t["label"] == ["NORMAL", "PNEUMONIA", "NORMAL", None]
    assert str(t["scored_at"][0].tzinfo) == "UTC"
    assert "label" not in to_output_table(_batch(2), with_labels=False).column_names


def test_writer_commits_whole_parts_and_reads_back_every_row(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    writer = PartWriter(out, output_schema(False), rows_per_file=3)
    for k in range(3):
        writer.add(to_output_table(_batch(2, start=2 * k), with_labels=False))  # 6 rows: two parts of 3
    assert writer.parts_written == 2 and writer.rows_written == 6
    writer.add(to_output_table(_batch(1, start=6), with_labels=False))
    assert len(out.parts()) == 2  # the 7th row waits in the buffer
    writer.close()
    parts = out.parts()
    assert len(parts) == 3 and [pq.read_metadata(p).num_rows for p in parts] == [3, 3, 1]
    assert all(p.rsplit("/", 1)[1].startswith(f"part-{writer.run_id}-") for p in parts)
    assert out.read(["path"]).num_rows == 7
    assert sum(b.num_rows for b in out.batches(["path"])) == 7
    done = out.done_paths()
    assert len(done) == 7 and done.contains(pd.Series(["/d/0.png", "/d/9.png"])).tolist() == [True, False]
    assert not (tmp_path / "out" / TMP_DIR).exists() or not any((tmp_path / "out" / TMP_DIR).iterdir())


def test_an_interrupted_part_is_never_read_and_is_cleared(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    (tmp_path / "out" / TMP_DIR).mkdir(parents=True)
    (tmp_path / "out" / TMP_DIR / "part-x-00000.parquet").write_bytes(b"half a file")
    (tmp_path / "out" / "notes.parquet").write_bytes(b"not ours")
    assert out.parts() == [] and out.read(["path"]).num_rows == 0
    out.clear_tmp()
    assert not (tmp_path / "out" / TMP_DIR).exists()
    assert OutputFolder(str(tmp_path / "missing")).parts() == []


def test_check_output_keeps_runs_models_and_schemas_apart(tmp_path):
    folder = tmp_path / "out"
    out = OutputFolder(str(folder))
    check_output(out, "m1", with_labels=False, resume=False)  # new folder: fine
    PartWriter(out, output_schema(False), 10).add(to_output_table(_batch(10), with_labels=False))
    out.write_json(JOB_FILE, {"model": "m1", "with_labels": False})
    with pytest.raises(ScoreError, match="already holds 1 result file.*--resume"):
        check_output(out, "m1", with_labels=False, resume=False)
    check_output(out, "m1", with_labels=False, resume=True)  # the same job, resumed
    with pytest.raises(ScoreError, match="scored by model 'm1', not 'm2'"):
        check_output(out, "m2", with_labels=False, resume=True)
    with pytest.raises(ScoreError, match="started without --with-labels"):
        check_output(out, "m1", with_labels=True, resume=True)
    assert json.loads((folder / JOB_FILE).read_text())["model"] == "m1"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScoreError, match="is a file"):
        check_output(OutputFolder(str(tmp_path / "file")), "m1", False, False)


def test_check_output_refuses_a_folder_another_live_job_holds(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with acquire(str(folder / LEASE_FILE), "score"):  # another job scoring into it, alive
        with pytest.raises(ScoreError, match="is in use"):
            check_output(OutputFolder(str(folder)), "m1", False, True)
    check_output(OutputFolder(str(folder)), "m1", False, True)  # released: free again
