#!/usr/bin/env bash
# Wheels the GPU machine (device tool) lacks, for its Python 3.12 on x86-64, into .whl/ (in .gitignore).
# It already has torch 2.11, transformers, accelerate, peft, safetensors, huggingface-hub and the usual
# scientific stack; nothing can be fetched there, so these travel with run(carry=[".whl"]) and are
# installed by scripts/gpu_measure.sh. wandb stays behind (runs there log with logging.wandb=false).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
# binary or universal wheels on the registry
"$PY" -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 \
    importlib_metadata==10.2.0 torchao==0.18.0 hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5
# source-only packages, built here as pure-Python wheels (DeepSpeed without its CUDA ops: JIT-free Adam
# is torch's, and ZeRO needs none of them)
"$PY" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
ls -1 .whl && du -sh .whl
