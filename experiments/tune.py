"""The main job: Ray Tune search over ResNet-50 unfreeze depth, dropout and learning rate.

    python experiments/tune.py --demo                      # embedded default: synthetic data, local Ray
    python experiments/tune.py --data ROOT [--config FILE] [--set key=value ...]
    python experiments/tune.py --resume runs/<experiment>  # continue an interrupted experiment

Same as ``cxr-ray tune``; joins the cluster at --address / $RAY_ADDRESS when given. The last
line printed is the best checkpoint's path.
"""

import sys
from pathlib import Path

# Importable from a plain checkout too (a Ray Jobs --working-dir upload, where it is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
