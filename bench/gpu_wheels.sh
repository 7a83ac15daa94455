#!/usr/bin/env bash
# Fetch the wheels bench/gpu.sh installs on a GPU machine without the project's environment
# (bench/gpu-wheels.txt: Prefect's stack, webdataset, braceexpand) into .whl/, for CPython 3.12 on
# x86-64 Linux. Needs the package index; the GPU machine does not. About 40 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl -r bench/gpu-wheels.txt
ls .whl | wc -l
