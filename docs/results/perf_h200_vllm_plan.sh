#!/usr/bin/env bash
# Issue 22 (vLLM stages 1 and 4) and issue 20 (train_nq.sh at the 7B shape) on one H200.
# Run from the repo root through the device tool, after the chunk calls that put into /root/models:
#   Qwen2.5-Coder-0.5B-Instruct.gguf(.partial), Qwen2.5-Coder-1.5B-Instruct.gguf(.partial),
#   vllm-wheels.tar(.partial) (../shared/tools/vllm-device: 118 wheels incl. device-wheels.sh's),
#   data/nq-open-20_total_documents.jsonl.gz (prepare_data.py nq --oracle ../shared/data/nq-open-oracle.jsonl.gz
#   --total_doc 20; 2654 questions) and, for C, small/ (qwen_tokenizer/, nq20.jsonl.gz, pairs/).
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh A")   0.5B: stage 4 vLLM and HF,
#                                       stage 1 vLLM (probe; then the chosen position twice: same seed, same file?)
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh B")   1.5B stage 1 vLLM; the plain
#                                       baseline's speed; stage 1 on HF for both models
#   run(timeout_s=600, command="bash docs/results/perf_h200_vllm_plan.sh C")   train_nq.sh at the 7B shape
#     (C alone on a fresh machine: carry=[".whl", ".carry/small"], .whl from ../shared/tools/device-wheels.sh)
# Next session (2026-12-04's lessons): `bash docs/results/perf_h200_carry_prep.sh` builds .carry (~2 min); the chunk calls (12 wheel, 9 + 19 model, data and small/ with the last
# wheel chunk), then in the SAME block run(timeout_s=600) "BUDGET_S=560 bash docs/results/perf_h200_vllm_plan.sh N1"
# and "... N2" (~260 s of chunk calls + ~90 s start + 2 x 560 s: ~1,470 of the 1,800 s), then, with what is
# left, run(timeout_s=LEFT-20) "BUDGET_S=LEFT-40 bash docs/results/perf_h200_vllm_plan.sh N3".
# Results come back as a few tarballs and logs under $OUT (at most 8 files).
PART=${1:-A}
set -o pipefail
M=/root/models W=/root/work
mkdir -p "$W" "$OUT"
LOG="$OUT/log_$PART.txt"
T0=$(date +%s)
note() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
DEADLINE=$(( T0 + ${BUDGET_S:-560} ))  # the call's 600 s, less the time the tarballs need
# Detached (2026-12-04, fifth session): the last chunk call runs START, which starts part R (then T) in
# the background from a copy of the repo, with its outputs in /root/out and BUDGET_S for the whole run;
# later calls WAIT (POLL_S seconds, then the log's tail) and the last COLLECTs /root/out into $OUT.
case $PART in
  START)
    mkdir -p /root/models /root/out && cp -r .carry/data /root/models/ && rm -rf /root/repo && mkdir /root/repo \
      && cp -r $(ls -A | grep -v '^.carry$') /root/repo/ || exit 1
    cd /root/repo && OUT=/root/out NO_CACHES=1 setsid nohup bash -c 'bash docs/results/perf_h200_vllm_plan.sh "$1"; \
      echo "driver exit $?"; touch /root/out/DONE' _ "${NEXT:-R}" > /root/out/driver.txt 2>&1 < /dev/null &
    sleep 20; tail -5 /root/out/driver.txt; exit 0 ;;
  WAIT)
    for _ in $(seq "${POLL_S:-500}"); do [ -f /root/out/DONE ] && break; sleep 1; done
    tail -n "${TAIL:-40}" /root/out/log_*.txt; ls -la /root/out; exit 0 ;;
  COLLECT)
    for _ in $(seq "${POLL_S:-500}"); do [ -f /root/out/DONE ] && break; sleep 1; done
    tail -n 60 /root/out/log_*.txt; cp /root/out/* "$OUT/" 2>/dev/null; ls -la "$OUT"; exit 0 ;;
esac
step() {  # step NAME SECONDS CMD...: one step under a timeout (cut to the deadline), its output in the log
  local name=$1 limit=$2 left=$(( DEADLINE - $(date +%s) )); shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -gt 5 ] || { note "$name: skipped, no time left"; return 124; }
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
  finish vllm-wheels.tar ${WHEELS_SHA:-cbdd5c486ee178f5a10d582cc09f326e4a22543b575ef79ea1b4e5453aabfad1} || exit 1  # perf_h200_carry_prep.sh's tar (the wheels pip resolves change: the prep prints the sha)
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
DATA=$M/data/nq-open-20_total_documents.jsonl.gz
M05=$W/Qwen2.5-Coder-0.5B-Instruct M15=$W/Qwen2.5-Coder-1.5B-Instruct
# CONVERT GGUF FOLDER: the dequantized safetensors folder (transformers + gguf)
CONVERT=(python3 -c "import os, sys; from pos2distill.models import convert_gguf; os.path.exists(sys.argv[2] + '/config.json') or convert_gguf(sys.argv[1], sys.argv[2])")
POS5=0,5,10,15,19
chosen() { ls "$1"/nq/*_20docs_*.jsonl.gz 2>/dev/null | head -1 | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/'; }
content_sha() { zcat "$1" | sha256sum | cut -c1-16; }

answers() {  # answers FILE.jsonl.gz OUT.jsonl: the records without their documents
  zcat "$1" | python3 -c "import sys, json; [print(json.dumps({k: r[k] for k in ('example_id', 'gold_idx', 'oracle_answer', 'oracle_correct')})) for r in map(json.loads, sys.stdin)]" > "$2"
}
differ() {  # differ A B: how many answers of two stage-1 files differ
  python3 - "$1" "$2" <<'PY' | tee -a "$LOG"
import gzip, json, sys
a, b = ({r["example_id"]: r["oracle_answer"] for r in map(json.loads, gzip.open(f, "rt"))} for f in sys.argv[1:])
print(f"   {sum(a[k] != b.get(k) for k in a)} of {len(a)} answers differ")
PY
}
s1file() { ls "$1"/nq/"$2"_20docs_*.jsonl.gz 2>/dev/null | head -1; }

same_seed_pair() {  # same_seed_pair POSITION LIMIT: 0.5B stage 1 on vLLM twice with one seed; same file?
  for run in fixed_a fixed_b; do
    step s1_vllm_05_$run "$2" env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC="$1" \
        bash gen_advantageous_pos_for_R1.sh --limit 1200 --output-path "$W/raw_vllm_$run"
  done
  FA=$(s1file "$W/raw_vllm_fixed_a" Qwen2.5-Coder-0.5B-Instruct); FB=$(s1file "$W/raw_vllm_fixed_b" Qwen2.5-Coder-0.5B-Instruct)
  note "content sha256: fixed_a $(content_sha "$FA"), fixed_b $(content_sha "$FB")"
  note "fixed_a vs fixed_b:"; differ "$FA" "$FB"
}
s4_hf_05() {  # s4_hf_05 LIMIT: stage 4 on our HF backend at its best bf16 settings, the prompts of s4_vllm_05
  step s4_hf_05 "$1" python3 eval_data.py --input-path "$DATA" --model "$M05" --backend hf --sample_num 500 \
      --positions "$POS5" --batch_size 256 --compact_finished --output-path "$W/eval_hf" --seed 42
}
fixed_answers() {  # fixed_answers RUN...: each run's 0.5B stage-1 answers, without documents, as $W/RUN__FILE.jsonl
  for run in "$@"; do
    f=$(s1file "$W/$run" Qwen2.5-Coder-0.5B-Instruct); [ -n "$f" ] && answers "$f" "$W/${run}__$(basename "$f" .gz)"
  done
}

shape_save_check() {  # shape_save_check SHAPE BUILD_LIMIT TRAIN_LIMIT: train_nq.sh at a random-weight shape for
  # 3 optimizer steps, the HF folder saved, then --check_saved_logits (every saved tensor against the engine's
  # gathered parameter, bit for bit); its save_check.json to $OUT/save_check_SHAPE.json
  local shape=$1 model=$W/$1 saved
  if [ ! -f "$model/config.json" ]; then
    rm -rf "$model"
    step build_$shape "$2" python3 -m pos2distill.model_shapes --shape "$shape" --out "$model" --dtype bfloat16 \
        --tokenizer "$M/small/qwen_tokenizer" --device cuda
  fi
  step train_$shape "$3" env MODEL="$model" MODEL_NAME=shape7b DATA_ROOT=$M/small/pairs NUM=64 TRAIN_BATCH=8 MICRO_BATCH=4 \
      MAX_LEN=8192 SAVE_PATH=$W/save7b CKPT_PATH=$W/ckpt7b TENSORBOARD=$W/tb NUM_GPUS=1 \
      bash train_nq.sh --max_samples 24 --check_saved_logits
  saved=$(ls -d $W/save7b/*/ 2>/dev/null | head -1)
  [ -n "$saved" ] && cp "$saved/save_check.json" "$OUT/save_check_$shape.json" 2>/dev/null
  rm -rf "$W/save7b" "$W/ckpt7b"
}

