#!/usr/bin/env bash
# Stage 1: answers with the gold document at the advantageous position.
# Every variable can be overridden from the environment, e.g.
#   MODEL=Qwen/Qwen2.5-7B-Instruct INPUT_PATH=qa_data/nq-open-20_total_documents.jsonl.gz bash gen_advantageous_pos_for_R1.sh
set -euo pipefail
cd "$(dirname "$0")"
. scripts/lib/usage.sh
help_if_asked "$(basename "$0")" "[VAR=value ...] bash gen_advantageous_pos_for_R1.sh [more gen_advantageous_pos_for_R1.py flags; see python gen_advantageous_pos_for_R1.py --help]" "$@"

MODEL=${MODEL:-SmolLM2-135M-Instruct}
INPUT_PATH=${INPUT_PATH:-qa_data/nq-open-20_total_documents.jsonl.gz}
TOTAL_DOC=${TOTAL_DOC:-20}
GOLD_DOC=${GOLD_DOC:-auto}          # index, first, last or auto (measured on a held-out slice)
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}  # the visible GPUs, at least 1
BACKEND=${BACKEND:-auto}

python gen_advantageous_pos_for_R1.py \
    --input-path "$INPUT_PATH" \
    --model "$MODEL" \
    --output-path raw_data \
    --max-prompt-length 32768 \
    --max-new-tokens 100 \
    --num_gpus "$NUM_GPUS" \
    --total_doc "$TOTAL_DOC" \
    --gold_doc "$GOLD_DOC" \
    --temperature 0.7 \
    --top_p 0.95 \
    --seed 42 \
    --backend "$BACKEND" \
    "$@"
