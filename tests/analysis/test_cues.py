"""The shortcut audit on small synthetic films: a planted framing cue is found, no cue is no
warning, bad files become error rows, and cue-matched strata expose a framing-reading model."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from cxr_ray.analysis.cues import audit_table, compare_cues, cue_only_auc, cue_strata, cues_batch, image_cues
from cxr_ray.apps.audit import CLASSIFIER_CUES, CUES, GROUPS, format_report, write_report
from cxr_ray.data.synthetic import chest_image

SIZE = 128


def _encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _film(rng: np.random.Generator, wide: bool) -> np.ndarray:
    """A synthetic chest filling the frame (tight) or shrunk onto black film (wide margins)."""
    chest = chest_image(SIZE, False, rng)  # no opacities: the classes differ only as planted
    if not wide:
        return chest
    inner = int(SIZE * rng.uniform(0.6, 0.75))
    small = np.asarray(Image.fromarray(chest).resize((inner, inner), Image.Resampling.BILINEAR))
    canvas = np.clip(rng.normal(3, 2, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    top, left = (int(rng.integers(0, SIZE - inner + 1)) for _ in range(2))
    canvas[top:top + inner, left:left + inner] = small
    return canvas


def _dataset(tmp_path, planted: bool, n_patients: int = 40, seed: int = 0, agree: float = 1.0) -> pd.DataFrame:
    """Two JPEGs per patient; half the patients PNEUMONIA. ``planted``: NORMAL films wide,
    PNEUMONIA tight (for a share ``agree`` of the films; the others the other way round); else
    every film's framing is a coin flip, whatever its class."""
    rng = np.random.default_rng(seed)
    paths, labels, patients = [], [], []
    for p in range(n_patients):
        label = p % 2
        for k in range(2):
            wide = ((label == 0) == bool(rng.random() < agree)) if planted else bool(rng.random() < 0.5)
            path = tmp_path / f"p{p}_{k}.jpeg"
            path.write_bytes(_encode(_film(rng, wide), "JPEG", quality=90))
            paths.append(str(path))
            labels.append(label)
            patients.append(f"patient{p}")
    return audit_table(paths, labels, ["train"] * len(paths), patients)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> pd.DataFrame:
    return _dataset(tmp_path_factory.mktemp("planted"), planted=True)


@pytest.fixture(scope="module")
def null(tmp_path_factory) -> pd.DataFrame:
    return _dataset(tmp_path_factory.mktemp("null"), planted=False, seed=1)


def test_cue_names_are_documented_and_grouped():
    assert list(CUES) == [c for names in GROUPS.values() for c in names]
    assert all(isinstance(v, str) and v for v in CUES.values())
    assert not any(c.startswith("lung_") for c in CLASSIFIER_CUES)


def test_margins_body_field_and_size_on_a_constructed_image():
    rng = np.random.default_rng(0)
    pixels = np.zeros((100, 200), np.uint8)  # 200 wide, 100 high; 20 black columns on the left
    pixels[:, 20:] = rng.integers(120, 200, (100, 180))
    cues = image_cues(_encode(pixels), "x.png")
    assert cues["error"] == ""
    assert (cues["width"], cues["height"], cues["aspect"]) == (200, 100, 2.0)
    assert cues["margin_left"] == pytest.approx(0.10, abs=0.01)
    assert cues["margin_right"] == cues["margin_top"] == cues["margin_bottom"] == 0
    assert cues["background"] == pytest.approx(0.10, abs=0.01)
    assert cues["body_w"] == pytest.approx(0.90, abs=0.01) and cues["body_cx"] == pytest.approx(0.55, abs=0.01)
    assert cues["body_h"] == 1.0 and cues["channels"] == 1.0


def test_sharpness_and_noise_follow_blur_and_added_noise():
    rng = np.random.default_rng(0)
    chest = chest_image(224, False, rng)
    blurred = np.asarray(Image.fromarray(chest).filter(ImageFilter.GaussianBlur(1.5)))
    noisy = np.clip(chest + rng.normal(0, 12, chest.shape), 0, 255).astype(np.uint8)
    sharp, soft, loud = (image_cues(_encode(a), "x.png") for a in (chest, blurred, noisy))
    assert soft["sharpness"] < 0.6 * sharp["sharpness"] < sharp["sharpness"] < loud["sharpness"]
    assert soft["noise"] < sharp["noise"] < loud["noise"]
    assert 0.6 * 12 < loud["noise"] < 1.6 * np.hypot(12, sharp["noise"])  # roughly the sigma added


