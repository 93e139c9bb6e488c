"""What each backbone costs to run: inference images/s of cxr_ray's models, each at its weights'
own size, against plain torchvision ResNet-50 (3-channel, fp32, 224 px) measured in the same run.

    python benchmarks/backbones.py [--batch 16] [--batches 4]

Random weights (no download); the cost of a forward pass does not depend on the weights' values.
Each row: the model as ``build_model`` makes it (one-channel stem, frozen BatchNorm, one-logit
head), channels_last, in fp32 and in bf16 where the CPU runs it fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_ray.config import ExperimentConfig  # noqa: E402
from cxr_ray.data.preprocessing import resolve_preprocessing  # noqa: E402
from cxr_ray.engine.precision import autocast, runs_bf16_fast  # noqa: E402
from cxr_ray.models.registry import build_model  # noqa: E402

BACKBONES = [("resnet50", "imagenet"), ("densenet121", "imagenet"), ("densenet121", "txrv:densenet121-res224-all"),
             ("resnet50", "txrv:resnet50-res512-all")]


@torch.no_grad()
def images_per_s(model: torch.nn.Module, x: torch.Tensor, batches: int, precision: str = "fp32") -> float:
    """Forward passes over ``batches`` copies of ``x`` (after one warm-up), images per second."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast(torch.device("cpu"), precision):
        model(x)
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
    return batches * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)
    from torchvision.models import resnet50

    base = images_per_s(resnet50(weights=None), torch.rand(args.batch, 3, 224, 224), args.batches)
    precisions = ["fp32", "bf16"] if runs_bf16_fast(torch.device("cpu")) else ["fp32"]
    print(f"plain torchvision ResNet-50, 3 channels, fp32, 224 px: {base:.1f} img/s "
          f"({torch.get_num_threads()} threads, batch {args.batch})")
    print("| model | weights | input | " + " | ".join(f"{q} img/s (x plain)" for q in precisions) + " |")
    print("|---|---|---|" + "---|" * len(precisions))
    for name, weights in BACKBONES:
        cfg = ExperimentConfig().replace(**{"model.name": name, "model.weights": weights})
        contract = resolve_preprocessing(cfg)
        model = build_model(ExperimentConfig().replace(**{"model.name": name, "model.weights": "none"}).model)
        x = torch.rand(args.batch, 1, contract.image_size, contract.image_size)
        rates = [images_per_s(model, x, args.batches, q) for q in precisions]
        print(f"| {name} | {weights} | {contract.describe()} | "
              + " | ".join(f"{r:.1f} ({r / base:.2f}x)" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
