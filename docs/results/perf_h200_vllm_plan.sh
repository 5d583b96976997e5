#!/usr/bin/env bash
# Issue 22 (vLLM stages 1 and 4) and issue 20 (train_nq.sh at the 7B shape) on one H200.
# Run from the repo root through the device tool, after the chunk calls that put into /root/models:
#   Qwen2.5-Coder-0.5B-Instruct.gguf(.partial), Qwen2.5-Coder-1.5B-Instruct.gguf(.partial),
#   vllm-wheels.tar(.partial) (../shared/tools/vllm-device: 118 wheels incl. device-wheels.sh's),
#   small/ (a copy of .carry/small: qwen_tokenizer/, nq20.jsonl.gz (96 questions), pairs/) and
#   qa_data/nq-open-20_total_documents.jsonl.gz (prepare_data.py nq --total_doc 20; 2654 questions).
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh A")   vLLM: stage 4, stage 1 x 3
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh B")   HF: stage 1 x 2, stage 4, baseline
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh C")   train_nq.sh at the 7B shape
#     (C alone on a fresh machine: carry=[".whl", ".carry/small"], .whl from ../shared/tools/device-wheels.sh)
# Results come back as a few tarballs and logs under $OUT (at most 8 files).
PART=${1:-A}
set -o pipefail
M=/root/models W=/root/work
mkdir -p "$W" "$OUT"
LOG="$OUT/log_$PART.txt"
T0=$(date +%s)
note() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: one step under a timeout, its output in the log
  local name=$1 limit=$2; shift 2
  note "$name (limit $limit s): $*"
  local began=$(date +%s)
  timeout -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v "^\s*$" | grep --line-buffered -v "it/s\]$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  note "$name: exit $rc, wall $(( $(date +%s) - began )) s"
  return "$rc"
}
finish() {  # finish NAME SHA256: a chunked file made whole and checked
  [ -f "$M/$1" ] || mv "$M/$1.partial" "$M/$1"
  echo "$2  $M/$1" | sha256sum -c - | tee -a "$LOG"
}

# ------------------------------------------------------------------ set-up (each part; idempotent)
if [ ! -f /tmp/site/.installed ] && [ "$PART" = C ] && [ -d .whl ]; then  # C alone on a fresh machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
  [ -d "$M/small" ] || { mkdir -p "$M" && cp -r .carry/small "$M/small"; }
