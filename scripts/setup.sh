#!/usr/bin/env bash
# Create .venv with editflow and its test dependencies for the CPU.
# torch is installed first and pinned (the cached CPU wheel); torchvision is never
# installed: its only build for this torch is a CUDA one and breaks transformers' Qwen processor.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[test]"
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
  echo "torchvision is installed in .venv: remove it (it breaks Qwen2.5-VL's processor on CPU)" >&2
  exit 1
fi
echo "editflow installed in .venv"
