"""The GPU check runs on CPU with toy sizes, through the same code paths, so it cannot rot."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT  # noqa: E402


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(synthetic_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--images", str(synthetic_root), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== cxr_ray GPU check: cpu" in r.stdout and "scoring limit:" in r.stdout
    result = json.loads(out.read_text())
    assert [t["depth"] for t in result["train"]] == [0, 2, 4]
    assert all(t["images_per_s"] > 0 for t in result["train"])
    assert result["inference"]["eager_images_per_s"] > 0 and result["decode"]["images_per_s"] > 0
    assert result["bf16_vs_fp32_max_abs_diff"] == 0.0  # CPU runs fp32 both times
    ray = result["ray"]  # Ray Train and cxr-ray score on this machine, decode=cpu and gpu (run on the CPU)
    assert ray["train"]["images_per_s"] > 0 and ray["train"]["use_gpu"] == "false"
    assert ray["score"]["decode_cpu_images_per_s"] > 0 and ray["score"]["decode_gpu_images_per_s"] > 0
    assert "cxr-ray score, decode=gpu" in r.stdout
    assert ray["decode_parity"]["mean_abs_pixel_diff"] < 0.5 and ray["decode_parity"]["max_abs_pixel_diff"] <= 3
    low, high = result["fp32_probability_range"]
    assert low < 0.2 and high > 0.8  # the calibrated head spreads p, so a bf16 difference could show
