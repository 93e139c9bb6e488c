"""Evaluate a checkpoint: ``python experiments/evaluate.py --checkpoint CKPT --data ROOT --split test --out DIR``."""

import sys

from cxr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
