"""Score image folders into Parquet: ``python experiments/score.py --checkpoint CKPT --input DIR --output OUT``.

Same as ``cxr-ray score`` (see ``cxr_ray/cli.py``).
"""

import sys

from cxr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
