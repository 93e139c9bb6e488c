"""Score image folders into Parquet: ``python experiments/score.py --checkpoint CKPT --input DIR --output OUT``.

Same as ``cxr-ray score`` (see ``cxr_ray/cli.py``).
"""

import sys
from pathlib import Path

# Importable from a plain checkout too (a Ray Jobs --working-dir upload, where it is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
