#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the CPU build of
# torch 2.13.0 installed first (any other torch requirement would pull a multi-GB CUDA build),
# then this package in editable mode. Usage: bash tools/install.sh [--dev] [--extras a,b]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="${extras:+$extras,}dev"; shift ;;
    --extras) extras="${extras:+$extras,}$2"; shift 2 ;;
    *) echo "install.sh: unknown argument '$1' (expected --dev or --extras a,b)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
tv=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
case "$tv" in
  2.13.0*) echo "install.sh: ready (.venv, torch $tv)" ;;
  *) echo "install.sh: torch is $tv, expected 2.13.0 (CPU build)" >&2; exit 1 ;;
esac
