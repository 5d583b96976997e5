#!/usr/bin/env bash
# Issue 19's four-way table for one model size: base, PINE, Pos2Distill, Pos2Distill + PINE on
# the same questions (last EVAL_NUM, gold at POSITIONS), paired comparisons against base, and
# PINE's cost against plain inference (benchmarks/bench_pine.py), on one GPU:
#   BASE=/root/models/Qwen2.5-Coder-0.5B-Instruct P2D=checkpoints/nq/<run> \
#   DATA=qa_data/nq-open-20_total_documents.jsonl.gz OUT_DIR=pine_0.5b bash benchmarks/pine_table.sh
# BASE and P2D must be Llama/Qwen2 safetensors folders (PINE runs on the hf backend).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASE:?set BASE}" "${P2D:?set P2D}" "${DATA:?set DATA}"
OUT_DIR=${OUT_DIR:-pine_out}
EVAL_NUM=${EVAL_NUM:-500}
POSITIONS=${POSITIONS:-0,5,10,15,19}
BATCH=${BATCH:-64}
PINE_BATCH=${PINE_BATCH:-16}
mkdir -p "$OUT_DIR"
common=(--input-path "$DATA" --dataset_name nq --output-path "$OUT_DIR/evaluate" --total_doc 20
        --sample_num "$EVAL_NUM" --positions "$POSITIONS" --backend hf --seed 42)
python eval_data.py "${common[@]}" --model "$BASE" "$P2D" --label base p2d --batch_size "$BATCH"
python eval_data.py "${common[@]}" --model "$BASE" "$P2D" --label pine p2d_pine --batch_size "$PINE_BATCH" \
    --inference pine
pred() { echo "$OUT_DIR/evaluate/nq/$1/predictions_20docs.jsonl.gz"; }
for run in pine p2d p2d_pine; do
    python compare_predictions.py "$(pred base)" "$(pred "$run")" --label base "$run" --output "$OUT_DIR/base_vs_$run"
done
python compare_predictions.py "$(pred p2d)" "$(pred p2d_pine)" --label p2d p2d_pine --output "$OUT_DIR/p2d_vs_p2d_pine"
python benchmarks/bench_pine.py --model "$BASE" --data "$DATA" --device cuda --dtype bfloat16 --sample_num 100 \
    --positions 0,19 --batch_size 8 32 --max_new_tokens 100 --output "$OUT_DIR/bench_pine.json"
