"""Input limits that hold: per-file size (``data.max_file_mb``), the DICOM memory budget
(``data.max_pixels`` counting frames, samples and the float64 LUT step), formats by extension
(EPS in a ``.png`` never reaches Ghostscript), and patient-ID reads that refuse special files
and time out. Each refusal is tried with a harmless payload; nothing here starts Ray.
"""

from __future__ import annotations

import io
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow._fs as pafs_internal
import pytest
from helpers import write_image
from PIL import EpsImagePlugin, Image

from cxr_ray.config import DataConfig, ExperimentConfig
from cxr_ray.data import decode
from cxr_ray.data.decode import (
    ImageDecodeError,
    allowed_formats,
    decode_image,
    decode_path,
    dicom_patient_id,
    read_file,
)
from cxr_ray.errors import ConfigError
from cxr_ray.storage import uri as cxr_io

# A tiny, valid EPS file: Pillow's EPS plugin identifies it (and would run Ghostscript on load).
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
MB = 2**20


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space (a hole) and must never be read."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def png_bytes(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def never_opened(monkeypatch):
    """Fail the test if any file is opened for reading (a refusal must come from stat/metadata)."""
    def refuse(path, max_file_mb):
        raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(decode, "_open_checked", refuse)


# --- data.max_file_mb ------------------------------------------------------------------------------

def test_max_file_mb_is_validated():
    assert DataConfig().max_file_mb == 512.0
    assert ExperimentConfig().replace(**{"data.max_file_mb": 0.5}).data.max_file_mb == 0.5
    for bad in (0, -1, float("inf"), float("nan"), "big"):
        with pytest.raises(ConfigError, match="data.max_file_mb"):
            DataConfig(max_file_mb=bad)


def test_a_file_over_max_file_mb_is_refused_from_stat(tmp_path, never_opened):
    big = sparse(tmp_path / "big.png", 3 * MB)
    with pytest.raises(ImageDecodeError, match=r"file is 3.0 MB \(3,145,728 bytes\), over data.max_file_mb=2") as e:
        read_file(str(big), max_file_mb=2)
    assert e.value.path == str(big)
    d = decode_path(str(big), 16, max_file_mb=0.5)  # a batch job: an error row, and it goes on
    assert "over data.max_file_mb=0.5" in d.error and d.sha1 == "" and d.pixels.shape == (16, 16)
    assert "over data.max_file_mb" in decode_path(f"file://{big}", 16, max_file_mb=1).error


def test_a_file_within_max_file_mb_reads_whole(tmp_path):
    path = write_image(tmp_path / "x.png", size=64)
    assert read_file(str(path), max_file_mb=1) == path.read_bytes()
    assert decode_path(str(path), 16, max_file_mb=path.stat().st_size / MB).error is None  # exactly at the limit
    assert read_file(f"file://{path}", max_file_mb=1) == path.read_bytes()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert decode_path(str(empty), 16).error == "empty file (0 bytes)"


def test_a_file_longer_than_its_stat_is_cut_off_at_the_limit(tmp_path):
    """The read itself is capped: a device that claims 0 bytes (or a file that grows after
    stat) is refused once more than max_file_mb has come in, never read to the end."""
    with open("/dev/zero", "rb") as f:
        class Endless:  # /dev/zero behind pyarrow's NativeFile interface: size() says 0
            def size(self) -> int:
                return 0

            def read(self, n: int) -> bytes:
                return f.read(n)

        start = time.perf_counter()
        with pytest.raises(ImageDecodeError, match="grew past data.max_file_mb=1 while being read"):
            decode._read_capped(Endless(), "zero.png", max_file_mb=1)
        assert time.perf_counter() - start < 5


def test_object_over_max_file_mb_is_refused_from_its_metadata(monkeypatch):
    """An object store's size comes from the open (its HEAD request), before any byte is read."""
    fs = pafs_internal._MockFileSystem(datetime.now())
    fs.create_dir("bucket")
    for name, data in {"big.png": b"\0" * (2 * MB), "ok.png": png_bytes()}.items():
        with fs.open_output_stream(f"bucket/{name}") as f:
            f.write(data)
    monkeypatch.setattr(cxr_io, "resolve", lambda p: (fs, p.split("://", 1)[1]))
    reads = []
    monkeypatch.setattr(decode, "_read_capped", lambda f, p, mb: reads.append(p) or f.read(f.size()))
    d = decode_path("s3://bucket/big.png", 16, max_file_mb=1)
    assert d.error == "file is 2.0 MB (2,097,152 bytes), over data.max_file_mb=1 (not a single chest X-ray)"
    assert reads == []  # refused from the size, nothing read
    assert decode_path("s3://bucket/ok.png", 16, max_file_mb=1).error is None
    assert reads == ["s3://bucket/ok.png"]


