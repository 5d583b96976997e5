#!/usr/bin/env bash
# Stage 4: accuracy at every gold-document position.
#   MODEL=checkpoints/nq/<run> DATASET=nq bash eval_data.sh
# Several models are overlaid in one table and plot: MODEL="base checkpoints/nq/<run>".
# DATASET picks the input file (override with INPUT_PATH): nq, kv, tqa or webq.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/lib/usage.sh
help_if_asked "$(basename "$0")" "[VAR=value ...] bash eval_data.sh [more eval_data.py flags; see python eval_data.py --help]" "$@"

MODEL=${MODEL:-SmolLM2-135M-Instruct}
DATASET=${DATASET:-nq}
TOTAL_DOCS=${TOTAL_DOCS:-20}
SAMPLE_NUM=${SAMPLE_NUM:-500}
POSITIONS=${POSITIONS:-all}
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}  # the visible GPUs, at least 1
BACKEND=${BACKEND:-auto}

case "$DATASET" in
    nq)   DEFAULT_INPUT="qa_data/nq-open-${TOTAL_DOCS}_total_documents.jsonl.gz" ;;
    kv)   DEFAULT_INPUT="kv_data/kv-retrieval-${KV_KEYS:-75}_keys.jsonl.gz" ;;
    tqa)  DEFAULT_INPUT="tqa_dev.jsonl.gz" ;;
    webq) DEFAULT_INPUT="webq_dev.jsonl.gz" ;;
    *)    echo "error: unknown DATASET '$DATASET' (nq, kv, tqa, webq; or set INPUT_PATH)" >&2; exit 2 ;;
esac
INPUT_PATH=${INPUT_PATH:-$DEFAULT_INPUT}  # from DATASET (and TOTAL_DOCS / KV_KEYS=75), as above

# shellcheck disable=SC2086  # MODEL may name several models
python eval_data.py \
    --input-path "$INPUT_PATH" \
    --dataset_name "$DATASET" \
    --model $MODEL \
    --output-path evaluate \
    --sample_num "$SAMPLE_NUM" \
    --positions "$POSITIONS" \
    --max-prompt-length 32768 \
    --max-new-tokens 100 \
    --num_gpus "$NUM_GPUS" \
    --total_doc "$TOTAL_DOCS" \
    --backend "$BACKEND" \
    "$@"
