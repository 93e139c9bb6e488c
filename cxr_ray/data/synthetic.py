"""Synthetic chest-X-ray-like images in the Kermany folder layout (a feature, not a test hack).

SYNTHETIC DATA, NOT MEDICAL IMAGES. Each image has a bright body silhouette, two dark lung
fields, a spine, faint ribs and noise; PNEUMONIA images add 1-4 patchy opacities inside
the lungs. NORMAL images carry faint small blobs (vessels) and both classes vary in
exposure, contrast and anatomy, so the task is learnable but not trivially separable.
File names follow the dataset's patient conventions (``personN_bacteria_M.jpeg``,
``IM-XXXX-YYYY.jpeg``, ``NORMAL2-IM-XXXX-YYYY.jpeg``), with 1-3 images per patient.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_ray.data.catalog import CLASSES
from cxr_ray.errors import ConfigError

PNEUMONIA_SHARE = 0.73  # as in the real train split
SPLIT_SHARES = {"train": 0.8, "val": 0.05, "test": 0.15}


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def chest_image(size: int, pneumonia: bool, rng: np.random.Generator, with_mask: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One synthetic ``(size, size)`` uint8 chest image; opacities when ``pneumonia``. With
    ``with_mask``, also the boolean mask of the opacities (the same image either way)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = _blob(yy, xx, 0.55, 0.5, 0.75, rng.uniform(0.38, 0.46)) > 0.35
    img = 0.08 + 0.55 * body
    lung_y, lung_ry = rng.uniform(0.45, 0.52), rng.uniform(0.26, 0.32)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        lungs = np.maximum(lungs, _blob(yy, xx, lung_y, cx, lung_ry, rng.uniform(0.12, 0.15)))
    img -= 0.45 * np.clip(lungs * 2.0, 0, 1)
    img += 0.25 * np.exp(-((xx - 0.5) / 0.035) ** 2) * body  # spine
    rib_phase = rng.uniform(0, np.pi)
    img += 0.05 * np.sin(yy * 40 + rib_phase + 6 * np.abs(xx - 0.5)) * lungs  # ribs
    for _ in range(rng.integers(2, 7)):  # vessels / small nodules: present in both classes
        cy, cx = rng.uniform(0.3, 0.65), 0.5 + rng.choice([-1, 1]) * rng.uniform(0.1, 0.25)
        r = rng.uniform(0.01, 0.025)
        img += rng.uniform(0.05, 0.15) * _blob(yy, xx, cy, cx, r, r)
    mask = np.zeros(img.shape, bool)
    if pneumonia:
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0.35, 0.7), 0.5 + rng.choice([-1, 1]) * rng.uniform(0.12, 0.24)
            ry, rx = rng.uniform(0.05, 0.12), rng.uniform(0.04, 0.09)
            blob = _blob(yy, xx, cy, cx, ry, rx)
            patch = blob * (0.6 + 0.4 * rng.random((size, size)))
            img += rng.uniform(0.05, 0.35) * patch * np.clip(lungs * 2.0, 0, 1)
            mask |= (blob > 0.3) & (lungs > 0.1)
    img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean() + rng.uniform(-0.08, 0.08)
    img += rng.normal(0, 0.035, img.shape)
    pixels = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return (pixels, mask) if with_mask else pixels


def _patient_names(label: int, patient: int, n: int, rng: np.random.Generator) -> list[str]:
    if label == 1:
        kind = "bacteria" if rng.random() < 0.65 else "virus"
        return [f"person{patient}_{kind}_{patient * 10 + k}.jpeg" for k in range(n)]
    prefix = "NORMAL2-IM" if rng.random() < 0.5 else "IM"
    return [f"{prefix}-{patient:04d}-{k + 1:04d}.jpeg" for k in range(n)]


def make_synthetic_dataset(out: str | os.PathLike, n: int = 400, size: int = 128, seed: int = 0,
                           split_shares: dict[str, float] | None = None) -> Path:
    """Write ~``n`` synthetic images to ``OUT/{train,val,test}/{NORMAL,PNEUMONIA}``.

    ``split_shares`` (default ``SPLIT_SHARES``) gives each split's share of ``n``. Patients
    (1-3 images each) never cross splits. Returns the dataset root. Deterministic for a given
    (n, size, seed, split_shares).
    """
    if n < 20:
        raise ConfigError(f"n: expected at least 20 images (enough for every split and class), got {n}")
    if not 32 <= size <= 4096:
        raise ConfigError(f"size: expected an int in [32, 4096], got {size}")
    rng = np.random.default_rng(seed)
    root = Path(out)
    shares = split_shares or SPLIT_SHARES
    for split in shares:
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
    patient = 100
    quota = {s: max(4, round(n * share)) for s, share in shares.items()}
    for split in shares:
        count = {0: 0, 1: 0}
        target = {1: round(quota[split] * PNEUMONIA_SHARE)}
        target[0] = quota[split] - target[1]
        for label in (0, 1):
            while count[label] < target[label]:
                k = int(min(rng.integers(1, 4), target[label] - count[label]))
                for name in _patient_names(label, patient, k, rng):
                    img = chest_image(size, bool(label), rng)
                    Image.fromarray(img).save(root / split / CLASSES[label] / name, quality=92)
                count[label] += k
                patient += 1
    return root


def write_dicom(path: str | os.PathLike, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, bits_stored: int = 12,
                patient_id: str = "SYNTHETIC") -> Path:
    """Write a single-frame digital X-ray DICOM file (needs the ``pydicom`` extra).

    ``pixels``: 2-D unsigned ints below ``2**bits_stored``; ``window``: optional (centre,
    width) stored as the VOI window; ``patient_id``: the PatientID tag. Used by tests and
    demos to make realistic DICOM inputs.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", patient_id
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    try:
        ds.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return Path(path)