def test_jpeg_quantisation_read_for_jpeg_nan_for_png():
    chest = chest_image(96, False, np.random.default_rng(0))
    fine, coarse = (image_cues(_encode(chest, "JPEG", quality=q), "x.jpeg")["jpeg_quant"] for q in (95, 40))
    assert 0 < fine < coarse
    assert np.isnan(image_cues(_encode(chest, "PNG"), "x.png")["jpeg_quant"])


def test_bad_files_become_nan_rows_with_an_error(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(chest_image(64, False, np.random.default_rng(0))))
    truncated = tmp_path / "cut.jpeg"
    truncated.write_bytes(_encode(chest_image(64, False, np.random.default_rng(1)), "JPEG")[:200])
    (tmp_path / "text.jpeg").write_text("not an image")
    paths = [str(good), str(truncated), str(tmp_path / "text.jpeg"), str(tmp_path / "missing.png")]
    df = audit_table(paths, [0, 1, 0, 1], ["train"] * 4, ["a", "b", "c", "d"])
    assert df["error"].iloc[0] == "" and all(df["error"].iloc[1:] != "")
    assert df.loc[1:, list(CUES)].isna().all().all() and df.loc[0, list(CUES)].notna().sum() >= 20
    assert image_cues(b"", "empty.png")["error"] == "empty file (0 bytes)"


def test_dicom_is_measured_without_file_format_cues(tmp_path):
    pytest.importorskip("pydicom")
    from cxr_ray.data.synthetic import write_dicom

    pixels = chest_image(96, False, np.random.default_rng(0)).astype(np.uint16) * 16  # 12-bit
    path = write_dicom(tmp_path / "a.dcm", pixels)
    cues = image_cues(path.read_bytes(), str(path))
    assert cues["error"] == "" and (cues["width"], cues["height"]) == (96, 96)
    assert np.isnan(cues["jpeg_quant"]) and np.isnan(cues["channels"]) and cues["sharpness"] > 0


def test_cues_batch_reads_bytes_or_paths_and_passes_columns_through(tmp_path):
    path = tmp_path / "a.png"
    data = _encode(chest_image(64, False, np.random.default_rng(0)))
    path.write_bytes(data)
    from_bytes = cues_batch(pd.DataFrame({"path": [str(path)], "bytes": [data], "label": [1]}))
    from_path = cues_batch(pd.DataFrame({"path": [str(path)], "label": [1]}))
    assert list(from_bytes.columns) == ["path", "label", *CUES, "error"]
    pd.testing.assert_frame_equal(from_bytes, from_path)


def test_planted_framing_is_found_and_warned_about(planted, tmp_path):
    table = compare_cues(planted)
    overall = table[table["split"] == "all"].set_index("cue")
    assert overall.loc["margin_area", "separation"] > 0.4
    assert overall.loc["margin_area", "median_normal"] > overall.loc["margin_area", "median_pneumonia"] + 0.2
    assert overall.loc["margin_area", "cohens_d"] < -1  # PNEUMONIA minus NORMAL
    assert list(table["split"].unique()) == ["all", "train"]
    assert overall["separation"].is_monotonic_decreasing or overall["separation"].isna().any()

    result = cue_only_auc(planted, n_boot=200)
    assert result["roc_auc"] > 0.9 and result["ci"][0] > 0.75 and result["warning"]
    # black film also compresses well, so bytes_per_pixel may rank with the framing cues
    assert {c["cue"] for c in result["top_cues"]} & set(GROUPS["framing"])
    lines = format_report(result)
    assert re.fullmatch(r"cue-only ROC-AUC \d\.\d{3} \(95% CI \d\.\d{3}-\d\.\d{3}\)", lines[0])
    assert lines[-1].startswith("WARNING: cues alone separate the classes")


def test_no_planted_cue_gives_chance_auc_and_no_warning(null):
    result = cue_only_auc(null, n_boot=200)
    assert 0.3 < result["roc_auc"] < 0.7 and result["ci"][0] < 0.6 and not result["warning"]
    assert not any(line.startswith("WARNING") for line in format_report(result))


def test_cue_only_auc_refuses_too_few_patients(planted):
    few = planted[planted["patient"].isin(["patient0", "patient1", "patient2"])]
    with pytest.raises(ValueError, match="patients per class"):
        cue_only_auc(few)