def test_object_over_max_file_mb_on_a_real_s3_server(monkeypatch):
    """The same through pyarrow's S3 client against moto's S3 server (no Ray)."""
    pytest.importorskip("moto")
    import pyarrow.fs as pafs
    from helpers import moto_server

    with moto_server() as endpoint:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                     "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("limits")
        cxr_io.write_bytes("s3://limits/big.png", b"\0" * (2 * MB))
        cxr_io.write_bytes("s3://limits/ok.png", png_bytes())
        assert "over data.max_file_mb=1" in decode_path("s3://limits/big.png", 16, max_file_mb=1).error
        assert read_file("s3://limits/ok.png", max_file_mb=1) == png_bytes()
        assert "cannot read file" in decode_path("s3://limits/missing.png", 16).error


def test_score_and_prepare_udfs_pass_max_file_mb_on(tmp_path):
    """The Ray Data UDFs (called here as plain functions) hand the limit to decoding."""
    import pandas as pd

    from cxr_ray.apps.score.stages import read_and_decode
    from cxr_ray.data.cache import decode_batch

    path = str(write_image(tmp_path / "x.png", size=64))
    scored = read_and_decode({"path": np.asarray([path], dtype=object), "label": np.zeros(1, np.int8)},
                             cache_size=32, image_size=32, max_file_mb=1e-5)
    assert "over data.max_file_mb=1e-05" in scored["error"][0]
    rows = pd.DataFrame({"path": [path], "label": [0], "patient": ["p"], "split": ["train"],
                         "source_split": ["train"], "error": [""]})
    table = decode_batch(rows, 32, 10**8, 5.0, 1e-5).to_pandas()
    assert "over data.max_file_mb=1e-05" in table["error"][0]
    assert pd.isna(decode_batch(rows, 32, 10**8, 5.0, 1.0).to_pandas()["error"][0])


# --- the DICOM budget --------------------------------------------------------------------------------

def _dicom(tmp_path: Path, name: str, pixels: np.ndarray, **tags) -> bytes:
    """A 16-bit DICOM file (``write_dicom``), with header ``tags`` then changed, pixel data kept."""
    pydicom = pytest.importorskip("pydicom")
    from cxr_ray.data.synthetic import write_dicom

    path = write_dicom(tmp_path / name, pixels)
    if tags:
        ds = pydicom.dcmread(path)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(path)
    return path.read_bytes()


def test_dicom_budget_counts_samples_at_float64(tmp_path):
    data = _dicom(tmp_path, "a.dcm", np.full((256, 256), 900, np.uint16))
    samples = 256 * 256  # 8 bytes each after the LUT step, against 4 bytes a pixel of the budget
    assert decode_image(data, 16, "a.dcm", max_pixels=2 * samples)[1:] == (256, 256)
    with pytest.raises(ImageDecodeError, match=r"256x256 x 1 frame\(s\) x 1 sample\(s\) = 0.1 M samples, .*"
                                               r"data.max_pixels=131071") as e:
        decode_image(data, 16, "a.dcm", max_pixels=2 * samples - 1)
    assert e.value.path == "a.dcm"


