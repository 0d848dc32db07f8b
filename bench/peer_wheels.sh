#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the pure-Python wheels of the peers the GPU round's `bench` stage
# compares against (the lent GPU machine has no registry): inf-cl (its needs, numpy and triton, are
# there), open_clip (only its open_clip/loss.py is loaded, by path) and pytorch-metric-learning
# (imports torch only for its losses).  lightly is left out: it imports torchvision, which that
# machine lacks; its replica (lightly-formula) runs instead.
#
#   bash bench/peer_wheels.sh            -> .whl/*.whl (ignored by git; about 2 MB)
#
# Then name `.whl` in the device tool's `carry`: bench/gpu_round.sh installs whatever .whl holds
# into /tmp/site (--no-deps) and puts it on PYTHONPATH before its stages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  -d .whl "inf-cl==1.2.1" "open-clip-torch==3.3.0" "pytorch-metric-learning==2.9.0"
ls -la .whl
