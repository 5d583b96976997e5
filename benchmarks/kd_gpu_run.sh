#!/usr/bin/env bash
# Stage 2 + stage 3 (train_nq.sh, one GPU) + stage 4 on the checkpoint, with wall time,
# tokens/s and peak GPU memory (nvidia-smi polled every 200 ms). Expects the stage-1 file
# of MODEL_NAME under raw_data/nq (benchmarks/base_curve.sh writes it). Used for docs/results.md:
#   MODEL=/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf MODEL_NAME=Qwen2.5-Coder-0.5B-Instruct \
#   DATA=qa_data/nq-open-20_total_documents.jsonl.gz OUT_DIR=$OUT bash benchmarks/kd_gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL}" "${MODEL_NAME:?set MODEL_NAME}" "${DATA:?set DATA}"
OUT_DIR=${OUT_DIR:-bench_out}
EVAL_POSITIONS=${EVAL_POSITIONS:-all}
export LR=${LR:-1e-5} KD_COEF=${KD_COEF:-0.0,0.0,0.0,1.0} NUM=${NUM:-400} MAX_LEN=${MAX_LEN:-4096}
mkdir -p "$OUT_DIR"

python create_datasets.py --model_name "$MODEL_NAME" --dataset_name nq --total_doc 20 \
    --position_sample_num 4 --strengthen 1 --example_num "$NUM"

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT_DIR/gpu_mem.csv" &
poller=$!
start=$(date +%s.%N)
MODEL="$MODEL" MODEL_NAME="$MODEL_NAME" NUM_GPUS=1 TENSORBOARD="$OUT_DIR/tb" bash train_nq.sh \
    --max_samples 500000 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$"
end=$(date +%s.%N)
kill $poller
python - "$OUT_DIR" "$start" "$end" <<'PY'
import json, sys
out, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
mem = [int(x) for x in open(f"{out}/gpu_mem.csv").read().split() if x.strip().isdigit()]
stats = {"train_wall_s": round(end - start, 1), "peak_gpu_mem_mib": max(mem) if mem else None}
json.dump(stats, open(f"{out}/train_stats.json", "w"), indent=1)
print(stats)
PY
ckpt=$(ls -d checkpoints/nq/*_kd* | head -1)
cp "$ckpt/kd_args.json" "$OUT_DIR/" 2>/dev/null || true
python eval_data.py --input-path "$DATA" --model "$ckpt" --label trained --dataset_name nq --output-path evaluate \
    --total_doc 20 --sample_num 500 --positions "$EVAL_POSITIONS" --backend hf --batch_size 128 --seed 42 \
    --train_dataset "data/${MODEL_NAME}_20total_docs_filter_4random_1strengthen_${NUM}"
cp evaluate/nq/trained/summary_20docs.* "$OUT_DIR/"
