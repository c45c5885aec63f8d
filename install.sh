#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
#
#   bash install.sh                 # CPU: torch==2.13.0 (a CPU build lies on disk here)
#   TORCH_SPEC="torch>=2.4" bash install.sh   # keep/choose your own torch (e.g. a CUDA build)
#   VENV=/path/to/venv bash install.sh
#
# The project itself asks for torch as a range, so a GPU user's CUDA torch is kept;
# only this dev/CI path pins the exact CPU build, because an open range would pull
# a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# pip's exit status is kept; only this machine's noisy local-index warnings are filtered out.
pip() { "$VENV/bin/python" -m pip "$@" --disable-pip-version-check -q 2> >(grep -v "^WARNING: Location" >&2); }

"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[dev]"
"$VENV/bin/python" -c "import factorllm_core, torch, transformers; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