fi
if [ ! -f /tmp/site/.installed ]; then
  finish vllm-wheels.tar 663c9f89a0f748295d9082f3c04484ea874b36316f8c8d147e12c666ada55464 || exit 1
  mkdir -p /root/wh && tar -xf "$M/vllm-wheels.tar" -C /root/wh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /root/wh/wheels/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PATH=/tmp/site/bin:$PATH \
  VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 TORCH_EXTENSIONS_DIR=/tmp/ext
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$LOG"
DATA=$M/qa_data/nq-open-20_total_documents.jsonl.gz
M05=$W/Qwen2.5-Coder-0.5B-Instruct M15=$W/Qwen2.5-Coder-1.5B-Instruct
# CONVERT GGUF FOLDER: the dequantized safetensors folder (transformers + gguf)
CONVERT=(python3 -c "import os, sys; from pos2distill.models import convert_gguf; os.path.exists(sys.argv[2] + '/config.json') or convert_gguf(sys.argv[1], sys.argv[2])")
POS5=0,5,10,15,19
chosen() { ls "$1"/nq/*_20docs_*.jsonl.gz 2>/dev/null | head -1 | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/'; }
content_sha() { zcat "$1" | sha256sum | cut -c1-16; }

if [ "$PART" = A ]; then
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
  ls -l "$M"/*.gguf | tee -a "$LOG"
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  # the 1.5B conversion (87 s of CPU) runs beside the 0.5B GPU work
  ( "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" > "$W/convert15.log" 2>&1; echo "exit $?" >> "$W/convert15.log" ) &
  CONV=$!
  # A1: stage 4 on vLLM, 500 questions x the paper's 5 positions, one engine for all positions
  step s4_vllm_05 260 python3 eval_data.py --input-path "$DATA" --model "$M05" --backend vllm --sample_num 500 \
      --positions "$POS5" --output-path "$W/eval_vllm" --seed 42
  # A2: stage 1 on vLLM with the probe (300 held-out questions x 20 positions), then 1200 sampled answers
  step s1_vllm_05 200 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  P05=$(chosen "$W/raw_vllm"); note "0.5B probe chose position $P05"
  # A3: the same sampling again (same seed, the chosen position given): the same records?
  step s1_vllm_05_rerun 150 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC="$P05" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm_rerun"
  A=$(content_sha "$W/raw_vllm/nq/Qwen2.5-Coder-0.5B-Instruct_20docs_$P05.jsonl.gz")
  B=$(content_sha "$W/raw_vllm_rerun/nq/Qwen2.5-Coder-0.5B-Instruct_20docs_$P05.jsonl.gz")
  note "rerun content sha256: first $A, rerun $B ($([ "$A" = "$B" ] && echo identical || echo DIFFERENT))"
  wait "$CONV"; cat "$W/convert15.log" | tail -3 | tee -a "$LOG"
  # A4: stage 1 on vLLM for the 1.5B model
  step s1_vllm_15 240 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  note "1.5B probe chose position $(ls $W/raw_vllm/nq/Qwen2.5-Coder-1.5B*_20docs_*.jsonl.gz | sed -E 's/.*_20docs_([0-9]+).*/\1/')"
  tar -czf "$OUT/eval_vllm.tgz" -C "$W" eval_vllm
  tar -czf "$OUT/raw_vllm_summaries.tgz" -C "$W" $(cd "$W" && ls raw_vllm/nq/*.summary.json raw_vllm_rerun/nq/*.summary.json)
  # the answers alone (the documents are the input's): example id, position, answer, correct
  for f in "$W"/raw_vllm/nq/*.jsonl.gz "$W"/raw_vllm_rerun/nq/*.jsonl.gz; do
    zcat "$f" | python3 -c "import sys, json; [print(json.dumps({k: r[k] for k in ('example_id', 'gold_idx', 'oracle_answer', 'oracle_correct')})) for r in map(json.loads, sys.stdin)]" \
      > "$W/$(basename "$(dirname "$(dirname "$f")")")__$(basename "$f" .gz)"
  done
  tar -czf "$OUT/stage1_answers_vllm.tgz" -C "$W" $(cd "$W" && ls raw_vllm*__*.jsonl)
  note "part A done"
  exit 0
fi

if [ "$PART" = B ]; then
  P05=$(chosen "$W/raw_vllm"); P15=$(ls $W/raw_vllm/nq/Qwen2.5-Coder-1.5B*_20docs_*.jsonl.gz | sed -E 's/.*_20docs_([0-9]+).*/\1/')
  note "positions from part A: 0.5B $P05, 1.5B $P15"
  # B1: stage 1 on the HF backend at the positions vLLM's probe chose, both models side by side on
  # the GPU (their accuracy is compared, not their speed)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step s1_hf_15 300 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC="${P15:-0}" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf" &
  S1=$!
  step s1_hf_05 300 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC="${P05:-0}" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf"
  wait "$S1"
  # B2: stage 4 on our HF backend at its best bf16 settings (docs/performance.md), the same prompts as A1
  step s4_hf_05 200 python3 eval_data.py --input-path "$DATA" --model "$M05" --backend hf --sample_num 500 \
      --positions "$POS5" --batch_size 256 --compact_finished --output-path "$W/eval_hf" --seed 42
  # B3: the plain batched baseline on the same prompts
  step baseline_05 260 python3 benchmarks/bench_eval.py --data "$DATA" --model "$M05" --total_doc 20 --sample_num 500 \
      --positions "$POS5" --baseline_only --baseline_batch_size 64 --dtype auto --output "$OUT/bench_eval_baseline.json"
  tar -czf "$OUT/eval_hf.tgz" -C "$W" eval_hf
  for f in "$W"/raw_hf/nq/*.jsonl.gz; do
    zcat "$f" | python3 -c "import sys, json; [print(json.dumps({k: r[k] for k in ('example_id', 'gold_idx', 'oracle_answer', 'oracle_correct')})) for r in map(json.loads, sys.stdin)]" \
      > "$W/raw_hf__$(basename "$f" .gz)"
  done
  tar -czf "$OUT/stage1_hf.tgz" -C "$W" $(cd "$W" && ls raw_hf__*.jsonl raw_hf/nq/*.summary.json)
  note "part B done"
  exit 0
fi

if [ "$PART" = C ]; then
  TOK=$M/small/qwen_tokenizer MODEL=$W/qwen2.5-7b
  [ -f "$MODEL/config.json" ] || step build_qwen7b 200 python3 -m pos2distill.model_shapes --shape qwen2.5-7b --out "$MODEL" \
      --dtype bfloat16 --tokenizer "$TOK" --device cuda
  # train_nq.sh at 7B: 3 optimizer steps, the HF folder saved, then --check_saved_logits, which now
  # also compares every saved tensor with the engine's gathered parameter bit for bit
  step train7b 360 env MODEL="$MODEL" MODEL_NAME=shape7b DATA_ROOT=$M/small/pairs NUM=64 TRAIN_BATCH=8 MICRO_BATCH=4 \
      MAX_LEN=8192 SAVE_PATH=$W/save7b CKPT_PATH=$W/ckpt7b TENSORBOARD=$W/tb NUM_GPUS=1 \
      bash train_nq.sh --max_samples 24 --check_saved_logits
  SAVED=$(ls -d $W/save7b/*/ 2>/dev/null | head -1)
  [ -n "$SAVED" ] && cp "$SAVED/save_check.json" "$OUT/save_check_7b.json" 2>/dev/null
  note "part C done"
  exit 0
fi
echo "unknown part $PART" >&2; exit 2
