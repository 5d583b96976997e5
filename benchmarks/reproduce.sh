#!/usr/bin/env bash
# The reproduce experiment (docs/results.md) in steps that each fit one 10-minute GPU call.
# Outputs under OUT_DIR: stage 1's answers and summary, NAME.train_stats.json / NAME.kd_args.json /
# NAME.gpu_mem.csv per training, NAME_DATASET_summary_Kdocs.{json,csv,md} and
# NAME_DATASET_predictions_Kdocs.jsonl.gz per evaluation.
# Every step writes its figures under OUT_DIR and leaves its files in the working tree, so
# the next step (a later call on the same warm machine) picks them up:
#
#   export MODEL=/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf DATA=qa_data/nq-open-20_total_documents.jsonl.gz
#   OUT_DIR=$OUT bash benchmarks/reproduce.sh stage1          # advantageous-position answers
#   OUT_DIR=$OUT bash benchmarks/reproduce.sh eval base        # base model, EVAL_POSITIONS
#   OUT_DIR=$OUT LR=1e-5 bash benchmarks/reproduce.sh train p2d             # stage 2 + stage 3
#   OUT_DIR=$OUT bash benchmarks/reproduce.sh eval p2d         # the checkpoint, EVAL_POSITIONS
#   OUT_DIR=$OUT KD_COEF=1,0,0,0 bash benchmarks/reproduce.sh train kl       # ablation variants
#   OUT_DIR=$OUT STRENGTHEN=0 bash benchmarks/reproduce.sh train no_anchor
#   OUT_DIR=$OUT DATASET_NAME=kv DATA=kv_data/kv-retrieval-75_keys.jsonl.gz TOTAL_DOC=75 \
#       CKPT_DATASET=nq bash benchmarks/reproduce.sh eval p2d     # the NQ-trained checkpoint on KV
#
# Knobs (environment):
# - data: DATASET_NAME (nq; kv, tqa, ...: names the folders), TOTAL_DOC (20), SEED (42);
# - stage 1: GOLD_DOC (auto: probed; or an index), LIMIT (the first N questions only; empty:
#   all but the held-out EVAL_NUM);
# - stage 2: NUM (400), K (4), STRENGTHEN (1), FILTER (1; 0: the first NUM examples whatever their
#   answer, create_datasets.py --no_filter: a control for how much comes from correct-only targets);
# - stage 3: KD_COEF (0,0,0,1), PERSERVE (1.0), LR (1e-5), EPOCHS (1), TRAIN_BATCH (32),
#   NUM_GPUS (the number of ids in CUDA_VISIBLE_DEVICES, else 1), MICRO_BATCH (TRAIN_BATCH /
#   NUM_GPUS: the adaptive loss's group statistics then cover the whole global batch, as 8 GPUs x
#   4 did), MAX_LEN (8192); train_nq.sh's own knobs
#   (GRAD_CKPT, ZERO_STAGE, ...) pass through the environment;
# - stage 4: EVAL_NUM (500), EVAL_POSITIONS (all), EVAL_BATCH (256), POSITIONS_PER_CALL (4), EVAL_GPUS (1;
#   N > 1: N data-parallel workers, one model per GPU, each answering a share of every call),
#   EVAL_COMPACT (1: --compact_finished) — docs/performance.md: a decoding step costs tens of ms
#   almost whatever the batch, so larger mixed batches and compaction help; CKPT_DATASET
#   (the dataset a checkpoint was trained on, for cross-task evaluation);
# - WORK_DIR: where raw_data/, data/, checkpoints/ and evaluate/ go (default: the repository).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${MODEL:?set MODEL}" "${DATA:?set DATA}"
[ -f "$DATA" ] || { echo "error: DATA=$DATA does not exist (prepare_data.py nq writes it)" >&2; exit 2; }
# Paths given relative to where the script was called from stay valid after the cd below.
DATA=$(realpath "$DATA")
if [ -e "$MODEL" ]; then MODEL=$(realpath -s "$MODEL"); fi  # -s: a symlinked .gguf keeps its name
OUT_DIR=${OUT_DIR:-bench_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
WORK=${WORK_DIR:-$ROOT}  # raw_data/, data/, checkpoints/, evaluate/ go here
mkdir -p "$WORK"
WORK=$(realpath "$WORK")  # absolute: train_nq.sh runs from the repository root
cd "$WORK"
# The name stage 1 puts in its file name (pos2distill.models.model_name: GGUF quant suffixes dropped).
MODEL_NAME=${MODEL_NAME:-$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -c \
    'import sys; from pos2distill.models import model_name; print(model_name(sys.argv[1]))' "$MODEL")}
