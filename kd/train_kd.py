"""Stage 3 of Pos2Distill: distil the advantageous position into the trivial ones.

Launch with DeepSpeed, as in the README (``deepspeed --master_port 6666 kd/train_kd.py ...``);
on a machine without GPUs the same command runs on CPU with gloo
(``deepspeed --num_gpus 1 kd/train_kd.py ...``). ``--kd_coef a,b,c,d`` mixes
total = a*kd + b*lm + c*rank + d*adaptive; ``0,0,0,1`` is Pos2Distill.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

if __name__ == "__main__" and not __package__:
    # Run as a script (that is how the deepspeed launcher starts it): import the package
    # from the repository root rather than the sibling files in kd/.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from kd.resume import PAUSED_EXIT, TrainingPaused, check_data_order, check_run_settings, data_order, run_settings
from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.flag_types import harden_numbers
from pos2distill.jsonl import replace_dir, write_text_atomic
from pos2distill.names import DEFAULT_SEED, check_names, checkpoint_name, parse_kd_coef
from pos2distill.output_guard import claim_output, refuse_output_is_input, releasing_locks
from pos2distill.replace_guard import check_replaceable, write_manifest

# What save_model writes: a model folder made before manifests may be replaced when it holds only these.
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.jinja", "*.txt", "*.model")

def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="stage-2 dataset folder, or its name under --data_root")
    data.add_argument("--data_root", default="data", help="where --dataset names are looked up")
    data.add_argument("--dataset_name", default=None, help="short name (nq, kv, ...): groups the TensorBoard runs (default: none)")
    data.add_argument("--input_key", default="question", help="column with the question (KV: the key)")
    data.add_argument("--output_key", default="oracle_answer", help="column with the teacher's answer")
    data.add_argument("--max_samples", type=int, default=1000000, help="use at most this many rows")
    data.add_argument("--max_len", type=int, default=32000, help="drop longer teacher/student sequences")
    data.add_argument("--apply_chat_template", action="store_true", help="use the tokenizer's chat template")
    data.add_argument("--group_by_example", action="store_true",
                      help="shuffle whole examples, not rows: an example's copies share a micro-batch and one "
                           "teacher forward (faster; changes the batch mix, see kd/example_sampler.py)")
    data.add_argument("--packing_samples", action="store_true",
                      help="run a micro-batch's rows as one sequence without padding, attention within each row "
                           "(kd/packed_attention.py: torch's varlen flash kernel on CUDA, flash-attn not needed); "
                           "the same losses, a 1.6-1.7x shorter training loop on an H200 (docs/performance.md)")

    kd = parser.add_argument_group("distillation")
    kd.add_argument("--pretrain", required=True, help="student model (folder or hub id)")
    kd.add_argument("--teacher_model", default=None, help="teacher model (default: --pretrain)")
    kd.add_argument("--kd_coef", default="0.0,0.0,0.0,1.0", help="a,b,c,d: a*kd + b*lm + c*rank + d*adaptive")
    kd.add_argument("--perserve", type=float, default=1.0, help="lambda: anchor weight in the adaptive loss")
    kd.add_argument("--adaptive_legacy_scale", action="store_true",
                    help="adaptive loss as before issue 16, only to reproduce earlier runs: sum_i w_i KL_i per "
                         "micro-batch, weights per micro-batch (default: off, the reference's 8 GPUs x 4 gradient "
                         "in every layout; kd/losses.py adaptive_scale)")
    kd.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL losses")
    kd.add_argument("--rank_top_k", type=int, default=20, help="teacher top-k ids of the rank loss")
    kd.add_argument("--teacher_offload", action="store_true", help="ZeRO-3 parameter offload to CPU for the teacher")
    kd.add_argument("--max_consecutive_skips", type=int, default=5,
                    help="abort after this many optimizer steps in a row with non-finite loss or gradients")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max_epochs", type=int, default=1, help="passes over the dataset")
    optim.add_argument("--learning_rate", type=float, default=3e-6, help="peak AdamW learning rate")
    optim.add_argument("--lr_scheduler", default="cosine_with_min_lr", help="transformers scheduler name")
    optim.add_argument("--lr_warmup_ratio", type=float, default=0.05, help="fraction of the steps spent warming up")
    optim.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of --learning_rate")
    optim.add_argument("--l2", type=float, default=0.01, help="AdamW weight decay")
    optim.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW beta1 beta2")
    optim.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping")
    optim.add_argument("--train_batch_size", type=int, default=32, help="global batch (all processes)")
    optim.add_argument("--micro_train_batch_size", type=int, default=4, help="batch per process and forward")
    optim.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help=f"data order, initialisation and dropout (default {DEFAULT_SEED}; another seed adds "
                            "_seed{N} to the output folder name)")
    optim.add_argument("--full_determinism", action="store_true", help="deterministic kernels (transformers.enable_full_determinism; slower)")

    ds = parser.add_argument_group("deepspeed")
    ds.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ds.add_argument("--zero_stage", type=int, default=3, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    ds.add_argument("--bf16", action="store_true", help="bf16 weights and compute (GPUs; CPU runs stay fp32)")
    ds.add_argument("--flash_attn", action="store_true",
                    help="flash_attention_2 when flash-attn is installed; otherwise SDPA with a warning")
    ds.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    ds.add_argument("--gradient_checkpointing_use_reentrant", action="store_true", help="the reentrant variant of checkpointing")
    ds.add_argument("--adam_offload", action="store_true", help="optimizer states on CPU (DeepSpeedCPUAdam)")
    ds.add_argument("--zpg", type=int, default=1, help="ZeRO++ partition size")
    ds.add_argument("--grad_accum_dtype", default=None, help="DeepSpeed gradient accumulation dtype (default: DeepSpeed's)")
    ds.add_argument("--overlap_comm", action="store_true", help="DeepSpeed: overlap gradient reduction with backward")
    ds.add_argument("--disable_fast_tokenizer", action="store_true", help="load the slow (Python) tokenizer")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=0, help="LoRA rank of the student (0: full fine-tuning)")
    lora.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling alpha")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--target_modules", nargs="*", default="all-linear", help="modules that get LoRA adapters")

    ckpt = parser.add_argument_group("checkpoints and logs")
    ckpt.add_argument("--save_path", default="checkpoints", help="saves SAVE_PATH/{dataset}_kd..._{perserve}")
    ckpt.add_argument("--overwrite", action="store_true",
                      help="replace an existing SAVE_PATH/{run} folder (default: refuse); files this project did not "
                           "write are never deleted")
    ckpt.add_argument("--save_steps", type=int, default=-1, help="DeepSpeed checkpoint every N steps (-1: never)")
    ckpt.add_argument("--ckpt_path", default="./ckpt/checkpoints_kd", help="DeepSpeed checkpoints, for resuming")
    ckpt.add_argument("--max_ckpt_num", type=int, default=3, help="DeepSpeed checkpoints kept in --ckpt_path")
    ckpt.add_argument("--max_ckpt_mem", type=float, default=1e8, help="GiB of DeepSpeed checkpoints kept in --ckpt_path")
    ckpt.add_argument("--load_checkpoint", action="store_true", help="resume from the latest checkpoint in --ckpt_path")
    ckpt.add_argument("--stop_at", type=float, default=None, metavar="UNIX_TIME",
                      help="the first optimizer step to end after this time writes a checkpoint to --ckpt_path and "
                           "the run exits with status 75; rerun with --load_checkpoint to go on (default: never)")
    ckpt.add_argument("--save_hf_ckpt", action="store_true", help="also save an HF folder per checkpoint")
    ckpt.add_argument("--disable_ds_ckpt", action="store_true", help="no DeepSpeed checkpoints (only HF ones with --save_hf_ckpt)")
    ckpt.add_argument("--check_saved_logits", action="store_true",
                      help="after saving, compare every saved tensor (LoRA: every adapter tensor) with the "
                           "trained model's bit for bit, and report the reloaded folder's logits against the "
                           "trained model's on one row (kd/save_check.py; writes save_check.json; default off)")
    ckpt.add_argument("--logging_steps", type=int, default=1, help="log losses every N optimizer steps")
    ckpt.add_argument("--eval_steps", type=int, default=-1, help="accepted for compatibility; stage 3 has no eval set")
    ckpt.add_argument("--use_tensorboard", default=None, metavar="DIR", help="write TensorBoard scalars under DIR (default: off)")
    ckpt.add_argument("--use_wandb", default=None, metavar="KEY", help="log to Weights & Biases with this API key (default: off)")
    ckpt.add_argument("--wandb_org", default=None, help="W&B entity (default: the key's)")
    ckpt.add_argument("--wandb_group", default=None, help="W&B run group (default: none)")
    ckpt.add_argument("--wandb_project", default="pos2distill", help="W&B project")
    ckpt.add_argument("--wandb_run_name", default=None, help="default: the output folder name")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return harden_numbers(parser)  # nan, inf and 1_0 refused while parsing


def parse_args(argv):
    args = build_parser().parse_args(argv)
    check_names(args, "--dataset_name", "--wandb_run_name")  # they name log folders
    args.kd_coef = parse_kd_coef(args.kd_coef)
    for flag in ("train_batch_size", "micro_train_batch_size", "max_len", "max_epochs", "max_samples",
                 "max_consecutive_skips", "rank_top_k", "logging_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.temperature <= 0 or args.perserve < 0:
        raise UserError("--temperature must be positive and --perserve non-negative")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    for flag in ("lr_warmup_ratio", "min_lr_ratio"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UserError(f"--{flag} must be in [0, 1], got {getattr(args, flag)}")
    if args.l2 < 0 or args.max_norm < 0 or not all(0 <= b < 1 for b in args.adam_betas):
        raise UserError("--l2 and --max_norm must be non-negative and --adam_betas in [0, 1)")
    if args.stop_at is not None and args.disable_ds_ckpt:
        raise UserError("--stop_at pauses into a DeepSpeed checkpoint; it cannot go with --disable_ds_ckpt")
    args.teacher_model = args.teacher_model or args.pretrain
    args.run_name = checkpoint_name(args.dataset, args.kd_coef, args.perserve, args.seed)
    args.output_dir = os.path.join(args.save_path, args.run_name)
    if args.wandb_run_name is None:
        args.wandb_run_name = os.path.join(args.dataset_name, args.run_name) if args.dataset_name else args.run_name
    return args


def attention_implementation(want_flash: bool, strategy, packing: bool = False) -> str:
    """The attention the models are loaded with.

    Packed rows always use this project's kernel (``kd.packed_attention``: torch's varlen
    flash attention on CUDA), with or without flash-attn installed. Padded rows use
    flash_attention_2 when asked for and usable, SDPA otherwise.
    """
    from transformers.utils import is_flash_attn_2_available

    from kd.flash_attn_fallback import flash_attn_installed
    from kd.packed_attention import register_packed_attention, varlen_kernel_available

    if packing:
        import torch

        if torch.cuda.is_available() and not varlen_kernel_available():
            strategy.print(f"warning: torch {torch.__version__} has no variable-length flash attention (torch >= 2.9): "
                           "packed rows fall back to per-row SDPA, which can be slower than PACKING=0")
        return register_packed_attention()
    if not want_flash:
        return "sdpa"
    if flash_attn_installed() and is_flash_attn_2_available():
        return "flash_attention_2"
    strategy.print("warning: --flash_attn requested but flash-attn is not usable here; using SDPA attention")
    return "sdpa"


def attention_kernel(attn: str, use_cuda: bool) -> str:
    """The kernel behind an attention implementation name, for the log."""
    from kd.packed_attention import PACKED_ATTENTION, varlen_kernel_available

    if attn == PACKED_ATTENTION:
        return "packed rows, " + ("torch varlen flash" if use_cuda and varlen_kernel_available() else "SDPA per row")
    return attn


def enable_checkpointing(hf_model, use_reentrant: bool) -> None:
    """transformers >= 5.23 renamed it (the old name warns there); older releases, e.g. the 5.17 of
    the H200 box, know only ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_training_data(args):
    """Models resolved, the stage-2 dataset tokenized and filtered by --max_len.

    Runs before DeepSpeed is imported or a model is loaded: bad data or paths fail in
    seconds with a one-line error.
    """
    from kd.pair_dataset import PairDataset, load_pairs, resolve_dataset_path
    from pos2distill.models import load_tokenizer, resolve_model

    dataset_path = resolve_dataset_path(args.dataset, args.data_root)
    # Folder, hub id, .gguf file or the embedded default, as in the other stages.
    args.pretrain = resolve_model(args.pretrain)
    args.teacher_model = resolve_model(args.teacher_model)
    # The same loading as OpenRLHF's get_tokenizer, which runs again once the model is there.
    tokenizer = load_tokenizer(args.pretrain, trust_remote_code=True, use_fast=not args.disable_fast_tokenizer)
    rows = load_pairs(dataset_path, args.input_key, args.output_key, args.max_samples)
    if len(rows) == 0:
        raise UserError(f"{dataset_path}: the dataset has no rows")
    dataset = PairDataset(rows, tokenizer, args.max_len, args.input_key, args.output_key, args.apply_chat_template)
    if len(dataset) == 0:
        raise UserError(
            f"{dataset_path}: no rows left after --max_len {args.max_len} filtering "
            f"(all {dataset.dropped} rows are longer); raise --max_len"
        )
    if len(dataset) < args.train_batch_size:
        raise UserError(
            f"{dataset_path}: {len(dataset)} usable rows ({dataset.dropped} dropped by --max_len {args.max_len}) "
            f"are fewer than --train_batch_size {args.train_batch_size}"
        )
    return dataset_path, rows, dataset


