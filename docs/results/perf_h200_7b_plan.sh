#!/usr/bin/env bash
# Issue 20 on one H200: 7B/8B shapes with random weights (pos2distill/model_shapes.py).
# Two device calls of at most ~9 minutes each, from /work/main (branch shape7b merged), e.g.
#   run(command="bash /dev/stdin A < ...")  -- simplest: copy this file into the repo tree first:
#     cp /work/notes/gpu_7b_plan.sh /work/main/.carry/gpu_7b_plan.sh
#   call 1: run(carry=[".whl", ".carry"], timeout_s=600, command="bash .carry/gpu_7b_plan.sh A")
#   call 2: run(carry=[".whl", ".carry"], timeout_s=600, command="bash .carry/gpu_7b_plan.sh B")
# .carry must hold (prepared on the CPU machine, ~25 MB; do NOT carry .carry/qwen or .carry/vllm,
# name the paths one by one if those folders are still there):
#   .carry/qwen_tokenizer/   Qwen's tokenizer (from the Qwen2.5-Coder-0.5B GGUF, convert_gguf tokenizer_only)
#   .carry/nq20.jsonl.gz     96 NQ questions, 20 documents (prepare_data.py nq --limit 96)
#   .carry/pairs/shape7b_20total_docs_filter_4random_1strengthen_64   stage-2 dataset (gold answer as oracle answer)
#   .carry/gpu_7b_plan.sh    this file
# Precondition: `bash /work/shared/tools/device-wheels.sh` has filled .whl in /work/main.
# Only ~8 files come back from $OUT: monitors stay under /root/work, their peaks go to the log.
PART=${1:-A}
set -o pipefail
mkdir -p /root/work "$OUT"
LOG="$OUT/log_$PART.txt"
T0=$(date +%s)
note() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TORCH_EXTENSIONS_DIR=/tmp/ext PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
free -g | tee -a "$LOG"; df -h /root | tail -1 | tee -a "$LOG"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

TOK=.carry/qwen_tokenizer
DATA=.carry/nq20.jsonl.gz
# monitor NAME: GPU memory.used (MiB, the device's own count: reserved + context) and host used
# bytes every second, to /root/work/mon_NAME.csv; stop_monitor prints the peaks into the log.
monitor() {
  ( while :; do
      echo "$(date +%s),$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1),$(free -b | awk '/Mem:/{print $3}')"
      sleep 1
    done ) > "/root/work/mon_$1.csv" 2>/dev/null &
  MON=$!
}
stop_monitor() {
  kill "$MON" 2>/dev/null; wait "$MON" 2>/dev/null
  awk -F, -v n="$1" '$2>g{g=$2} $3>h{h=$3} END{printf "   monitor %s: peak GPU memory.used %.1f GiB, peak host used %.1f GiB\n", n, g/1024, h/2^30}' \
    "/root/work/mon_$1.csv" | tee -a "$LOG"
}
# step NAME SECONDS CMD...: one step under a timeout (a failure or hang does not eat the budget)
step() {
  local name=$1 limit=$2; shift 2
  note "$name (limit $limit s): $*"
  monitor "$name"
  timeout -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v "^\s*$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  stop_monitor "$name"
  note "$name: exit $rc"
}

# bench_train on the trainer's engines: ZeRO-3, gradient checkpointing, packed rows, real NQ-20
# prompts (~2,400 tokens with Qwen's tokenizer; longer with the cut 32k vocabulary of Mistral).
BENCH=(python3 benchmarks/bench_train.py --engine deepspeed --zero_stage 3 --gradient_checkpointing
       --attention packed --data "$DATA" --total_doc 20 --tokenizer "$TOK" --warmup 1 --steps 3)