DS=${DATASET_NAME:-nq}
CKPT_DATASET=${CKPT_DATASET:-$DS}  # eval: the dataset the checkpoint NAME was trained on
TOTAL_DOC=${TOTAL_DOC:-20}
GOLD_DOC=${GOLD_DOC:-auto}
LIMIT=${LIMIT:-}
NUM=${NUM:-400}
K=${K:-4}
STRENGTHEN=${STRENGTHEN:-1}
FILTER=${FILTER:-1}
EVAL_NUM=${EVAL_NUM:-500}
EVAL_POSITIONS=${EVAL_POSITIONS:-all}
EVAL_BATCH=${EVAL_BATCH:-256}
POSITIONS_PER_CALL=${POSITIONS_PER_CALL:-4}
EVAL_COMPACT=${EVAL_COMPACT:-1}
SEED=${SEED:-42}
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # default: every GPU the caller made visible, else one
    NUM_GPUS=${NUM_GPUS:-$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)}
else
    NUM_GPUS=${NUM_GPUS:-1}
fi
TRAIN_BATCH=${TRAIN_BATCH:-32}
MICRO_BATCH=${MICRO_BATCH:-$((TRAIN_BATCH / NUM_GPUS))}  # micro-batch x GPUs = global batch (header)
STEP=${1:?usage: reproduce.sh stage1 | train NAME | eval NAME}

checkpoint() {  # the one saved Hugging Face folder of run $2 trained on dataset $1
    local found
    found=$(find "checkpoints/$1/$2" -mindepth 1 -maxdepth 1 -type d -name '*_kd*' ! -name '*.partial' 2>/dev/null)
    if [ -z "$found" ] || [ "$(printf '%s\n' "$found" | wc -l)" -ne 1 ]; then
        echo "error: expected one finished checkpoint under checkpoints/$1/$2, found: ${found:-none}" >&2
        exit 2
    fi
    printf '%s\n' "$found"
}

