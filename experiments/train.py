"""Train a model on Ray Train: ``python experiments/train.py --data ROOT [--config FILE] [--set k=v ...]``.

Same as ``cxr-ray train``; the last line printed is the best checkpoint's path.
"""

import sys

from cxr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
