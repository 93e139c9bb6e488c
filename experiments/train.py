"""Train a model on Ray Train: ``python experiments/train.py --data ROOT [--config FILE] [--set k=v ...]``.

Same as ``cxr-ray train``; the last line printed is the best checkpoint's path.
"""

import sys
from pathlib import Path

# Importable from a plain checkout too (a Ray Jobs --working-dir upload, where it is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
