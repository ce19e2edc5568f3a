#!/usr/bin/env bash
# Download, here, the wheels the GPU benchmark needs that a bare CUDA image lacks, into .whl/ at the
# repository root (git-ignored through .git/info/exclude), for machines that cannot reach a package
# index. infra/bench/gpu.sh installs whatever it finds there before it runs.
#
#     bash infra/bench/gpu_wheels.sh            # then carry .whl to the GPU machine with the checkout
#
# The list is what the model stages import (models/, the benchmarks) minus what the CUDA image this
# project is lent already holds (torch, torchvision, transformers, tokenizers, timm, numpy, pillow,
# psutil, safetensors, huggingface-hub, ...). Versions are the project venv's, so both machines run
# the same code.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
NEEDED=(open_clip_torch ftfy wcwidth xgrammar apache-tvm-ffi pydantic pydantic_core annotated-types
        typing-inspection structlog jsonschema jsonschema-specifications referencing rpds-py jsonpointer
        rfc3339-validator boto3 botocore s3transfer jmespath platformdirs truststore)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in "${NEEDED[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  if [[ -z "$version" ]]; then
    echo "gpu_wheels: $name is not installed in $PY's environment; run infra/scripts/bootstrap.sh first" >&2
    exit 2
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$name==$version"
done
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