def claim_save_path(args) -> None:
    """The model folder's checks and lock, before any data or model is loaded."""
    from kd.pair_dataset import resolve_dataset_path

    inputs = {"--pretrain": args.pretrain, "--teacher_model": args.teacher_model,
              "--dataset": resolve_dataset_path(args.dataset, args.data_root)}
    refuse_output_is_input({"--save_path": args.output_dir}, inputs)
    check_replaceable(args.output_dir, args.overwrite, MODEL_FILES)
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run: rank 0 writes the folder
        claim_output(args.output_dir, inputs, folder=True, flag="--save_path")
        if args.load_checkpoint or args.stop_at is not None or (args.save_steps > 0 and not args.disable_ds_ckpt):
            # DeepSpeed checkpoints: two runs on one --ckpt_path (a default) would interleave steps
            claim_output(args.ckpt_path, inputs, folder=True, flag="--ckpt_path")


def train(args) -> None:
    # Wall time per phase, printed as it goes: start-up cost is a large share of short runs.
    last = time.perf_counter()

    def lap() -> str:
        nonlocal last
        now = time.perf_counter()
        seconds, last = now - last, now
        return f"{seconds:.1f} s"

    dataset_path, rows, dataset = load_training_data(args)
    data_time = lap()

    from transformers import get_scheduler

    from kd import flash_attn_fallback
    from kd.strategy import KDStrategy
    from kd.example_sampler import ExampleGroupedSampler, teacher_groups
    from kd.trainer import Pos2DistillTrainer

    flash_attn_fallback.import_openrlhf()  # before the first openrlhf import
    from openrlhf.utils import get_tokenizer

    strategy = KDStrategy(args)
    strategy.setup_distributed()

    if args.packing_samples:  # from the configs alone, before two models are loaded for nothing
        from transformers import AutoConfig

        from kd.packed_attention import check_packable

        for path in dict.fromkeys((args.pretrain, args.teacher_model)):
            check_packable(AutoConfig.from_pretrained(path, trust_remote_code=True), args.max_len)
    attn = attention_implementation(args.flash_attn, strategy, args.packing_samples)
    args.attention = attention_kernel(attn, strategy.use_cuda)
    # What runs, not what was asked: --bf16 and --flash_attn give way on a CPU or without flash-attn.
    shown = {k: v for k, v in vars(args).items() if k not in ("bf16", "flash_attn")}
    strategy.print("config: " + json.dumps(shown, indent=2, sort_keys=True, default=str))
    strategy.print(f"runs: {args.param_dtype} weights and compute, attention {args.attention}"
                   + (" (--bf16 applies on GPUs only)" if args.bf16 and args.param_dtype != "bf16" else ""))
    model = strategy.load_actor(args.pretrain, strategy.get_ds_train_config(is_actor=True), args.lora_rank, attn)
    teacher_config = strategy.get_ds_eval_config(offload=args.teacher_offload)
    teacher = strategy.load_actor(args.teacher_model, teacher_config, 0, attn)
    teacher._offload = args.teacher_offload  # read by strategy.prepare: ZeRO-3 param offload
    teacher.eval()
    teacher.requires_grad_(False)
    if teacher.model.config.vocab_size != model.model.config.vocab_size:
        raise UserError(
            f"teacher vocabulary ({teacher.model.config.vocab_size}) differs from the student's "
            f"({model.model.config.vocab_size}); the teacher must share the student's tokenizer"
        )
    # The collate pads by itself; "left" is what the saved tokenizer should offer for generation.
    tokenizer = get_tokenizer(args.pretrain, model.model, "left", strategy, use_fast=not args.disable_fast_tokenizer)
    strategy.print(f"timing: data {data_time}, student and teacher loaded in {lap()}")

    strategy.print(
        f"{dataset_path}: {len(dataset)} of {len(rows)} rows used; {dataset.dropped} dropped as longer than "
        f"--max_len {args.max_len}; {dataset.empty_answers} with an empty first answer line (response = EOS)"
    )
    steps_per_epoch = len(dataset) // args.train_batch_size  # at least 1: checked in load_training_data
    sampler = None
    if args.group_by_example:
        groups = teacher_groups([item["teacher_ids"] for item in dataset.items])
        sampler = ExampleGroupedSampler(groups, args.micro_train_batch_size, strategy.world_size,
                                        strategy.get_rank(), seed=args.seed)
        strategy.print(f"--group_by_example: {len(groups)} examples ({len(dataset) / len(groups):.1f} rows each)")
    dataloader = strategy.setup_dataloader(
        dataset, args.micro_train_batch_size, strategy.use_cuda, True, dataset.collate_fn, sampler=sampler
    )

    optim = strategy.create_optimizer(model, lr=args.learning_rate, betas=tuple(args.adam_betas), weight_decay=args.l2)
    max_steps = math.ceil(args.max_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        args.lr_scheduler,
        optim,
        num_warmup_steps=math.ceil(max_steps * args.lr_warmup_ratio),
        num_training_steps=max_steps,
        scheduler_specific_kwargs={"min_lr": args.learning_rate * args.min_lr_ratio}
        if args.lr_scheduler == "cosine_with_min_lr" else {},
    )
    if args.gradient_checkpointing:
        enable_checkpointing(model.model, args.gradient_checkpointing_use_reentrant)
    (model, optim, scheduler), teacher = strategy.prepare((model, optim, scheduler), teacher)
    strategy.print(f"timing: optimizer and DeepSpeed engines ready in {lap()}")

    consumed_samples, skipped_steps, consecutive_skips = 0, 0, 0
    # Saved with every DeepSpeed checkpoint (client state) and compared on resume.
    args.data_order = data_order(args, dataset_path, len(dataset), strategy.world_size)
    args.run_settings = run_settings(args)
    if args.load_checkpoint and not os.path.isfile(os.path.join(args.ckpt_path, "latest")):
        strategy.print(f"--load_checkpoint: no DeepSpeed checkpoint in {args.ckpt_path} yet, starting from scratch")
    elif args.load_checkpoint:
        _, states = strategy.load_ckpt(model.model, args.ckpt_path)
        check_data_order(states.get("data_order"), args.data_order, args.ckpt_path)
        if states.get("settings") is None:
            strategy.print(f"warning: {args.ckpt_path} records no settings (an older run): models, losses and "
                           "schedule are not checked against this run's")
        check_run_settings(states.get("settings"), args.run_settings, args.ckpt_path)
        consumed_samples = states["consumed_samples"]
        skipped_steps = states.get("skipped_steps", 0)
        consecutive_skips = states.get("consecutive_skips", 0)
        strategy.print(f"resumed from {args.ckpt_path}: {consumed_samples} samples consumed")

    trainer = Pos2DistillTrainer(model, teacher, strategy, optim, dataloader, scheduler, tokenizer, args, skipped_steps,
                                 consecutive_skips)
    trainer.fit(args, consumed_samples, steps_per_epoch)
    strategy.print(f"timing: training loop {lap()}")

    # Written under a temporary name and renamed: no half-written checkpoint under the final name.
    partial = f"{args.output_dir}.partial"
    if strategy.is_rank_0():  # only rank 0 writes the folder; drop what a killed run left
        shutil.rmtree(partial, ignore_errors=True)
    strategy.save_model(model, tokenizer, partial)
    if strategy.is_rank_0():
        write_text_atomic(os.path.join(partial, "kd_args.json"), json.dumps(vars(args), indent=2, sort_keys=True, default=str))
        write_manifest(partial, "kd/train_kd.py")
        check_replaceable(args.output_dir, args.overwrite, MODEL_FILES)  # again: files added during training
        replace_dir(partial, args.output_dir)
    strategy.print(f"saved {args.output_dir} in {lap()} ({trainer.skipped_steps} optimizer steps skipped)")
    if args.check_saved_logits:
        from kd.save_check import check_saved_logits

        strategy.barrier()  # the folder is in place before rank 0 reads it
        check_saved_logits(strategy, model, dataset, args.output_dir, args.packing_samples)
        strategy.print(f"timing: save check {lap()}")


def leave_process_group() -> None:
    """End the process group in order once every rank is done. Left to interpreter exit, gloo's
    threads were at times torn down under a live group, aborting a rank of a finished run
    ("terminate called without an active exception", exit -6; CI, 2026-12-04)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@releasing_locks
def main(argv=None) -> int:
    args = parse_args(argv)
    claim_save_path(args)
    try:
        train(args)
    except TrainingPaused as paused:
        print(paused, flush=True)
        leave_process_group()
        return PAUSED_EXIT
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