if [ "$PART" = A ]; then
  # A1 ~100 s (setup ~40 s incl. the FusedAdam JIT build ~30 s, 4 steps x 3 sizes): Qwen2.5-7B,
  # student on the GPU (16 B/param, ~113 GiB), teacher offloaded. The target: micro-batch 4.
  step qwen7b_ours 170 "${BENCH[@]}" --shape qwen2.5-7b --teacher_offload --variants ours \
      --micro_batch_sizes 1 2 4 --output "$OUT/bench_qwen7b_ours.json"
  # A2 ~70 s: the naive full-logit variant beside it (a separate process: an OOM inside a ZeRO-3
  # step can leave the engine unusable, and must not cost A1's figures)
  step qwen7b_naive 120 "${BENCH[@]}" --shape qwen2.5-7b --teacher_offload --variants naive \
      --micro_batch_sizes 1 4 --output "$OUT/bench_qwen7b_naive.json"
  # A3 ~100 s: Mistral-7B-v0.3 shape (vocabulary 32,768: Qwen's tokenizer cut to it), both variants
  step mistral7b 170 "${BENCH[@]}" --shape mistral-7b --teacher_offload --variants ours naive \
      --micro_batch_sizes 1 2 4 --output "$OUT/bench_mistral7b.json"
  # A4 ~60 s: the largest shape without any offload, for an MFU not diluted by host transfers
  # (3B: 16 B/param = 46 GiB + teacher 6 GiB on the GPU)
  step qwen3b_no_offload 120 "${BENCH[@]}" --shape qwen2.5-3b --variants ours naive \
      --micro_batch_sizes 1 2 4 8 --output "$OUT/bench_qwen3b.json"
  note "part A done"
  exit 0
fi

# ---------------------------------------------------------------- part B: the real path, stage 4
MODEL=/root/work/qwen2.5-7b
# B1 ~60-90 s: the 7B folder, built on the GPU (init ~5 s), bf16 safetensors ~15 GB written
if [ ! -f "$MODEL/config.json" ]; then
  step build_qwen7b 200 python3 -m pos2distill.model_shapes --shape qwen2.5-7b --out "$MODEL" \
      --dtype bfloat16 --tokenizer "$TOK" --device cuda
fi
du -sh "$MODEL" | tee -a "$LOG"
# B2 ~150-220 s: train_nq.sh at 7B, 3 optimizer steps (24 rows, global batch 8 = micro-batch 4 x
# accumulation 2, one GPU), ZeRO-3 + teacher offload + gradient checkpointing + packing (its
# defaults), saving the HF folder (~15 GB, ZeRO-3 gather per module into host memory), then
# --check_saved_logits: the folder reloaded in fp32 on the host and compared with the trained
# engine's logits (save_check.json). train_kd prints "timing:" per phase.
step train7b 330 env MODEL="$MODEL" MODEL_NAME=shape7b DATA_ROOT=.carry/pairs NUM=64 TRAIN_BATCH=8 MICRO_BATCH=4 \
    MAX_LEN=8192 SAVE_PATH=/root/work/save7b CKPT_PATH=/root/work/ckpt7b TENSORBOARD=/root/work/tb NUM_GPUS=1 \
    bash train_nq.sh --max_samples 24 --check_saved_logits
SAVED=$(ls -d /root/work/save7b/*/ 2>/dev/null | head -1)
[ -n "$SAVED" ] && cp "$SAVED/save_check.json" "$OUT/save_check.json" 2>/dev/null && du -sh "$SAVED" | tee -a "$LOG"
rm -rf /root/work/save7b  # disk: 64 GB; the builder's folder stays for stage 4
# B3 ~60-100 s: stage 4, HF backend, bf16, 2 positions x 96 prompts at 3 batch sizes (random
# weights never write a newline: every answer runs to --max_new_tokens 16)
[ "${ONLY_TRAIN:-0}" = 1 ] || step eval7b 200 python3 benchmarks/bench_eval.py --data "$DATA" --model "$MODEL" --total_doc 20 --sample_num 96 \
    --positions 0,19 --batch_size 32 64 96 --compact off --baseline_batch_size 32 --max_new_tokens 16 \
    --dtype bfloat16 --output "$OUT/bench_eval_qwen7b.json"
# B4 only if time is left (elapsed < 420 s): the student with --adam_offload at micro-batch 4.
# Expect trouble: DeepSpeedCPUAdam keeps fp32 master + moments + fp32 grads (~16 B/param,
# ~113 GiB pinned) on a 128 GB host; the monitor shows how far it got.
if [ "${ONLY_TRAIN:-0}" != 1 ] && [ $(( $(date +%s) - T0 )) -lt 420 ]; then
  step qwen7b_adam_offload 120 "${BENCH[@]}" --shape qwen2.5-7b --adam_offload --teacher_offload --variants ours \
      --micro_batch_sizes 4 --output "$OUT/bench_qwen7b_adam_offload.json"
fi
note "part B done"
