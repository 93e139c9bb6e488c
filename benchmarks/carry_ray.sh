#!/usr/bin/env bash
# Wheels that bring Ray to a GPU machine with PyTorch but no Ray and no network (the lent H200:
# Python 3.12, x86-64), for benchmarks/gpu_check.py's Ray section. Run here, in the repository
# root; it fills .whl/ (ignored by git) and prints the two device calls that carry it.
#
# Ray's wheel (~79 MB) is larger than one transfer (64 MiB), so it travels in two parts: part a
# in the first call (copied to /tmp/w there; the machine stays warm ~30 s between calls), part b
# with the small wheels and the image sample in the second, which joins and installs them.
# Versions: this environment's, so the machine runs what the tests ran. What the machine already
# has (numpy, pandas, pyarrow, aiohttp, grpcio, msgpack, protobuf, click, filelock, requests,
# pyyaml, fsspec, scikit-learn, pillow, matplotlib, ...) is not carried.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu_sample/' .git/info/exclude 2>/dev/null || echo '/.gpu_sample/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl/dl .whl/a .whl/b
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=(ray jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types
      typing-inspection tensorboardX)
specs=()
for p in "${pkgs[@]}"; do specs+=("$p==$(version "$p")"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/dl "${specs[@]}"
ray_whl=$(ls .whl/dl/ray-*.whl)
split -b 45M "$ray_whl" .whl/a/ray.part.
[ "$(ls .whl/a | wc -l)" -eq 2 ] || { echo "Ray's wheel needs more than two 45 MB parts: adapt this script" >&2; exit 1; }
mv .whl/a/ray.part.ab .whl/b/
echo "$(basename "$ray_whl")" > .whl/b/ray.name
find .whl/dl -name '*.whl' ! -name 'ray-*' -exec mv {} .whl/b/ \;
rm -rf .whl/dl
[ -d .gpu_sample ] || python benchmarks/gpu_check.py --make-sample .gpu_sample
du -sh .whl/a .whl/b .gpu_sample
cat <<'EOF'
device call 1:  carry [".whl/a"]          command: mkdir -p /tmp/w && cp .whl/a/* /tmp/w/
device call 2, at once:  carry [".whl/b", ".gpu_sample"]  timeout_s 600, command:
  cat /tmp/w/ray.part.aa .whl/b/ray.part.ab > /tmp/w/$(cat .whl/b/ray.name) && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl .whl/b/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --images .gpu_sample --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
EOF
