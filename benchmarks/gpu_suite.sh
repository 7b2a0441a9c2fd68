#!/usr/bin/env bash
# The GPU suite (issue #12), one prepared script: bash benchmarks/gpu_suite.sh [--tiny] [gpu_suite.py options]
#
# 1. Installs what is missing from wheels in benchmarks/wheels/ (pip --no-index --no-deps, into a
#    folder put on PYTHONPATH; nothing is installed when everything imports already).
# 2. Puts this checkout on PYTHONPATH (no `pip install -e .` needed: a copy of the tree is enough).
# 3. Runs benchmarks/gpu_suite.py "$@": every measurement, then the `gpu`-marked tests, into one
#    JSON record: $OUT/gpu_suite-<machine>.json where $OUT is set, else benchmarks/results/.
#    `--tiny` is the CPU check CI runs (tests/test_gpu_suite.py); see gpu_suite.py --help.
#
# Preparing the wheels (the GPU machine has no network). It has torch, torchvision, lightning,
# torchmetrics, timm, huggingface_hub, safetensors, regex, tqdm, PyYAML and pytest, but not:
#   required  open_clip_torch (needs ftfy, regex, timm, huggingface_hub, safetensors, torchvision, tqdm),
#             ftfy (needs wcwidth), wcwidth;
#   optional  jsonargparse, docstring-parser, typeshed-client (Lightning's CLI signatures; nothing
#             the suite runs needs them, they are installed when their wheels are there).
# wandb is not needed: nothing the suite or the gpu tests run imports it (timm's optional import
# of it is skipped when it is absent). On a machine with network, in the repo's root:
#
#   bash benchmarks/gpu_suite.sh --download-wheels
#
# which runs (pure-Python wheels but wcwidth's; the GPU machine's python3 is CPython 3.12, x86-64):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d benchmarks/wheels open_clip_torch ftfy wcwidth jsonargparse docstring-parser typeshed-client
#
# The wheels (about 3.5 MB) are git-ignored: take them along to the GPU machine (the device tool:
# carry ["benchmarks/wheels"]).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_SUITE_WHEELS:-$ROOT/benchmarks/wheels}"
SITE="${GPU_SUITE_SITE:-${TMPDIR:-/tmp}/adamerge-gpu-suite-site}"
PY="${PYTHON:-python3}"
REQUIRED="open_clip:open_clip_torch ftfy:ftfy wcwidth:wcwidth"
OPTIONAL="jsonargparse:jsonargparse docstring_parser:docstring-parser typeshed_client:typeshed-client"

if [ "${1:-}" = "--download-wheels" ]; then
  mkdir -p "$WHEELS"
  packages=$(for pair in $REQUIRED $OPTIONAL; do printf '%s ' "${pair#*:}"; done)
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $packages
  exit 0
fi

# The packages (pip names) whose module is not found, required ones first.
missing() {
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(p.split(":", 1)[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split(":", 1)[0]) is None))
EOF
}

wheel_of() {  # the wheel of pip package $1 in $WHEELS, if any (wheel names use '_' for '-')
  local norm
  norm=$(echo "$1" | tr 'A-Z-' 'a-z_')
  find "$WHEELS" -maxdepth 1 -iname "${norm}-*.whl" 2>/dev/null | sort | tail -n 1
}

# shellcheck disable=SC2086
need_required=$(missing $REQUIRED)
# shellcheck disable=SC2086
need_optional=$(missing $OPTIONAL)
install=()
lacking=()
for pkg in $need_required; do
  whl=$(wheel_of "$pkg")
  if [ -n "$whl" ]; then install+=("$whl"); else lacking+=("$pkg"); fi
done
if [ "${#lacking[@]}" -gt 0 ]; then
  echo "gpu_suite.sh: missing ${lacking[*]}, with no wheel in $WHEELS." >&2
  echo "  Prepare the wheels on a machine with network: bash benchmarks/gpu_suite.sh --download-wheels" >&2
  echo "  (see the comment at the top of benchmarks/gpu_suite.sh), then bring benchmarks/wheels along." >&2
  exit 2
fi
for pkg in $need_optional; do
  whl=$(wheel_of "$pkg")
  if [ -n "$whl" ]; then install+=("$whl"); else echo "gpu_suite.sh: optional $pkg not installed (no wheel)"; fi
done
if [ "${#install[@]}" -gt 0 ]; then
  echo "gpu_suite.sh: installing ${install[*]##*/} into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${install[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import open_clip" || { echo "gpu_suite.sh: open_clip still fails to import (see above)" >&2; exit 2; }
else
  echo "gpu_suite.sh: open_clip and its needs are there; nothing to install"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_suite.py "$@"
