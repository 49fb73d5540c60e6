#!/bin/sh
# Install PyTorch into the environment of the given pip, choosing the build for this machine:
#  - a working NVIDIA GPU (nvidia-smi answers): PyPI's default build, which bundles CUDA;
#  - otherwise a CPU-only build (no multi-GB CUDA download): a local "+cpu" wheel when pip's
#    find-links has one, else the "+cpu" wheel from PyTorch's CPU wheel index (its dependencies come
#    from pip's own index, whatever pip is configured to use).
# TORCH_VERSION overrides the version (default 2.13.0).
set -e
PIP="$1"
VERSION="${TORCH_VERSION:-2.13.0}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  exec $PIP install "torch==$VERSION"
fi
if $PIP install --no-index --no-deps "torch==$VERSION+cpu" >/dev/null 2>&1; then
  exec $PIP install "torch==$VERSION+cpu"
fi
exec $PIP install "torch==$VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
