#!/usr/bin/env bash
# README command 1: set up, then run the whole pipeline on the embedded default
# (SmolLM2-135M-Instruct from PyPI) on CPU, small enough for ~11 minutes on 2 cores (a fresh install included):
#   data  -> NQ k-document set built from the local oracle file (BM25 distractors)
#   stage 1 -> measure the advantageous position, sample answers there
#   stage 2 -> advantageous/trivial position pairs
#   stage 3 -> a short Pos2Distill training (DeepSpeed ZeRO-3, CPU/gloo)
#   stage 4 -> accuracy at every position, base vs trained, table + plot
# A re-run keeps what an earlier run finished: the data set and the stage-3 checkpoint are
# reused when made from the same inputs, stages 1 and 4 reuse (or resume) their outputs.
# REDO=1 or --redo deletes this run's outputs under WORK first (not a downloaded oracle file).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/lib/usage.sh
help_if_asked "$0" "[VAR=value ...] bash scripts/demo.sh [--redo]" "$@"
WORK=${WORK:-demo}                              # every output goes under this folder
TOTAL_DOC=${TOTAL_DOC:-3}                       # documents per question
STAGE1_NUM=${STAGE1_NUM:-48}                    # stage-1 questions answered at the advantageous position
EXAMPLE_NUM=${EXAMPLE_NUM:-8}                   # stage-2 examples kept (correct answers)
EVAL_NUM=${EVAL_NUM:-24}                        # stage-4 questions per position (held out from stages 1-3)
LR=${LR:-2e-5}                                  # stage-3 learning rate
MASTER_PORT=${MASTER_PORT:-29517}               # stage 3's DeepSpeed port
NQ_ORACLE=${NQ_ORACLE:-../shared/data/nq-open-oracle.jsonl.gz}  # downloaded to WORK when absent
REDO=${REDO:-0}                                 # 1: recompute every stage (as --redo)
for arg in "$@"; do
    case "$arg" in
        --redo) REDO=1 ;;
        *) echo "error: unknown argument '$arg' (bash scripts/demo.sh --help)" >&2; exit 2 ;;
    esac
done
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then . .venv/bin/activate; fi

MODEL=SmolLM2-135M-Instruct
ORACLE_URL=https://github.com/nelson-liu/lost-in-the-middle/raw/main/qa_data/nq-open-oracle.jsonl.gz
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)
if [ "$REDO" = 1 ]; then
    echo "== REDO=1: deleting the outputs under $WORK/"
    rm -rf "$WORK/qa_data" "$WORK/raw_data" "$WORK/data" "$WORK/checkpoints" "$WORK/tensorboard" "$WORK/evaluate"
fi
# A step's inputs, written next to its output once it is done; the same inputs skip the step.
same_inputs() { [ -e "$1" ] && [ -f "$1.inputs" ] && [ "$(cat "$1.inputs")" = "$2" ]; }

if [ ! -f "$NQ_ORACLE" ]; then
    NQ_ORACLE="$WORK/nq-open-oracle.jsonl.gz"
    [ -f "$NQ_ORACLE" ] || { mkdir -p "$WORK"; echo "== downloading the NQ oracle file"; curl -fsSL -o "$NQ_ORACLE" "$ORACLE_URL"; }
fi
DATA="$WORK/qa_data/nq-open-${TOTAL_DOC}_total_documents.jsonl.gz"

inputs="$(realpath "$NQ_ORACLE") $(stat -c %s-%Y "$NQ_ORACLE") total_doc=$TOTAL_DOC"
if same_inputs "$DATA" "$inputs"; then
    echo "== data: keeping $DATA (REDO=1 rebuilds it)"
else
    echo "== data: $TOTAL_DOC-document NQ from $NQ_ORACLE"
    python prepare_data.py nq --oracle "$NQ_ORACLE" --total_doc "$TOTAL_DOC" --output "$DATA"
    echo "$inputs" > "$DATA.inputs"
fi

echo "== stage 1: advantageous position and answers there"
python gen_advantageous_pos_for_R1.py --input-path "$DATA" --model "$MODEL" --output-path "$WORK/raw_data" \
    --dataset_name nq --total_doc "$TOTAL_DOC" --gold_doc auto --probe_num 24 --eval_holdout "$EVAL_NUM" \
    --limit "$STAGE1_NUM" --max-new-tokens 32 --backend hf --batch_size 16

echo "== stage 2: position pairs"
python create_datasets.py --model_name "$MODEL" --dataset_name nq --total_doc "$TOTAL_DOC" \
    --raw_data_dir "$WORK/raw_data" --output_dir "$WORK/data" \
    --position_sample_num 2 --strengthen 1 --example_num "$EXAMPLE_NUM"

DATASET=$(python -m pos2distill.names dataset --model_name "$(python -m pos2distill.names model --model "$MODEL")" \
    --total_doc "$TOTAL_DOC" --position_sample_num 2 --strengthen 1 --example_num "$EXAMPLE_NUM")
RUN=$(python -m pos2distill.names checkpoint --dataset "$DATASET" --kd_coef 0.0,0.0,0.0,1.0)

CKPT="$WORK/checkpoints/nq/$RUN"
# the stage-2 rows (their content, not the folder's date) and the training settings
inputs="$(cat "$WORK/data/$DATASET"/*.arrow | sha256sum | cut -c1-16) lr=$LR"
if same_inputs "$CKPT" "$inputs"; then
    echo "== stage 3: keeping $CKPT, trained on the same data and settings (REDO=1 retrains)"
else
    echo "== stage 3: a short Pos2Distill training (DeepSpeed ZeRO-3 on CPU, gloo)"
    # stage 4 keys its predictions by the checkpoint's path: the old ones are not this model's
    rm -rf "$CKPT" "$CKPT.inputs" "$WORK/evaluate/nq/pos2distill"
    MODEL="$MODEL" DATASET="$DATASET" DATA_ROOT="$WORK/data" SAVE_PATH="$WORK/checkpoints/nq" \
        CKPT_PATH="$WORK/checkpoints/nq/_deepspeed_ckpt" TENSORBOARD="$WORK/tensorboard" NUM_GPUS=1 \
        KD_COEF=0.0,0.0,0.0,1.0 LR="$LR" TRAIN_BATCH=8 MICRO_BATCH=2 MAX_LEN=2048 MASTER_PORT="$MASTER_PORT" \
        bash train_nq.sh
    echo "$inputs" > "$CKPT.inputs"
fi

echo "== stage 4: accuracy at every position, base vs trained"
python eval_data.py --input-path "$DATA" --model "$MODEL" "$WORK/checkpoints/nq/$RUN" --label base pos2distill \
    --dataset_name nq --output-path "$WORK/evaluate" --total_doc "$TOTAL_DOC" --sample_num "$EVAL_NUM" \
    --max-new-tokens 32 --backend hf --batch_size 16 --train_dataset "$WORK/data/$DATASET"

echo "== demo finished in $(( $(date +%s) - start )) s; outputs under $WORK/"