def test_dicom_budget_counts_frames_and_samples_per_pixel_before_decoding(tmp_path):
    pixels = np.full((256, 256), 900, np.uint16)
    budget = 2 * 256 * 256 * 2  # room for two single-sample frames
    # The pixel data holds one frame: had it been decoded, the error would be pydicom's.
    frames = _dicom(tmp_path, "f.dcm", pixels, NumberOfFrames=3)
    with pytest.raises(ImageDecodeError, match=r"x 3 frame\(s\) x 1 sample\(s\).*over .*data.max_pixels"):
        decode_image(frames, 16, "f.dcm", max_pixels=budget)
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames\)"):  # within budget: by header
        decode_image(frames, 16, "f.dcm")
    rgb = _dicom(tmp_path, "c.dcm", pixels, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    with pytest.raises(ImageDecodeError, match=r"x 1 frame\(s\) x 3 sample\(s\).*over .*data.max_pixels"):
        decode_image(rgb, 16, "c.dcm", max_pixels=budget)


def test_ordinary_dicoms_fit_the_default_budget(tmp_path):
    for cols, rows in ((3000, 3000), (4000, 4000), (4288, 3520)):  # detector sizes, 16 bits, one frame
        decode._check_dicom_budget("x.dcm", cols, rows, 1, 1, decode.DEFAULT_MAX_PIXELS)
    data = _dicom(tmp_path, "big.dcm", np.random.default_rng(0).integers(0, 4096, (3000, 3000), dtype=np.uint16))
    pixels, width, height = decode_image(data, 64, "big.dcm")
    assert (width, height) == (3000, 3000) and pixels.shape == (64, 64)
    with pytest.raises(ImageDecodeError, match="data.max_pixels"):  # a hostile header: 50 frames of 4000x4000
        decode._check_dicom_budget("x.dcm", 4000, 4000, 50, 1, decode.DEFAULT_MAX_PIXELS)


# --- formats by extension: EPS in a .png --------------------------------------------------------------

@pytest.fixture
def eps_trap(monkeypatch):
    """Pillow's EPS parser and its Ghostscript call, made to fail the test if ever reached."""
    calls = []

    def trap(*args, **kw):
        calls.append(args)
        raise AssertionError("the EPS plugin was invoked")

    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # the payload is EPS to an unrestricted open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", trap)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", trap)
    return calls


@pytest.mark.parametrize("name", ["x.png", "x.jpeg", "x.tif", "x.eps", "x", "<bytes>"])
def test_eps_content_never_reaches_ghostscript(tmp_path, eps_trap, name):
    with pytest.raises(ImageDecodeError, match="not a recognised image file") as e:
        decode_image(EPS, 16, name)
    assert e.value.path == name and eps_trap == []


def test_eps_saved_as_png_is_an_error_row(tmp_path, eps_trap):
    path = tmp_path / "x.png"
    path.write_bytes(EPS)
    d = decode_path(str(path), 16)
    assert d.error == "not a recognised image file (read as PNG, the formats its name allows)"
    assert eps_trap == []


def test_formats_follow_the_extension():
    assert allowed_formats("/a/b.PNG") == ("PNG",)
    assert allowed_formats("s3://b/x.jpg") == allowed_formats("x.JPEG") == ("JPEG",)
    assert allowed_formats("x.tiff") == allowed_formats("x.tif") == ("TIFF",)
    assert allowed_formats("x.bmp") == ("BMP",)
    for unknown in ("<bytes>", "/exports/IM0001", "x.eps", "x.pdf", "x.ps", "a.b/c"):
        formats = allowed_formats(unknown)
        assert formats == ("PNG", "JPEG", "BMP", "TIFF") and not {"EPS", "PDF"} & set(formats)
    png = png_bytes(32)
    assert decode_image(png, 16, "ok.png")[1:] == (32, 32)
    assert decode_image(png, 16)[1:] == (32, 32)  # no name: any common raster format
    with pytest.raises(ImageDecodeError, match=r"read as JPEG"):  # a PNG named .jpeg is refused
        decode_image(png, 16, "mislabelled.jpeg")


# --- DICOM patient-ID reads ---------------------------------------------------------------------------

def test_patient_id_refuses_special_files_without_opening_them(tmp_path, never_opened):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    os.symlink("/dev/zero", tmp_path / "zero.dcm")
    os.mkdir(tmp_path / "folder.dcm")
    sparse(tmp_path / "huge.dcm", 3 * MB)
    start = time.perf_counter()
    for name in ("pipe.dcm", "zero.dcm", "folder.dcm", "missing.dcm"):
        assert dicom_patient_id(str(tmp_path / name)) is None
    assert dicom_patient_id(str(tmp_path / "huge.dcm"), max_file_mb=1) is None
    assert time.perf_counter() - start < 2  # refused from stat: nothing blocked
    with pytest.raises(ImageDecodeError, match="not a regular file: a character device"):
        read_file(str(tmp_path / "zero.dcm"))


def test_patient_id_reads_the_header(tmp_path):
    pytest.importorskip("pydicom")
    from cxr_ray.data.synthetic import write_dicom

    path = write_dicom(tmp_path / "p.dcm", np.full((16, 16), 5, np.uint16), patient_id=" PAT-7 ")
    assert dicom_patient_id(str(path)) == "PAT-7"
    assert dicom_patient_id(f"file://{path}") == "PAT-7"


def test_patient_id_read_times_out_like_decodes(tmp_path, monkeypatch):
    """A header read that stalls (a hung network mount) is abandoned after the timeout; a FIFO
    that got past the stat checks (swapped in after them) is opened non-blocking and refused
    from its descriptor at once."""
    pytest.importorskip("pydicom")
    fifo = tmp_path / "stalled.dcm"
    os.mkfifo(fifo)
    # as if the stat checks had passed, on a mount whose reads can stall
    monkeypatch.setattr(decode, "_check_before_open", lambda path, timeout_s, max_file_mb: timeout_s)
    start = time.perf_counter()
    assert dicom_patient_id(str(fifo), timeout_s=5) is None  # never blocks: refused by fstat
    assert time.perf_counter() - start < 2
    monkeypatch.setattr(decode, "_read_patient_header", lambda path, max_file_mb: time.sleep(3))
    start = time.perf_counter()
    assert dicom_patient_id(str(fifo), timeout_s=0.5) is None
    assert time.perf_counter() - start < 2.5
