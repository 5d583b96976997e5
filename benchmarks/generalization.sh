#!/usr/bin/env bash
# Generalization on one GPU: the base model and a trained checkpoint (from reproduce.sh or
# reproduce_lanes.sh, in the same WORK_DIR) evaluated side by side (two processes sharing the
# GPU) on other document counts and on another task.
#
#   export MODEL=/root/models/Qwen2.5-Coder-0.5B-Instruct.gguf
#   # NQ with 10, 30 and 50 documents, built from the oracle file when missing:
#   OUT_DIR=$OUT ORACLE=/root/data/nq-open-oracle.jsonl.gz CKPT=p2d DOC_COUNTS="10 30 50" \
#       bash benchmarks/generalization.sh docs
#   # KV retrieval for the NQ-trained checkpoint (CKPT_DATASET: the dataset CKPT was trained on):
#   OUT_DIR=$OUT KV_DATA=/root/data/kv-retrieval-75_keys.jsonl.gz KV_KEYS=75 CKPT=p2d \
#       bash benchmarks/generalization.sh kv
#
# Knobs (environment): CKPT (required), MODELS ("base CKPT": evaluate both; one of them alone
# leaves plots and table to a later run with both, which resumes finished evaluations),
# CKPT_DATASET (nq), DATA_DIR (where NQ-k files are built: WORK_DIR/qa_data), DOC_COUNTS ("10 30 50"); per document count k, POSITIONS_k (default:
# every position up to 30 documents, every 5th and the last above), EVAL_NUM_k (EVAL_NUM, 500)
# and EVAL_BATCH_k (EVAL_BATCH, 256; 128 above 30 documents); KV_POSITIONS (0 and every 5th
# key and the last), KV_NUM (500). Everything reproduce.sh reads (SEED, POSITIONS_PER_CALL,
# EVAL_COMPACT, WORK_DIR, ...) passes through.
#
# All of it takes longer than one 10-minute device call (NQ-30 alone is 15,000 prompts of ~3,600
# tokens per model): on the device tool start it with setsid in the background, e.g.
#   (setsid bash benchmarks/generalization.sh docs > $DIR/generalization.log 2>&1 &)
# and poll the log for "generalization docs done"; eval_data.py resumes finished positions if a
# step is run again on the same machine.
#
# Outputs in OUT_DIR: reproduce.sh's NAME_DATASET_{summary,predictions}_Kdocs files for base and
# CKPT, one log per evaluation, a plot per setting (base vs CKPT) and generalization_DATASET.{md,json}:
# average and gap per document count for both models, the checkpoint's gap as a fraction of
# base's, and its average change.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
: "${MODEL:?set MODEL}" "${CKPT:?set CKPT (the trained run name)}"
export MODEL CKPT_DATASET=${CKPT_DATASET:-nq}
OUT_DIR=${OUT_DIR:-bench_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
export OUT_DIR
WORK=${WORK_DIR:-$ROOT}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
export WORK_DIR=$WORK
STEP=${1:?usage: generalization.sh docs | kv}
# MODELS: evaluate only some (e.g. base while CKPT still trains); a later run with both resumes
# the finished evaluations and adds the plots and the table
read -r -a models <<< "${MODELS-base $CKPT}"
both=0 has_base=0 has_ckpt=0
for name in "${models[@]}"; do
    case "$name" in
    base) has_base=$((has_base + 1)) ;;
    "$CKPT") has_ckpt=$((has_ckpt + 1)) ;;
    *) echo "error: MODELS may name base and $CKPT only, got '$name'" >&2; exit 2 ;;
    esac
done
if [ "$has_base" -gt 1 ] || [ "$has_ckpt" -gt 1 ]; then  # two evaluations would write the same files
    echo "error: MODELS names a model twice: ${models[*]}" >&2
    exit 2
fi
if [ "${#models[@]}" -eq 0 ]; then echo "error: MODELS is empty" >&2; exit 2; fi
if [ "$has_base" -ge 1 ] && [ "$has_ckpt" -ge 1 ]; then both=1; fi

every_fifth() {  # 0,5,10,... and the last index of $1 slots
    local n=$1 list="" i
    for ((i = 0; i < n; i += 5)); do list+="$i,"; done
    if (((n - 1) % 5 != 0)); then list+="$((n - 1)),"; fi
    printf '%s' "${list%,}"
}

