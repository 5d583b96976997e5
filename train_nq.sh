#!/usr/bin/env bash
# Stage 3: Pos2Distill training (the README's command). Every variable can be overridden
# from the environment, e.g.
#   MODEL=Qwen/Qwen2.5-7B-Instruct NUM=400 KD_COEF=0.0,0.0,0.0,1.0 LR=3e-6 bash train_nq.sh
# Extra arguments are passed on to kd/train_kd.py (e.g. --max_samples 100).
# KD_COEF=a,b,c,d mixes total = a*kd + b*lm + c*rank + d*adaptive; 0,0,0,1 is Pos2Distill.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/lib/usage.sh
help_if_asked "$(basename "$0")" "[VAR=value ...] bash train_nq.sh [more kd/train_kd.py flags; see python kd/train_kd.py --help]" "$@"

MODEL=${MODEL:-SmolLM2-135M-Instruct}            # folder, hub id, .gguf file or the embedded default
TEACHER=${TEACHER:-$MODEL}
names() { python -m pos2distill.names "$@"; }      # the one owner of stage file and dataset names
MODEL_NAME=${MODEL_NAME:-$(names model --model "$MODEL")}  # the name stage 1 and stage 2 used
DATASET_NAME=${DATASET_NAME:-nq}
TOTAL_DOCS=${TOTAL_DOCS:-20}
K=${K:-4}
STRENGTHEN=${STRENGTHEN:-1}
NUM=${NUM:-400}
FILTER=${FILTER:-1}                              # 0: the dataset of create_datasets.py --no_filter
no_filter=()
if [ "$FILTER" != 1 ]; then no_filter=(--no_filter); fi
DATASET=${DATASET:-$(names dataset --model_name "$MODEL_NAME" --total_doc "$TOTAL_DOCS" --position_sample_num "$K" \
    --strengthen "$STRENGTHEN" --example_num "$NUM" "${no_filter[@]}")}
names check --flag DATASET_NAME "$DATASET_NAME" >/dev/null
DATA_ROOT=${DATA_ROOT:-data}
SAVE_PATH=${SAVE_PATH:-checkpoints/${DATASET_NAME}}
CKPT_PATH=${CKPT_PATH:-checkpoints/${DATASET_NAME}/_deepspeed_ckpt}   # for --save_steps N / --load_checkpoint
TENSORBOARD=${TENSORBOARD:-tensorBoard}
KD_COEF=${KD_COEF:-0.0,0.0,0.0,1.0}
LR=${LR:-3e-6}
PERSERVE=${PERSERVE:-1.0}
TRAIN_BATCH=${TRAIN_BATCH:-32}
MICRO_BATCH=${MICRO_BATCH:-4}
MAX_LEN=${MAX_LEN:-32000}
EPOCHS=${EPOCHS:-1}
MASTER_PORT=${MASTER_PORT:-6666}
NUM_GPUS=${NUM_GPUS:-}                           # empty: every visible GPU (CUDA_VISIBLE_DEVICES; one process on CPU)
ZERO_STAGE=${ZERO_STAGE:-3}
# 7B/8B on 8 GPUs needs both (the reference setting); a 0.5B model on one GPU runs faster with 0.
TEACHER_OFFLOAD=${TEACHER_OFFLOAD:-1}
GRAD_CKPT=${GRAD_CKPT:-1}

GROUP_BY_EXAMPLE=${GROUP_BY_EXAMPLE:-0}          # 1: an example's copies share a micro-batch (--group_by_example)
PACKING=${PACKING:-1}                            # 1: a micro-batch's rows run without padding (--packing_samples); 0: padded
# STOP_AT=UNIX_TIME: pause into a DeepSpeed checkpoint in CKPT_PATH at the first optimizer step after it (exit
# status 75); the same command again resumes (--stop_at, --load_checkpoint). LOAD_CHECKPOINT=1: resume from
# CKPT_PATH when it holds a checkpoint, else start. reproduce.py sets both (STOP_AT from its --stop_after).
STOP_AT=${STOP_AT:-}
LOAD_CHECKPOINT=${LOAD_CHECKPOINT:-0}

OPTIONAL=()
if [ "$TEACHER_OFFLOAD" = 1 ]; then OPTIONAL+=(--teacher_offload); fi
if [ "$GROUP_BY_EXAMPLE" = 1 ]; then OPTIONAL+=(--group_by_example); fi
if [ "$PACKING" = 1 ]; then OPTIONAL+=(--packing_samples); fi
if [ "$GRAD_CKPT" = 1 ]; then OPTIONAL+=(--gradient_checkpointing); fi
if [ -n "$STOP_AT" ]; then OPTIONAL+=(--stop_at "$STOP_AT"); fi
if [ -n "$STOP_AT" ] || [ "$LOAD_CHECKPOINT" = 1 ]; then
    # one pause checkpoint is enough to resume (a new one is complete before the old goes, kd/strategy.py);
    # a --max_ckpt_num among the extra arguments comes later and wins
    OPTIONAL+=(--load_checkpoint --max_ckpt_num 1)
fi

if ! command -v deepspeed > /dev/null; then
    echo "error: the deepspeed launcher is not on PATH (scripts/setup.sh installs it; with pip --target, add its bin/)" >&2
    exit 2
fi
if [ -z "${DS_ACCELERATOR:-}" ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    # said once here: DeepSpeed's own detection warns in each of its processes
    echo "== no GPU visible: training on the CPU (DS_ACCELERATOR=cpu)"
    export DS_ACCELERATOR=cpu
fi
LAUNCH=(deepspeed --master_port "$MASTER_PORT")
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # The launcher ignores CUDA_VISIBLE_DEVICES when --num_gpus is given and would start on GPU 0
    # whatever the caller chose: leave it to the launcher, which turns it into --include
    # (numeric ids only: it cannot parse GPU UUIDs or MIG names).
    visible=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
    if [ -n "$NUM_GPUS" ] && [ "$NUM_GPUS" != "$visible" ]; then
        echo "error: NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names $visible GPU(s)" >&2
        exit 2
    fi
elif [ -n "$NUM_GPUS" ]; then
    LAUNCH+=(--num_gpus "$NUM_GPUS")
fi

"${LAUNCH[@]}" kd/train_kd.py \
    --max_len "$MAX_LEN" \
    --dataset "$DATASET" \
    --data_root "$DATA_ROOT" \
    --input_key question \
    --output_key oracle_answer \
    --train_batch_size "$TRAIN_BATCH" \
    --micro_train_batch_size "$MICRO_BATCH" \
    --max_samples 500000 \
    --pretrain "$MODEL" \
    --teacher_model "$TEACHER" \
    --save_path "$SAVE_PATH" \
    --ckpt_path "$CKPT_PATH" \
    --save_steps -1 \
    --logging_steps 1 \
    --eval_steps -1 \
    --zero_stage "$ZERO_STAGE" \
    --max_epochs "$EPOCHS" \
    --l2 0.01 \
    --bf16 \
    --flash_attn \
    --kd_coef "$KD_COEF" \
    --learning_rate "$LR" \
    --apply_chat_template \
    --perserve "$PERSERVE" \
    --dataset_name "$DATASET_NAME" \
    --use_tensorboard "$TENSORBOARD" \
    "${OPTIONAL[@]}" \
    "$@"
