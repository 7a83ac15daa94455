#!/usr/bin/env bash
# The whole accelerator check of issue 15 in one command, under 5 minutes on a lent GPU:
# bare forward, segment-corpus for each prior set, device-busy fraction, training samples/s
# (bf16, channels_last), peak device memory. Prints one JSON document (bench/gpu.py).
#
#   bench/gpu.sh                 # full size: 1,024 photos of 500 px, device auto (cuda when there)
#   bench/gpu.sh --quick         # tiny sizes: a smoke run of every part, on CPU too
#   make bench-gpu               # the same as bench/gpu.sh
#
# On a device machine without the project's virtual environment: Python packages missing
# there (webdataset and braceexpand for the training figure; the Prefect stack for the
# flow path, else the chunk engine runs without it) travel as wheels in .whl/ (see
# docs/benchmarks.md); they are installed into /tmp/site first, as the device README says.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON  # an interpreter chosen by the caller (the tests pass their own)
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
# JSON on stdout; logs (Prefect's included) on stderr
exec "$PY" bench/gpu.py "$@"