eval_pair() {  # eval_pair DATASET DATA TOTAL_DOC POSITIONS NUM BATCH: base and CKPT (MODELS) at once
    local ds=$1 data=$2 k=$3 positions=$4 num=$5 batch=$6 name pids=() failed=0 pid
    for name in "${models[@]}"; do
        DATASET_NAME=$ds DATA=$data TOTAL_DOC=$k EVAL_POSITIONS=$positions EVAL_NUM=$num EVAL_BATCH=$batch \
            bash "$HERE/reproduce.sh" eval "$name" > "$OUT_DIR/${name}_${ds}_${k}docs.eval.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    if [ "$failed" = 1 ]; then
        echo "error: an evaluation of $ds with $k documents failed; logs: $OUT_DIR/*_${ds}_${k}docs.eval.log" >&2
        tail -n 5 "$OUT_DIR"/*_"${ds}"_"${k}"docs.eval.log >&2
        exit 1
    fi
    if [ "$both" = 0 ]; then return; fi
    python "$ROOT/plot_positions.py" "$OUT_DIR/base_${ds}_summary_${k}docs.json" \
        "$OUT_DIR/${CKPT}_${ds}_summary_${k}docs.json" --label base "$CKPT" \
        --title "$ds, $k documents, last $num questions" --output "$OUT_DIR/${ds}_${k}docs_base_vs_${CKPT}.png"
}

summarize() {  # summarize DATASET K...: one table over the counts evaluated
    local ds=$1
    if [ "$both" = 0 ]; then echo "MODELS=${models[*]}: no plots and no table (they need base and $CKPT)"; return; fi
    shift
    python "$HERE/summarize_generalization.py" --out_dir "$OUT_DIR" --checkpoint "$CKPT" --dataset "$ds" "$@"
}

case "$STEP" in
docs)
    : "${ORACLE:?set ORACLE (nq-open-oracle.jsonl.gz) to build the k-document sets}"
    DATA_DIR=${DATA_DIR:-$WORK/qa_data}
    mkdir -p "$DATA_DIR"
    read -r -a counts <<< "${DOC_COUNTS-10 30 50}"
    if [ "${#counts[@]}" -eq 0 ]; then echo "error: DOC_COUNTS is empty" >&2; exit 2; fi
    for k in "${counts[@]}"; do
        case "$k" in '' | *[!0-9]*) echo "error: DOC_COUNTS must be whole numbers, got '$k'" >&2; exit 2 ;; esac
    done
    for k in "${counts[@]}"; do
        data="$DATA_DIR/nq-open-${k}_total_documents.jsonl.gz"
        if [ ! -e "$data" ]; then
            python "$ROOT/prepare_data.py" nq --oracle "$ORACLE" --total_doc "$k" --output "$data"
        fi
        pos_var=POSITIONS_$k num_var=EVAL_NUM_$k batch_var=EVAL_BATCH_$k
        if [ "$k" -le 30 ]; then default_positions=all default_batch=${EVAL_BATCH:-256}
        else default_positions=$(every_fifth "$k") default_batch=${EVAL_BATCH:-128}
        fi
        began=$SECONDS
        eval_pair nq "$data" "$k" "${!pos_var:-$default_positions}" "${!num_var:-${EVAL_NUM:-500}}" \
            "${!batch_var:-$default_batch}"
        echo "nq, $k documents: ${models[*]} evaluated in $((SECONDS - began)) s"
    done
    summarize nq "${counts[@]}"
    echo "generalization docs done"
    ;;
kv)
    : "${KV_DATA:?set KV_DATA (prepare_data.py kv writes it)}"
    keys=${KV_KEYS:-75}
    began=$SECONDS
    eval_pair kv "$KV_DATA" "$keys" "${KV_POSITIONS:-$(every_fifth "$keys")}" "${KV_NUM:-500}" "${EVAL_BATCH:-128}"
    echo "kv, $keys keys: ${models[*]} evaluated in $((SECONDS - began)) s"
    summarize kv "$keys"
    echo "generalization kv done"
    ;;
*)
    echo "error: unknown step $STEP (docs | kv)" >&2
    exit 2
    ;;
esac
