#!/usr/bin/env bash
# reproduce_lanes.sh over several GPUs of one machine: stage 1 once (on the first GPU), then the
# variants dealt round-robin to the lanes, lane I on the I-th id of GPUS (counting from 0), one
# reproduce_lanes.sh per lane (training lane + evaluation lane), each with its own WORK_DIR/gpuI,
# OUT_DIR/gpuI and MASTER_PORT. The base evaluation (unless SKIP_BASE=1) goes to the last lane,
# which gets the fewest variants.
#
#   GPUS="0 1 2 3" OUT_DIR=$OUT WORK_DIR=/root/work LIMIT=1200 GOLD_DOC=0 LR=5e-6 \
#       bash benchmarks/reproduce_gpus.sh p2d "kl:KD_COEF=1,0,0,0" "seqkd:KD_COEF=0,1,0,0" ...
#
# GPUS: the GPU ids (default: those of CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists; ids
# as nvidia-smi numbers them, so set CUDA_DEVICE_ORDER=PCI_BUS_ID on machines with mixed GPUs); an
# id given twice runs two lanes on that GPU. Variants and every other knob as in reproduce_lanes.sh
# and reproduce.sh. SKIP_STAGE1=1 takes stage 1's answers from WORK_DIR/raw_data (reproduce.sh
# stage1 copies them to OUT_DIR for that).
# Files: OUT_DIR/stage1.log, lanes.log, stage1.out and stage 1's answers; lane I's in OUT_DIR/gpuI/
# (lanes.log, lanes.out, NAME.train.log, NAME.eval.log, summaries, predictions). OUT_DIR/gpus.log
# says which variants went where and ends with "gpus done status=N" (0: every step of every lane
# succeeded). Stopping the script (INT/TERM) stops every lane (exit status 130). On the device
# tool start it with setsid in the background and poll OUT_DIR/gpus.log.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_DIR=${OUT_DIR:-bench_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
WORK=${WORK_DIR:-$(dirname "$HERE")}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
[ "$#" -ge 1 ] || { echo "usage: reproduce_gpus.sh NAME[:VAR=VALUE ...] ..." >&2; exit 2; }
if [ -z "${GPUS+x}" ]; then
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPUS=${CUDA_VISIBLE_DEVICES//,/ }
    else GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null | tr '\n' ' ')
    fi
fi
read -r -a gpus <<< "$GPUS"
[ "${#gpus[@]}" -ge 1 ] || { echo "error: no GPUs (set GPUS, e.g. GPUS=\"0 1\")" >&2; exit 2; }
for gpu in "${gpus[@]}"; do
    case "$gpu" in *[!0-9]*) echo "error: GPUS must be GPU ids (whole numbers), got '$gpu'" >&2; exit 2 ;; esac
done
# every variant checked (and no name twice) before anything runs
CHECK_ONLY=1 OUT_DIR=$OUT_DIR bash "$HERE/reproduce_lanes.sh" "$@" || exit 2
for i in "${!gpus[@]}"; do  # a lane's raw_data must be the shared one (a link), not an old copy
    if [ -e "$WORK/gpu$i/raw_data" ] && [ ! -L "$WORK/gpu$i/raw_data" ]; then
        echo "error: $WORK/gpu$i/raw_data is a folder of an earlier run; remove it" \
            "(stage 1's answers are shared from $WORK/raw_data)" >&2
        exit 2
    fi
done
PORT0=${MASTER_PORT:-6666}

log() { echo "$(date +%H:%M:%S) $*" >> "$OUT_DIR/gpus.log"; }
: > "$OUT_DIR/gpus.log"
pids=()
# reproduce_lanes.sh stops its own steps on TERM
trap 'trap - INT TERM; log "stopped"; for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null; done; wait; exit 130' INT TERM

if [ "${SKIP_STAGE1:-0}" != 1 ]; then
    log "stage1 on GPU ${gpus[0]}"
    CUDA_VISIBLE_DEVICES=${gpus[0]} WORK_DIR=$WORK OUT_DIR=$OUT_DIR SKIP_BASE=1 CHECK_ONLY=0 bash "$HERE/reproduce_lanes.sh" \
        > "$OUT_DIR/stage1.out" 2>&1 &
    pids=($!)
    if ! wait "${pids[0]}"; then log "stage1 failed (OUT_DIR/stage1.log)"; log "gpus done status=1"; exit 1; fi
    log "stage1 done"
fi

all=("$@")
last=$((${#gpus[@]} - 1))
pids=()
for i in "${!gpus[@]}"; do
    skip_base=1
    if [ "$i" = "$last" ] && [ "${SKIP_BASE:-0}" != 1 ]; then skip_base=0; fi
    variants=()  # lane i gets variants i, i + N, i + 2N, ...
    for ((j = i; j < ${#all[@]}; j += ${#gpus[@]})); do variants+=("${all[j]}"); done
    if [ "${#variants[@]}" -eq 0 ] && [ "$skip_base" = 1 ]; then continue; fi
    mkdir -p "$WORK/gpu$i" "$OUT_DIR/gpu$i"
    ln -sfn "$WORK/raw_data" "$WORK/gpu$i/raw_data"  # stage 1's answers, shared
    log "lane $i on GPU ${gpus[i]}: ${variants[*]}$([ "$skip_base" = 0 ] && echo ' + base')"
    CUDA_VISIBLE_DEVICES=${gpus[i]} MASTER_PORT=$((PORT0 + i)) WORK_DIR=$WORK/gpu$i OUT_DIR=$OUT_DIR/gpu$i \
        SKIP_STAGE1=1 SKIP_BASE=$skip_base CHECK_ONLY=0 bash "$HERE/reproduce_lanes.sh" "${variants[@]}" \
        > "$OUT_DIR/gpu$i/lanes.out" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
log "gpus done status=$status"
exit $status
