"""Evaluate a checkpoint: ``python experiments/evaluate.py --checkpoint CKPT --data ROOT --split test --out DIR``."""

import sys
from pathlib import Path

# Importable from a plain checkout too (a Ray Jobs --working-dir upload, where it is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
