#!/usr/bin/env bash
# One-command set-up on a fresh CPU machine: a virtual environment with pinned torch, this package,
# an MPI runtime (mpich from PyPI) and the test tools. On a GPU cluster, install your CUDA torch and
# your site's MPI first, then `pip install -e .` alone.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 -e ".[dev]"
# The fastmri package is only an external reference for the tests (masks, metrics). Its own
# requirements pull a CUDA torch, so it is installed without them and its light deps are added by hand.
"$VENV/bin/pip" install -q --no-deps fastmri==0.3.0
"$VENV/bin/pip" install -q runstats scikit-image pandas pyyaml requests
"$VENV/bin/python" -c "import torch, improved_diffusion; print('ok: torch', torch.__version__)"
