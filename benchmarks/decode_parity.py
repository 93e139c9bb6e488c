"""score.decode=gpu's parity with the CPU contract on real images at archive size.

    python benchmarks/decode_parity.py --checkpoint CKPT [--device cpu|cuda] [--n 400]

The shared real images upscaled to 2000x1600 grayscale JPEGs are decoded twice to the
checkpoint's model input: by the CPU path the read + decode tasks run (PIL draft decode, then
the antialiased resizes: ``images.load_images``) and by the device path the actors run with
``score.decode=gpu`` (``device_decode.decode_batch``: full decode by torchvision, nvJPEG on
CUDA, the draft scale as an s x s mean, the same resizes). Prints the mean and largest absolute
pixel difference, and the largest probability difference of the checkpoint's Predictor (fp32)
on the two, plus the decode rate of each path here (the device path in batches of 64).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import real_root, upscaled_copy  # noqa: E402

from cxr_ray.checkpoint import load_checkpoint  # noqa: E402
from cxr_ray.data.decode import device_jpeg  # noqa: E402
from cxr_ray.data.device_decode import decode_batch  # noqa: E402
from cxr_ray.data.images import load_images  # noqa: E402
from cxr_ray.inference.predictor import Predictor  # noqa: E402


def parity(checkpoint: str, files: list[str], device: str, batch: int = 64) -> dict[str, float]:
    """The figures of the module doc for ``files`` (JPEGs) on ``device``."""
    ckpt = load_checkpoint(checkpoint)
    c = ckpt.preprocessing
    start = time.perf_counter()
    cpu = load_images(files, c.cache_size, c.image_size)["image"]
    cpu_s = time.perf_counter() - start
    blobs = [Path(f).read_bytes() for f in files]
    sizes = [device_jpeg(b, f) for b, f in zip(blobs, files)]
    assert all(sizes), "every file must be a JPEG the device path takes"
    decode_batch(blobs[:2], sizes[:2], c.cache_size, c.image_size, device)  # warm-up (CUDA context, nvJPEG)
    start = time.perf_counter()
    dev = [im for i in range(0, len(blobs), batch)
           for im in decode_batch(blobs[i:i + batch], sizes[i:i + batch], c.cache_size, c.image_size, device)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dev_s = time.perf_counter() - start
    assert all(d is not None for d in dev)
    dev_np = torch.stack(dev).cpu().numpy()
    diff = np.abs(dev_np.astype(np.int16) - cpu)
    predictor = Predictor(ckpt, device, "fp32")
    p_cpu = np.concatenate([predictor.probabilities(cpu[i:i + batch]) for i in range(0, len(cpu), batch)])
    p_dev = np.concatenate([predictor.probabilities(dev_np[i:i + batch]) for i in range(0, len(cpu), batch)])
    dp = np.abs(p_cpu.astype(np.float64) - p_dev)
    flips = int(((p_cpu >= ckpt.threshold) != (p_dev >= ckpt.threshold)).sum())
    return {"images": len(files), "mean_abs_pixel_diff": float(diff.mean()), "max_abs_pixel_diff": int(diff.max()),
            "max_abs_prob_diff": float(dp.max()), "mean_abs_prob_diff": float(dp.mean()), "decision_flips": flips,
            "cpu_path_images_per_s": len(files) / cpu_s, "device_path_images_per_s": len(files) / dev_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a trained checkpoint (its contract and model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=400, help="real images, upscaled to 2000x1600 (400)")
    args = ap.parse_args()
    folder = upscaled_copy(real_root(), Path(tempfile.gettempdir()) / f"cxr_ray_parity_2000x1600_{args.n}",
                           limit=args.n)
    files = sorted(str(p) for p in folder.glob("*/*/*.jpeg"))
    r = parity(args.checkpoint, files, args.device)
    print(f"{r['images']} real images at 2000x1600, device {args.device}: pixels mean |d| "
          f"{r['mean_abs_pixel_diff']:.3f}, max {r['max_abs_pixel_diff']}; probabilities max |d| "
          f"{r['max_abs_prob_diff']:.2e}, mean {r['mean_abs_prob_diff']:.2e}, decisions flipped {r['decision_flips']}; "
          f"decode {r['cpu_path_images_per_s']:.0f} img/s (CPU path, 1 process) vs "
          f"{r['device_path_images_per_s']:.0f} (device path)")


if __name__ == "__main__":
    main()