def test_write_report_files(planted, tmp_path):
    summary = write_report(planted, tmp_path, n_boot=100)
    for name in ("cues.parquet", "compare.csv", "cues.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["warning"] and set(saved["by_group"]) == {"file", "framing", "exposure", "texture"}
    assert saved["by_group"]["framing"]["roc_auc"] > 0.9
    cues = pd.read_parquet(tmp_path / "cues.parquet")
    assert cues["cue_score"].notna().all() and len(cues) == len(planted)
    assert format_report(summary)[0].startswith("cue-only ROC-AUC")


def test_cue_strata_separates_within_stratum_skill_from_cue_skill():
    # stratum 0: the model ranks perfectly; stratum 1: backwards; stratum 2: one class only
    df = pd.DataFrame({
        "cue_score": [0.1, 0.11, 0.12, 0.13, 0.5, 0.51, 0.52, 0.53, 0.9, 0.91, 0.92, 0.93],
        "label": [0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1],
        "prob": [0.1, 0.2, 0.8, 0.9, 0.9, 0.1, 0.8, 0.2, 0.95, 0.96, 0.97, 0.98],
    })
    out = cue_strata(df, n_bins=3)
    assert out["strata"]["roc_auc"].tolist()[:2] == [1.0, 0.0] and np.isnan(out["strata"]["roc_auc"].iloc[2])
    assert out["strata"]["n"].tolist() == [4, 4, 4]
    assert out["weighted_auc"] == pytest.approx(0.5)
    assert out["pairs_share"] == pytest.approx(8 / (4 * 8))
    assert out["overall_auc"] > 0.7  # the confident PNEUMONIA films carry the overall AUC


def test_a_framing_model_drops_to_chance_within_cue_strata(null):
    # a "model" that reads only the margins, on data where margins carry no class: within
    # strata of a cue score that also reads them, it should rank no better than chance
    rng = np.random.default_rng(0)
    df = null.assign(cue_score=null["margin_area"] + rng.normal(0, 1e-3, len(null)),
                     prob=null["margin_area"] + null["label"] * 0.0)
    out = cue_strata(df, n_bins=4)
    assert 0.25 < out["weighted_auc"] < 0.75


@pytest.mark.slow
def test_audit_command_on_a_dataset_folder(synthetic_root, tmp_path):
    """``cxr-ray audit`` measures every image with Ray Data and prints the cue-only line first."""
    from helpers import run_cli

    r = run_cli("audit", "--data", synthetic_root, "--out", tmp_path / "audit")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "audit")
    assert any(ln.startswith("[audit] cue-only ROC-AUC ") and "95% CI" in ln for ln in lines)
    for name in ("cues.parquet", "compare.csv", "cues.png", "summary.json"):
        assert (tmp_path / "audit" / name).is_file(), name
    cues = pd.read_parquet(tmp_path / "audit" / "cues.parquet")
    assert len(cues) == sum(1 for p in synthetic_root.rglob("*") if p.is_file()) and set(cues["split"]) >= {"train"}


def test_a_training_fitted_cue_model_scores_new_images(planted, tmp_path):
    from cxr_ray.analysis.cues import apply_cue_model, fit_cue_model

    fitted = fit_cue_model(planted)
    other = _dataset(tmp_path, planted=True, n_patients=20, seed=7)
    scores = apply_cue_model(fitted, other)
    assert scores.notna().all() and len(scores) == len(other)
    from cxr_ray.analysis.metrics import rank_auc

    assert rank_auc(other["label"].to_numpy(), scores.to_numpy()) > 0.9  # the planted framing, learned
    with pytest.raises(ValueError, match="both classes"):
        fit_cue_model(planted[planted["label"] == 1])


def test_model_within_cues_keeps_a_lung_reader_and_exposes_a_framing_reader(null, tmp_path):
    from cxr_ray.analysis.cues import format_strata, model_within_cues

    rng = np.random.default_rng(1)
    y = null["label"].to_numpy()
    reader = model_within_cues(null, y + rng.normal(0, 0.3, len(y)))  # ranks by the disease itself
    assert reader["weighted_auc"] > 0.9 and reader["model_auc"] > 0.9
    # framing agrees with the class on 85% of the films: a model that reads the margins looks
    # good overall, and falls to chance among films the cues cannot tell apart
    partly = _dataset(tmp_path, planted=True, n_patients=60, seed=3, agree=0.85)
    framing = model_within_cues(partly, -partly["margin_area"].to_numpy())
    assert framing["model_auc"] > 0.7 and abs(framing["weighted_auc"] - 0.5) < 0.2, framing
    # no cue separates the null set: strata are mixed, ~1/5 of all pairs fall within one
    assert 0.1 < reader["pairs_share"] < 0.3 and len(reader["strata"]) == 5 and reader["n"] == len(null)
    json.dumps(reader)  # JSON-ready for metrics.json
    assert format_strata(reader).startswith(f"model ROC-AUC {reader['model_auc']:.3f} overall")
    with pytest.raises(ValueError, match="patients per class"):
        model_within_cues(null.head(6), y[:6])