case "$STEP" in
stage1)
    limit=()
    if [ -n "$LIMIT" ]; then limit=(--limit "$LIMIT"); fi
    began=$SECONDS
    python "$ROOT/gen_advantageous_pos_for_R1.py" --input-path "$DATA" \
        --model "$MODEL" --output-path raw_data --dataset_name "$DS" --total_doc "$TOTAL_DOC" --gold_doc "$GOLD_DOC" \
        --eval_holdout "$EVAL_NUM" --backend hf --batch_size 128 --seed "$SEED" "${limit[@]}"
    echo "stage1 wall $((SECONDS - began)) s"
    # the answers too (a few MB): carried to a later machine, they let it skip stage 1
    # (raw_data/DATASET/ under WORK_DIR, then SKIP_STAGE1=1 in reproduce_lanes.sh)
    cp raw_data/"$DS"/*.summary.json raw_data/"$DS"/*.jsonl.gz "$OUT_DIR"/
    ;;
train)
    name=${2:?usage: reproduce.sh train NAME}
    no_filter=()
    if [ "$FILTER" != 1 ]; then no_filter=(--no_filter); fi
    python "$ROOT/create_datasets.py" "${no_filter[@]}" --model_name "$MODEL_NAME" --dataset_name "$DS" --total_doc "$TOTAL_DOC" \
        --position_sample_num "$K" --strengthen "$STRENGTHEN" --example_num "$NUM" --seed "$SEED" \
        --raw_data_dir "$WORK/raw_data" --output_dir "$WORK/data" --overwrite  # variants of other seeds share the name
    rm -rf "checkpoints/$DS/$name"
    : > "$OUT_DIR/$name.gpu_mem.csv"
    if command -v nvidia-smi > /dev/null; then
        # The poller must not outlive a failed step: it would hold the caller's pipes open.
        # only this run's GPUs: nvidia-smi ignores CUDA_VISIBLE_DEVICES and lists every GPU of the machine
        gpu_ids=()
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpu_ids=(-i "$CUDA_VISIBLE_DEVICES"); fi
        nvidia-smi "${gpu_ids[@]}" --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
            > "$OUT_DIR/$name.gpu_mem.csv" 2>/dev/null &
        poller=$!
        trap 'kill "$poller" 2>/dev/null || true' EXIT
    fi
    start=$(date +%s.%N)
    # The teacher stays on the GPU (no offload).
    MODEL="$MODEL" MODEL_NAME="$MODEL_NAME" TOTAL_DOCS="$TOTAL_DOC" K="$K" STRENGTHEN="$STRENGTHEN" NUM="$NUM" FILTER="$FILTER" \
        LR="${LR:-1e-5}" EPOCHS="${EPOCHS:-1}" KD_COEF="${KD_COEF:-0.0,0.0,0.0,1.0}" PERSERVE="${PERSERVE:-1.0}" \
        TRAIN_BATCH="$TRAIN_BATCH" MICRO_BATCH="$MICRO_BATCH" MAX_LEN="${MAX_LEN:-8192}" \
        TEACHER_OFFLOAD=0 NUM_GPUS="$NUM_GPUS" DATA_ROOT="$WORK/data" SAVE_PATH="$WORK/checkpoints/$DS/$name" DATASET_NAME="$DS" \
        CKPT_PATH="$WORK/checkpoints/$DS/$name/_deepspeed_ckpt" TENSORBOARD="$OUT_DIR/tb" \
        bash "$ROOT/train_nq.sh" --seed "$SEED" --overwrite 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "it/s\]$\|s/it\]$"
    end=$(date +%s.%N)
    ckpt=$(checkpoint "$DS" "$name")
    cp "$ckpt/kd_args.json" "$OUT_DIR/$name.kd_args.json"
    python - "$OUT_DIR/$name" "$start" "$end" <<'PY'
import json, sys
prefix, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
mem = [int(x) for x in open(f"{prefix}.gpu_mem.csv").read().split() if x.strip().isdigit()]
stats = {"train_wall_s": round(end - start, 1), "peak_gpu_mem_mib": max(mem) if mem else None}
json.dump(stats, open(f"{prefix}.train_stats.json", "w"), indent=1)
print(stats)
PY
    ;;
eval)
    name=${2:?usage: reproduce.sh eval NAME}
    model=$MODEL
    extra=()  # more eval_data.py flags
    if [ "$name" != base ]; then
        model=$(checkpoint "$CKPT_DATASET" "$name")
        # the checkpoint folder is named after its stage-2 dataset: warn about trained-on questions
        extra=(--train_dataset "data/$(basename "$model" | sed 's/_kd[0-9.]*_lm.*//')")
    fi
    if [ "$EVAL_COMPACT" = 1 ]; then extra+=(--compact_finished); fi
    began=$SECONDS
    python "$ROOT/eval_data.py" --input-path "$DATA" --model "$model" --label "$name" \
        --dataset_name "$DS" --output-path evaluate --total_doc "$TOTAL_DOC" --sample_num "$EVAL_NUM" \
        --positions "$EVAL_POSITIONS" --positions_per_call "$POSITIONS_PER_CALL" --backend hf \
        --batch_size "$EVAL_BATCH" --num_gpus "${EVAL_GPUS:-1}" --seed "$SEED" "${extra[@]}" \
        2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "prompt/s\]$\|s/prompt\]$"
    echo "eval wall $((SECONDS - began)) s"
    # predictions too: compare_predictions.py needs them for paired tests (base vs trained, repeats)
    for f in evaluate/"$DS"/"$name"/summary_"${TOTAL_DOC}"docs.* evaluate/"$DS"/"$name"/predictions_"${TOTAL_DOC}"docs.jsonl.gz; do
        cp "$f" "$OUT_DIR/${name}_${DS}_$(basename "$f")"
    done
    ;;
*)
    echo "error: unknown step $STEP (stage1 | train NAME | eval NAME)" >&2
    exit 2
    ;;
esac