vllm_05_steps() {  # stage 4 on vLLM and HF, and stage 1 on vLLM three times, for the 0.5B model
  # A1: stage 4 on vLLM, 500 questions x the paper's 5 positions, one engine for all positions
  step s4_vllm_05 240 python3 eval_data.py --input-path "$DATA" --model "$M05" --backend vllm --sample_num 500 \
      --positions "$POS5" --output-path "$W/eval_vllm" --seed 42
  # A2: stage 1 on vLLM with the probe (300 held-out questions x 20 positions), then 1200 sampled answers;
  # then the chosen position given twice more: one flow against the other, and the same flow twice
  step s1_vllm_05_auto 200 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  F0=$(s1file "$W/raw_vllm" Qwen2.5-Coder-0.5B-Instruct); P05=$(echo "$F0" | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/')
  note "0.5B probe chose position ${P05:-?}"
  same_seed_pair "${P05:-0}" 90
  note "content sha256: auto $(content_sha "$F0")"; note "auto vs fixed_a:"; differ "$F0" "$FA"
  # A3: stage 4 on our HF backend at its best bf16 settings (docs/performance.md), the same prompts as A1
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  s4_hf_05 170
  fixed_answers raw_vllm raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_A.tgz" -C "$W" $(cd "$W" && ls -d eval_vllm eval_hf raw_vllm*__*.jsonl raw_vllm*/nq/*.summary.json 2>/dev/null)
  tail -3 "$W/convert15.log" | tee -a "$LOG"
}

if [ "$PART" = A ]; then
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  # the 1.5B conversion (87 s of CPU) runs beside the 0.5B GPU work
  ( "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" > "$W/convert15.log" 2>&1; echo "exit $?" >> "$W/convert15.log" ) &
  vllm_05_steps
  note "part A done"
  exit 0
fi

if [ "$PART" = A2 ]; then
  # The first A (2026-12-03) stopped after the engine start in both vLLM steps, with no output: where?
  # 20 prompts under a stack dump at 70 s; if they do not finish, the reset of the prefix cache (new
  # in that run) is taken out of this machine's copy for the rest of the call, and the log says so.
  # (Ran 2026-12-03: the dump came during the fresh machine's engine warm-up, the reset was taken
  # out, and the rest ran; the reset is no longer in the backend, so the sed now changes nothing.)
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  step diag 80 python3 -c "import faulthandler, runpy, sys; faulthandler.dump_traceback_later(70); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
      eval_data.py --input-path "$DATA" --model "$M05" --backend vllm --sample_num 20 --positions 0 --output-path "$W/eval_diag" --seed 42 \
    || { sed -i '/^    llm.reset_prefix_cache()$/d' pos2distill/generation/vllm_backend.py; note "reset_prefix_cache() removed: $(grep -c reset_prefix_cache pos2distill/generation/vllm_backend.py) mentions left"; }
  rm -rf "$W/eval_vllm" "$W/raw_vllm" "$W/raw_vllm_fixed_a" "$W/raw_vllm_fixed_b"
  vllm_05_steps
  note "part A2 done"
  exit 0
fi

if [ "$PART" = B ]; then
  F0=$(s1file "$W/raw_vllm" Qwen2.5-Coder-0.5B-Instruct); P05=$(echo "$F0" | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/')
  # B1: stage 1 on vLLM for the 1.5B model, probe included
  step s1_vllm_15_auto 230 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  F1=$(s1file "$W/raw_vllm" Qwen2.5-Coder-1.5B-Instruct); P15=$(echo "$F1" | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/')
  note "positions: 0.5B ${P05:-?}, 1.5B ${P15:-?}"
  # B2: the plain batched baseline alone on the GPU (its speed; 200 of the 500 questions)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step baseline_05 110 python3 benchmarks/bench_eval.py --data "$DATA" --model "$M05" --total_doc 20 --sample_num 200 \
      --positions "$POS5" --baseline_only --baseline_batch_size 64 --dtype auto --output "$W/bench_eval_baseline.json"
  # B3: stage 1 on the HF backend at the positions vLLM's probe chose, both models side by side
  # (their accuracy is compared, not their speed)
  step s1_hf_15 200 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC="${P15:-0}" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf" &
  S1=$!
  step s1_hf_05 200 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC="${P05:-0}" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf"
  wait "$S1"
  for f in "$F1" $(ls "$W"/raw_hf/nq/*.jsonl.gz 2>/dev/null); do
    [ -n "$f" ] && answers "$f" "$W/$(basename "$(dirname "$(dirname "$f")")")__$(basename "$f" .gz)"
  done
  tar -czf "$OUT/results_B.tgz" -C "$W" $(cd "$W" && ls -d bench_eval_baseline.json raw_*__*.jsonl raw_vllm/nq/*.summary.json raw_hf/nq/*.summary.json 2>/dev/null)
  note "part B done"
  exit 0
fi

if [ "$PART" = C ]; then
  SHAPE=${SHAPE:-qwen2.5-7b}  # 2026-12-04: SHAPE=qwen2.5-3b, the shape that fitted the session's last 313 s
  shape_save_check "$SHAPE" 200 360
  note "part C done"
  exit 0
fi
# ------------------------------------------------------------------ 2026-12-04: what A2 and B left, in two calls
# P1: the 0.5B model's same-seed rerun of stage 1 (two runs of one flow), stage 4 on the HF backend on the
# prompts of A2's vLLM run, the plain baseline; the 1.5B conversion and the 7B shape's build run on the
# CPU meanwhile (the measured HF steps wait for them).
if [ "$PART" = P1 ]; then
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
  ( "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" > "$W/convert15.log" 2>&1; echo "exit $?" >> "$W/convert15.log" ) &
  BG1=$!
  ( nice -n 10 python3 -m pos2distill.model_shapes --shape qwen2.5-7b --out "$W/qwen2.5-7b" --dtype bfloat16 \
      --tokenizer "$M/small/qwen_tokenizer" --device cpu > "$W/build7b.log" 2>&1; echo "exit $?" >> "$W/build7b.log" ) &
  BG2=$!
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  same_seed_pair 0 200
  wait "$BG1" "$BG2"; tail -2 "$W/convert15.log" "$W/build7b.log" | tee -a "$LOG"
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  s4_hf_05 200
  step baseline_05 100 python3 benchmarks/bench_eval.py --data "$DATA" --model "$M05" --total_doc 20 --sample_num 100 \
      --positions "$POS5" --baseline_only --baseline_batch_size 64 --dtype auto --output "$W/bench_eval_baseline.json"
  fixed_answers raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_P1.tgz" -C "$W" $(cd "$W" && ls -d eval_hf bench_eval_baseline.json raw_vllm*__*.jsonl raw_vllm*/nq/*.summary.json 2>/dev/null)
  note "part P1 done"
  exit 0
fi

# P2 (right after P1, same machine): train_nq.sh at the 7B shape with the bit-for-bit save check (issue 20),
# then stage 1 on vLLM for the 1.5B model with the probe, then stage 1 on HF for both models (accuracy).
if [ "$PART" = P2 ]; then
  shape_save_check qwen2.5-7b 120 280  # ran as step train7b (log perf_h200_vllm_P2.log)
  step s1_vllm_15_auto 230 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  F1=$(s1file "$W/raw_vllm" Qwen2.5-Coder-1.5B-Instruct); P15=$(echo "$F1" | sed -E 's/.*_20docs_([0-9]+)\.jsonl\.gz/\1/')
  note "1.5B probe chose position ${P15:-?}"
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step s1_hf_15 200 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC="${P15:-0}" bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf" &
  S1=$!
  step s1_hf_05 200 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC=0 bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --batch_size 128 --output-path "$W/raw_hf"
  wait "$S1"
  for f in "$F1" $(ls "$W"/raw_hf/nq/*.jsonl.gz 2>/dev/null); do
    [ -n "$f" ] && answers "$f" "$W/$(basename "$(dirname "$(dirname "$f")")")__$(basename "$f" .gz)"
  done
  tar -czf "$OUT/results_P2.tgz" -C "$W" $(cd "$W" && ls -d raw_*__*.jsonl raw_vllm/nq/*.summary.json raw_hf/nq/*.summary.json 2>/dev/null)
  note "part P2 done"
  exit 0
fi
# P3: the same-seed rerun P1 ran out of time for (nothing else on the machine: CPU jobs beside a vLLM
# engine start stalled it in A and P1), then stage 4 on HF on A2's prompts. After the chunk calls of P1.
if [ "$PART" = P3 ]; then
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  rm -rf "$W/raw_vllm_fixed_a" "$W/raw_vllm_fixed_b"
  same_seed_pair 0 110
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  s4_hf_05 300
  fixed_answers raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_P3.tgz" -C "$W" $(cd "$W" && ls -d eval_hf raw_vllm_fixed*__*.jsonl raw_vllm_fixed*/nq/*.summary.json 2>/dev/null)
  note "part P3 done"
  exit 0
fi
# ------------------------------------------------------------------ next session: N1, N2 (after the chunk calls)
# Lessons of 2026-12-04: nothing CPU-heavy beside a vLLM engine start; each HF job alone on the GPU.
# The caches the first engine start fills (Triton, FlashInfer, torch.compile: ~100 s on a fresh machine)
# come back as $OUT/cache_*.tgz; carried in as .carry/vcache/ (a chunk call: `tar -xzf` into /root).
save_caches() {  # each cache folder that compresses under 15 MiB, as $OUT/cache_NAME.tgz
  for d in .triton/cache .cache/flashinfer .cache/vllm; do
    [ -d "/root/$d" ] || continue
    local name=cache_$(echo "$d" | tr -c 'a-z\n' '_' | sed 's/^_*//').tgz
    timeout 20 tar -czf "/tmp/$name" -C /root "$d" 2>/dev/null || { note "cache /root/$d: not saved (tar took over 20 s)"; continue; }
    local size=$(stat -c%s "/tmp/$name")
    note "cache /root/$d: $(du -sh "/root/$d" | cut -f1), compressed $size bytes"
    [ "$size" -lt 15728640 ] && mv "/tmp/$name" "$OUT/"
  done
}
# 2026-12-04 (second session): A2's stage-4 predictions never came back, so N1 runs vLLM's stage 4 again
# and N2 the HF backend on the same prompts; the plain baseline writes its per-prompt scores (bench_eval's
# "scores"), so all three pair up on the last 100 questions.
if [ "$PART" = N1 ]; then  # 0.5B: stage 1 twice with one seed (same file?), stage 4 on vLLM (500 x 5)
  for f in .carry/vcache/*.tgz; do [ -f "$f" ] && tar -xzf "$f" -C /root && note "cache restored: $f"; done
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
  ( "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" > "$W/convert15.log" 2>&1; echo "exit $?" >> "$W/convert15.log" ) &
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  wait; tail -1 "$W/convert15.log" | tee -a "$LOG"  # the CPU is free before any engine starts
  same_seed_pair 0 200
  step s4_vllm_05 150 python3 eval_data.py --input-path "$DATA" --model "$M05" --backend vllm --sample_num 500 \
      --positions "$POS5" --output-path "$W/eval_vllm" --seed 42
  fixed_answers raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_N1.tgz" -C "$W" $(cd "$W" && ls -d eval_vllm raw_vllm_fixed*__*.jsonl raw_vllm_fixed*/nq/*.summary.json 2>/dev/null)
  save_caches
  note "part N1 done"
  exit 0
fi
if [ "$PART" = N2 ]; then  # right after N1: the 7B save check, stage 4 on HF (N1's prompts), stage 1 on HF (0.5B)
  shape_save_check qwen2.5-7b 90 250
  rm -rf "$W/qwen2.5-7b"  # 15 GB of disk
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  s4_hf_05 200
  step s1_hf_05 120 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC=0 \
      bash gen_advantageous_pos_for_R1.sh --limit 600 --batch_size 128 --output-path "$W/raw_hf"
  for f in $(ls "$W"/raw_hf/nq/*.jsonl.gz 2>/dev/null); do answers "$f" "$W/raw_hf__$(basename "$f" .gz)"; done
  tar -czf "$OUT/results_N2.tgz" -C "$W" $(cd "$W" && ls -d eval_hf raw_hf__*.jsonl raw_hf/nq/*.summary.json 2>/dev/null)
  note "part N2 done"
  exit 0
fi
if [ "$PART" = N3 ]; then  # with what is left: stage 1 on HF (1.5B), issue 16's second probe sample, the baseline
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step s1_hf_15 130 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=hf GOLD_DOC=0 \
      bash gen_advantageous_pos_for_R1.sh --limit 600 --batch_size 128 --output-path "$W/raw_hf15"
  for f in $(ls "$W"/raw_hf15/nq/*.jsonl.gz 2>/dev/null); do answers "$f" "$W/raw_hf15__$(basename "$f" .gz)"; done
  tar -czf "$OUT/results_N3a.tgz" -C "$W" $(cd "$W" && ls -d raw_hf15__*.jsonl raw_hf15/nq/*.summary.json 2>/dev/null)
  # held-out examples 1554..1853; the first sample, 1854..2153, kept position 0 for both (A2 and P2)
  for m in "$M05" "$M15"; do
    step probe2_$(basename "$m" | cut -c15-18) 120 env MODEL="$m" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto \
        bash gen_advantageous_pos_for_R1.sh --limit 8 --eval_holdout 800 --output-path "$W/probe2"
    cp "$W"/probe2/nq/*.summary.json "$OUT/" 2>/dev/null
  done
  step baseline_05 90 python3 benchmarks/bench_eval.py --data "$DATA" --model "$M05" --total_doc 20 --sample_num 100 \
      --positions "$POS5" --baseline_only --baseline_batch_size 64 --dtype auto --output "$OUT/bench_eval_baseline.json"
  note "part N3 done"
  exit 0
fi
# N1-N3 ran 2026-12-04 (second session; logs perf_h200_vllm_N{1,2,3}.log): N1's fixed_a was killed in the
# fresh machine's first engine start (135 s) and top-p JIT, so the same-flow pair is still to run; N3's
# 1.5B probe was cut after 12 of 20 positions. N4 is both, with N1's compile caches carried in: after the
# chunk calls (wheels, both models, data), carry [".carry/vcache"] with this call.
if [ "$PART" = N4 ]; then
  for f in .carry/vcache/*.tgz; do [ -f "$f" ] && tar -xzf "$f" -C /root && note "cache restored: $f"; done
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
  ( "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" > "$W/convert15.log" 2>&1; echo "exit $?" >> "$W/convert15.log" ) &
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  wait; tail -1 "$W/convert15.log" | tee -a "$LOG"
  same_seed_pair 0 140
  # the probe flow once more: does a probe before the sampled answers change them?
  step s1_vllm_05_auto 150 env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto bash gen_advantageous_pos_for_R1.sh \
      --limit 1200 --output-path "$W/raw_vllm"
  F0=$(s1file "$W/raw_vllm" Qwen2.5-Coder-0.5B-Instruct)
  note "content sha256: auto $(content_sha "$F0")"; note "auto vs fixed_a:"; differ "$F0" "$FA"
  step probe2_1.5B 150 env MODEL="$M15" INPUT_PATH="$DATA" BACKEND=vllm GOLD_DOC=auto \
      bash gen_advantageous_pos_for_R1.sh --limit 8 --eval_holdout 800 --output-path "$W/probe2"
  cp "$W"/probe2/nq/*.summary.json "$OUT/" 2>/dev/null
  fixed_answers raw_vllm raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_N4.tgz" -C "$W" $(cd "$W" && ls -d raw_vllm*__*.jsonl raw_vllm*/nq/*.summary.json 2>/dev/null)
  note "part N4 done"
  exit 0
fi
# R (2026-12-04, third session; after the chunk calls of the wheels, the 0.5B model and data only): the
# same-flow pair on a fresh machine (no compile caches: fixed_a gets the first start's ~135 s and the top-p
# JIT), the caches back as $OUT/cache_*.tgz, then part T (EXP=pine SIZE=05) with the call's remaining time.
if [ "$PART" = R ]; then
  finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
  step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05"
  for run in fixed_a fixed_b; do
    step s1_vllm_05_$run $([ $run = fixed_a ] && echo 320 || echo 150) env MODEL="$M05" INPUT_PATH="$DATA" BACKEND=vllm \
        GOLD_DOC=0 bash gen_advantageous_pos_for_R1.sh --limit 1200 --output-path "$W/raw_vllm_$run"
  done
  FA=$(s1file "$W/raw_vllm_fixed_a" Qwen2.5-Coder-0.5B-Instruct); FB=$(s1file "$W/raw_vllm_fixed_b" Qwen2.5-Coder-0.5B-Instruct)
  note "content sha256: fixed_a $(content_sha "$FA"), fixed_b $(content_sha "$FB")"
  note "fixed_a vs fixed_b:"; differ "$FA" "$FB"
  fixed_answers raw_vllm_fixed_a raw_vllm_fixed_b
  tar -czf "$OUT/results_R.tgz" -C "$W" $(cd "$W" && ls -d raw_vllm_fixed*__*.jsonl raw_vllm_fixed*/nq/*.summary.json 2>/dev/null)
  [ -n "${NO_CACHES:-}" ] || save_caches
  PART=T EXP=pine SIZE=05  # falls through to part T below
fi
# P (issue 19, next session): PINE's kernel timed at the 0.5B shape (random weights, 24 layers, 64 prompts of
# ~2,300 tokens), then part T (EXP=pine SIZE=05). After the chunk calls of the wheels, the 0.5B model and data:
#   NEXT=P BUDGET_S=1450 SEEDS=1 T_ARGS="--pine_batch 64 --bench_batch 16 64" bash docs/results/perf_h200_vllm_plan.sh START
if [ "$PART" = P ]; then
  step bench_pine_kernel 150 python3 benchmarks/bench_pine_kernel.py --device cuda --dtype bfloat16 --layers 24 \
      --rows 64 --decode_steps 20 --output "$OUT/bench_pine_kernel_h200.json"
  PART=T EXP=pine SIZE=05  # falls through to part T below
fi
# T: reproduce.py experiments, a few steps per session, resumed across sessions from what comes back
# (steps/, evaluate/, compare/, stage 1's raw_data/; no checkpoints). After the chunk calls (wheels, the
# model, data), with the previous session's $OUT/results_SIZE.tgz carried as .carry/runs/results_SIZE.tgz.
#   issue 16: EXP=table3 SIZE=15 [ROWS=base,p2d, then seqkd,kl,align,kl_anchor] (3 seeds per trained row);
#     T_ARGS: more reproduce.py flags (e.g. "--micro_batch 8" if micro-batch 32 does not fit at 1.5B: unmeasured)
#   issue 19: EXP=pine SIZE=05 (and 15) SEEDS=1: base, PINE, Pos2Distill, Pos2Distill + PINE, PINE's cost.
#   One output folder per model, so table3 and pine share stage 1 and the p2d trainings; run pine's
#   p2d_pine rows in the session that trains p2d (their checkpoint does not come back).
if [ "$PART" = T ]; then
  SIZE=${SIZE:-15} EXP=${EXP:-table3}
  case $SIZE in
    05) MX=$M05; finish Qwen2.5-Coder-0.5B-Instruct.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 || exit 1
        step convert05 120 "${CONVERT[@]}" "$M/Qwen2.5-Coder-0.5B-Instruct.gguf" "$M05" ;;
    15) MX=$M15; finish Qwen2.5-Coder-1.5B-Instruct.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || exit 1
        step convert15 150 "${CONVERT[@]}" "$M/Qwen2.5-Coder-1.5B-Instruct.gguf" "$M15" ;;
    *) echo "SIZE must be 05 or 15" >&2; exit 2 ;;
  esac
  RUN=$W/runs_$SIZE
  if [ -f ".carry/runs/results_$SIZE.tgz" ] && [ ! -d "$RUN/steps" ]; then  # a later call of the session has newer ones
    mkdir -p "$RUN" && tar -xzf ".carry/runs/results_$SIZE.tgz" -C "$RUN" && note "resumed: $(ls "$RUN/steps" | wc -l) steps done earlier"
  fi
  left=$(( DEADLINE - $(date +%s) - 25 ))
  [ $(( left - ${PAUSE_MARGIN_S:-100} )) -ge 30 ] || { note "part T: skipped, $left s left"; exit 0; }
  note "reproduce.py $EXP, ${ROWS:-all rows}, ${SEEDS:-3} seed(s), $left s"
  # --stop_after: no step starts later and a training pauses into a checkpoint (a 1.5B one: ~21 GB, ~30 s),
  # kept on this machine for the session's next T call (exit 75). SIGINT at the end is the backstop: reproduce.py
  # stops its running steps (each in its own process group) before it exits.
  timeout -s INT -k 20 "$left" python3 reproduce.py "$EXP" --model "$MX" --data "$DATA" --out "$RUN" \
      ${ROWS:+--rows "$ROWS"} --seeds "${SEEDS:-3}" --gpus 0 ${T_ARGS:-} --stop_after $(( left - ${PAUSE_MARGIN_S:-100} )) 2>&1 \
      | grep --line-buffered -v "it/s\]$" | tee -a "$LOG"
  tar -czf "$OUT/results_$SIZE.tgz" -C "$RUN" $(cd "$RUN" && ls -d steps evaluate compare raw_data table.md table.json 2>/dev/null)
  tar -czf "$OUT/logs_$SIZE.tgz" -C "$RUN" logs 2>/dev/null
  note "part T done: $(ls "$RUN/steps" | wc -l) steps done; results_$SIZE.tgz $(stat -c%s "$OUT/results_$SIZE.tgz") bytes"
  touch "$OUT/DONE"
  exit 0
fi
echo "unknown part $PART" >&2; exit 2
