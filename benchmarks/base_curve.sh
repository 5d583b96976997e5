#!/usr/bin/env bash
# Stage 1 (--gold_doc auto) and stage 4 (all positions, last EVAL_NUM questions) for one
# model on one GPU, timing each stage. Used for docs/results.md:
#   MODEL=/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf DATA=qa_data/nq-open-20_total_documents.jsonl.gz \
#   OUT_DIR=$OUT bash benchmarks/base_curve.sh [stage1|stage4|all]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL}" "${DATA:?set DATA}"
OUT_DIR=${OUT_DIR:-bench_out}
TOTAL_DOC=${TOTAL_DOC:-20}
EVAL_NUM=${EVAL_NUM:-500}
BATCH=${BATCH:-128}
WHAT=${1:-all}
mkdir -p "$OUT_DIR"

if [ "$WHAT" = stage1 ] || [ "$WHAT" = all ]; then
    /usr/bin/time -f "stage1 wall %e s" python gen_advantageous_pos_for_R1.py --input-path "$DATA" --model "$MODEL" \
        --output-path raw_data --dataset_name nq --total_doc "$TOTAL_DOC" --gold_doc auto --probe_num 100 \
        --eval_holdout "$EVAL_NUM" --backend hf --batch_size "$BATCH" --seed 42
    cp raw_data/nq/*.summary.json "$OUT_DIR"/
fi
if [ "$WHAT" = stage4 ] || [ "$WHAT" = all ]; then
    /usr/bin/time -f "stage4 wall %e s" python eval_data.py --input-path "$DATA" --model "$MODEL" --dataset_name nq \
        --output-path evaluate --total_doc "$TOTAL_DOC" --sample_num "$EVAL_NUM" --positions all \
        --backend hf --batch_size "$BATCH" --seed 42
    cp evaluate/nq/positions_* "$OUT_DIR"/
    cp evaluate/nq/*/predictions_*.jsonl.gz "$OUT_DIR"/ 2>/dev/null || true
fi
