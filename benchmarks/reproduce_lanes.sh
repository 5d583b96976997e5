#!/usr/bin/env bash
# reproduce.sh's steps for several variants on ONE GPU, in two lanes that overlap:
#   training lane: stage 1 (unless SKIP_STAGE1=1), then `train NAME` for each variant in turn;
#   eval lane:     `eval base` (unless SKIP_BASE=1), then `eval NAME` as soon as NAME's training
#                  has finished; up to EVAL_PARALLEL (1) evaluations at once.
# Stage-4 decoding leaves the GPU partly idle, so an evaluation costs little time beside a
# training. Memory, measured on an H200 (139 GiB) with the 0.5B model: a training at micro-batch
# 32 (~52 GiB alone) beside one evaluation at batch 256 peaked at 116 GiB of the GPU (both
# processes' allocator pools); two evaluations beside a training were not tried. On smaller GPUs
# lower EVAL_BATCH.
#
#   OUT_DIR=$OUT LIMIT=1200 GOLD_DOC=0 bash benchmarks/reproduce_lanes.sh \
#       "p2d:LR=5e-6" "kl:LR=5e-6 KD_COEF=1,0,0,0" "no_anchor:LR=5e-6 STRENGTHEN=0"
#
# A variant is NAME or NAME:VAR=VALUE VAR=VALUE ... (environment for that step only, on top of
# the caller's, which reproduce.sh reads). No variant: stage 1 and/or base alone. CHECK_ONLY=1
# checks the variants and runs nothing. Several GPUs: reproduce_gpus.sh runs one of these per GPU.
# Logs: OUT_DIR/stage1.log, OUT_DIR/NAME.train.log, OUT_DIR/NAME.eval.log; OUT_DIR/lanes.log
# says when each step ended and how. A failed training skips that variant's evaluation; the
# other variants go on. Exit status: 0 when every step succeeded. The script returns when both lanes are done; on the device tool start it with
# setsid in the background and poll OUT_DIR/lanes.log for "lanes done".
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_DIR=${OUT_DIR:-bench_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
export OUT_DIR
EVAL_PARALLEL=${EVAL_PARALLEL:-1}
case "$EVAL_PARALLEL" in
'' | *[!0-9]* | 0) echo "error: EVAL_PARALLEL must be a positive whole number" >&2; exit 2 ;;
esac
# no variant: stage 1 and/or the base evaluation alone are a run too
if [ "$#" -eq 0 ] && [ "${SKIP_BASE:-0}" = 1 ] && [ "${SKIP_STAGE1:-0}" = 1 ]; then
    echo "usage: reproduce_lanes.sh NAME[:VAR=VALUE ...] ..." >&2
    exit 2
fi
vars_of() {  # the VAR=VALUE part of variant $1
    case "$1" in *:*) printf '%s' "${1#*:}" ;; *) printf '' ;; esac
}

names=()
for variant in "$@"; do
    name=${variant%%:*}
    case "$name" in
    '' | base | *[!A-Za-z0-9._-]*) echo "error: bad variant name '$name' in '$variant'" >&2; exit 2 ;;
    esac
    for seen in "${names[@]}"; do
        if [ "$seen" = "$name" ]; then echo "error: variant name '$name' given twice" >&2; exit 2; fi
    done
    read -r -a words <<< "$(vars_of "$variant")"
    for word in "${words[@]}"; do  # VAR=VALUE words, passed to env: nothing else may run (or glob)
        if ! [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*=[^*?[]*$ ]]; then
            echo "error: '$word' in variant '$variant' is not VAR=VALUE" >&2
            exit 2
        fi
    done
    names+=("$name")
done
if [ "${CHECK_ONLY:-0}" = 1 ]; then exit 0; fi  # the variants are well-formed: nothing is run

log() { echo "$(date +%H:%M:%S) $*" >> "$OUT_DIR/lanes.log"; }

run_step() {  # run_step LOGNAME "VAR=VALUE ..." reproduce.sh-args...: one step, its end logged
    local logname=$1 vars=$2 began=$SECONDS rc
    shift 2
    log "$logname started"
    # word splitting of $vars is wanted: VAR=VALUE pairs without spaces inside
    # shellcheck disable=SC2086
    env $vars bash "$HERE/reproduce.sh" "$@" > "$OUT_DIR/$logname.log" 2>&1
    rc=$?
    log "$logname rc=$rc $((SECONDS - began)) s"
    return $rc
}

: > "$OUT_DIR/lanes.log"
kill_tree() {  # the process $1 and all its descendants, children first
    local child
    for child in $(pgrep -P "$1"); do kill_tree "$child"; done
    kill "$1" 2> /dev/null
}
# Stopping the script (INT/TERM) stops its trainings and evaluations too.
trap 'trap - INT TERM; log "stopped"; for child in $(pgrep -P $$); do kill_tree "$child"; done; exit 130' INT TERM
for name in "${names[@]}"; do  # markers of an earlier run would start an evaluation too early
    rm -f "$OUT_DIR/$name.train_stats.json" "$OUT_DIR/$name.train_failed"
done
status=0
(
    failed=0
    if [ "${SKIP_STAGE1:-0}" != 1 ]; then
        if ! run_step stage1 "" stage1; then
            log "stage 1 failed: no training"
            for n in "${names[@]}"; do touch "$OUT_DIR/$n.train_failed"; done
            exit 1
        fi
    fi
    for variant in "$@"; do
        name=${variant%%:*}
        if ! run_step "$name.train" "$(vars_of "$variant")" train "$name"; then
            touch "$OUT_DIR/$name.train_failed"
            failed=1
        fi
    done
    exit $failed
) &
train_lane=$!
(
    pids=() evals=()
    running() {  # evaluations of this lane still running
        local n=0 pid
        for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && n=$((n + 1)); done
        echo "$n"
    }
    launch() {  # launch LOGNAME VARS reproduce.sh-args...: once a slot is free, in the background
        while [ "$(running)" -ge "$EVAL_PARALLEL" ]; do sleep 5; done
        rm -f "$OUT_DIR/$1.rc"
        ( run_step "$@"; echo $? > "$OUT_DIR/$1.rc" ) &
        pids+=($!)
        evals+=("$1")
    }
    failed=0
    if [ "${SKIP_BASE:-0}" != 1 ]; then
        launch base.eval "" eval base
    fi
    for variant in "$@"; do
        name=${variant%%:*}
        # reproduce.sh writes NAME.train_stats.json once the checkpoint is saved
        while [ ! -e "$OUT_DIR/$name.train_stats.json" ] && [ ! -e "$OUT_DIR/$name.train_failed" ]; do
            # a training lane that is gone without a marker (killed) will not write one
            if ! kill -0 "$train_lane" 2> /dev/null && [ ! -e "$OUT_DIR/$name.train_stats.json" ]; then
                touch "$OUT_DIR/$name.train_failed"
            fi
            sleep 5
        done
        if [ -e "$OUT_DIR/$name.train_failed" ]; then
            log "$name: training failed, not evaluated"
            failed=1
            continue
        fi
        launch "$name.eval" "$(vars_of "$variant")" eval "$name"
    done
    wait
    for logname in "${evals[@]}"; do
        [ "$(cat "$OUT_DIR/$logname.rc" 2> /dev/null)" = 0 ] || failed=1
    done
    exit $failed
) &
eval_lane=$!
wait "$train_lane" || status=1
wait "$eval_lane" || status=1
log "lanes done status=$status"
exit $status
