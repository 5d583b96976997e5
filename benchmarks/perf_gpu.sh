#!/usr/bin/env bash
# Both throughput benchmarks on one GPU, outputs under OUT_DIR (see docs/performance.md):
#   MODEL=/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf DATA=qa_data/nq-open-20_total_documents.jsonl.gz \
#   OUT_DIR=$OUT bash benchmarks/perf_gpu.sh [train|eval|all]
# Knobs: TOTAL_DOC (20), MICRO ("1 2 4 8"), GC (1: gradient checkpointing, as train_nq.sh; 0: off;
# both: two runs), COMPILE (1: torch.compile every decoder layer of both models; COMPILE_MODE:
# default or max-autotune-no-cudagraphs), PROFILE (1: one
# extra step of "ours" profiled per micro-batch), COPIES (rows per teacher input, as
# --group_by_example gives: 5), ATTENTION ("padded", "packed" or "padded packed": rows without
# padding, as --packing_samples), EVAL_NUM (500), POSITIONS (0,9,19), BATCHES ("64 128"), COMPACT
# (both|on|off), PPC (positions per call, 1), DTYPE (auto|bfloat16|float32: fp32 tells bf16
# rounding apart from real score differences), TF32 (1: with DTYPE=float32, TF32 tensor-core
# matmuls), BASELINES (the baseline's batch sizes, "64"; more run it again and count the scores the
# batch shape alone changes), PEAK_TFLOPS.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL}" "${DATA:?set DATA}"
OUT_DIR=${OUT_DIR:-bench_out}
TOTAL_DOC=${TOTAL_DOC:-20}
MICRO=${MICRO:-"1 2 4 8"}
GC=${GC:-1}
EVAL_NUM=${EVAL_NUM:-500}
POSITIONS=${POSITIONS:-0,9,19}
BATCHES=${BATCHES:-"64 128"}
COMPACT=${COMPACT:-both}
WHAT=${1:-all}
TRAIN_EXTRA=()
if [ -n "${PEAK_TFLOPS:-}" ]; then TRAIN_EXTRA=(--peak_tflops "$PEAK_TFLOPS"); fi
if [ "${COMPILE:-0}" = 1 ]; then TRAIN_EXTRA+=(--compile --compile_mode "${COMPILE_MODE:-default}"); fi
if [ "${PROFILE:-0}" = 1 ]; then TRAIN_EXTRA+=(--profile); fi
if [ -n "${COPIES:-}" ]; then TRAIN_EXTRA+=(--copies_per_example "$COPIES"); fi
# shellcheck disable=SC2206  # ATTENTION is a list of words
if [ -n "${ATTENTION:-}" ]; then TRAIN_EXTRA+=(--attention $ATTENTION); fi
mkdir -p "$OUT_DIR"
gpu_ids=()  # the GPU the benchmarks run on, not every GPU of the machine
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpu_ids=(-i "${CUDA_VISIBLE_DEVICES%%,*}"); fi
nvidia-smi "${gpu_ids[@]}" --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt" || true

train() {  # $1: 1 with gradient checkpointing, 0 without
    local flag=() tag=nogc
    if [ "$1" = 1 ]; then flag=(--gradient_checkpointing); tag=gc; fi
    if [ "${COMPILE:-0}" = 1 ]; then tag=${tag}_compiled; fi
    if [ "${COMPILE_MODE:-default}" != default ]; then tag=${tag}_autotune; fi
    if [ -n "${COPIES:-}" ]; then tag=${tag}_copies$COPIES; fi
    if [ -n "${ATTENTION:-}" ]; then tag=${tag}_${ATTENTION// /_}; fi
    # shellcheck disable=SC2086  # MICRO is a list of numbers
    python benchmarks/bench_train.py --model "$MODEL" --data "$DATA" --total_doc "$TOTAL_DOC" --micro_batch_sizes $MICRO \
        "${flag[@]}" "${TRAIN_EXTRA[@]}" --output "$OUT_DIR/bench_train_$tag.json" 2>&1 | tee "$OUT_DIR/bench_train_$tag.log"
}

if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
    case "$GC" in
        both) train 1; train 0 ;;
        *) train "$GC" ;;
    esac
fi
if [ "$WHAT" = eval ] || [ "$WHAT" = all ]; then
    eval_tag=bench_eval
    if [ "${DTYPE:-auto}" != auto ]; then eval_tag=bench_eval_$DTYPE; fi  # a second run keeps the first's files
    eval_extra=()
    if [ "${TF32:-0}" = 1 ]; then eval_extra=(--tf32); eval_tag=${eval_tag}_tf32; fi
    # shellcheck disable=SC2086  # BATCHES and BASELINES are lists of numbers
    TQDM_DISABLE=1 python benchmarks/bench_eval.py --data "$DATA" --model "$MODEL" --total_doc "$TOTAL_DOC" \
        --sample_num "$EVAL_NUM" \
        --positions "$POSITIONS" --batch_size $BATCHES --compact "$COMPACT" --positions_per_call "${PPC:-1}" \
        --dtype "${DTYPE:-auto}" --baseline_batch_size ${BASELINES:-64} "${eval_extra[@]}" \
        --output "$OUT_DIR/$eval_tag.json" \
        2>&1 | tee "$OUT_DIR/$eval_tag.log"
fi
