#!/usr/bin/env bash
# Installs adamerge and everything its demo and tests need, offline-friendly.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST for the mini benchmark ships as a Debian package (IDX files).
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; the mini benchmark will say what is missing" >&2
fi
python3 -m pip install -q -c constraints.txt -e ".[mini,dev]"
