"""Benchmark of one KD training step: response-only logits (ours) vs full-sequence logits (naive).

One micro-batch step = student forward + backward, teacher forward (no grad), the project's
``DistillationLoss`` (``--kd_coef``, default 0,0,0,1 = Pos2Distill's adaptive loss), one AdamW
update. Plain PyTorch on one device, no DeepSpeed: this measures the step itself.

- ``ours``: ``kd.losses.response_logits`` (the LM head only at the response-predicting
  positions), teacher run once per distinct teacher input of the micro-batch (as
  ``kd.trainer.Pos2DistillTrainer.compute_losses``).
- ``naive`` (the reference approach): full ``[batch, seq, vocab]`` logits for student and
  teacher, upcast to fp32, teacher run for every row; the same loss on the response slice.

Each runs with ``--attention padded`` (the micro-batch as the trainer pads it, SDPA with a
padding mask) and/or ``packed`` (``--packing_samples``: the rows' real tokens as one sequence,
``kd.packed_attention``), so the logits' share and the attention layout's share are measured apart.

Reported per (variant, micro-batch): median step time, student tokens/s, MFU, peak GPU memory
of the step and the memory of the logits + loss computation alone.

    python benchmarks/bench_train.py --model Qwen2.5-Coder-0.5B-Instruct.gguf \
        --data qa_data/nq-open-20_total_documents.jsonl.gz --micro_batch_sizes 1 2 4 8 \
        --gradient_checkpointing --output bench_train.json
"""

import argparse
import gc
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import pick_device, profile_call, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.names import parse_kd_coef  # noqa: E402
from pos2distill.cli_args import require_at_least  # noqa: E402
from pos2distill.errors import UserError, run_cli  # noqa: E402
from pos2distill.model_shapes import shape_names  # noqa: E402
from benchmarks.train_engines import (PHASES, DeepSpeedUpdater, HostMemory, PhaseClock, TorchUpdater,  # noqa: E402
                                      engine_note)
from benchmarks.train_bench_inputs import (collate, compile_decoder_layers, load_model, real_items,  # noqa: E402
                                          set_attention, shape_models, synthetic_items)
from benchmarks.train_bench_report import ATTENTION, comparisons, fmt, table  # noqa: E402
from benchmarks.train_bench_step import (CudaMeter, attention_flops_per_pass, cpu_meter, loss_memory,  # noqa: E402
                                         non_embedding_params, peak_tflops, teacher_rows, time_steps, train_step)

VARIANTS = ("ours", "naive")
FLOPS_FORMULA = (
    "model FLOPs/step = 6 * N_student * student_tokens + 2 * N_teacher * teacher_tokens; "
    "N = non-embedding parameters (input embeddings and an untied LM head excluded), tokens = "
    "non-padding tokens actually run (teacher: distinct rows for ours, every row for naive). "
    "MFU = model FLOPs/step / step time / peak bf16 FLOP/s. MFU with attention adds the causal "
    "attention matmuls of the real tokens (PaLM's model FLOPs): 2 * S^2 * heads * head_dim per layer "
    "and row forward (QK^T and PV, half the square), times 3 for the student, 1 for the teacher. "
    "HFU (hardware FLOPs, attention included; packed rows only, as padded rows also compute their "
    "padding and the masked half of attention) also counts the forward that gradient checkpointing "
    "recomputes: + 2 * N_student * student_tokens + the student's attention forward once more"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="student: folder, hub id, .gguf file or SmolLM2-135M-Instruct (embedded)")
    parser.add_argument("--teacher", default=None, help="teacher model (default: a frozen copy of --model)")
    parser.add_argument("--shape", default=None, choices=shape_names(),
                        help="instead of --model/--teacher: random weights at this published shape "
                             "(pos2distill/model_shapes.py), built on the device, teacher = the same weights")
    parser.add_argument("--tokenizer", default=None,
                        help="with --shape: tokenizer folder or .gguf (default: the embedded SmolLM2's); cut to the "
                             "shape's vocabulary when larger (model_shapes.cut_tokenizer)")
    parser.add_argument("--engine", choices=("torch", "deepspeed"), default="torch",
                        help="torch (default): plain AdamW on the bf16 weights; deepspeed: the trainer's ZeRO engines "
                             "(kd.strategy.KDStrategy, one process), fp32 master weights as in training")
    parser.add_argument("--zero_stage", type=int, default=3, choices=(0, 1, 2, 3), help="with --engine deepspeed (default 3)")
    parser.add_argument("--adam_offload", action="store_true",
                        help="with --engine deepspeed: optimizer states on the host (DeepSpeedCPUAdam)")
    parser.add_argument("--teacher_offload", action="store_true",
                        help="with --engine deepspeed: the teacher's ZeRO-3 parameters on the host")
    parser.add_argument("--data", default=None,
                        help="an evaluation-format file (any format pos2distill.formats reads); "
                             "without it, synthetic token ids of --prompt_len")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt with --data")
    parser.add_argument("--teacher_position", type=int, default=0,
                        help="gold position the teacher sees (the advantageous one) with --data")
    parser.add_argument("--prompt_len", type=int, default=2400, help="synthetic prompt length in tokens")
    parser.add_argument("--response_len", type=int, default=8, help="synthetic response length incl. EOS")
    parser.add_argument("--copies_per_example", type=int, default=1,
                        help="consecutive rows sharing one teacher input (1: distinct examples, what the "
                             "shuffled trainer mostly sees; 5: all copies of an example in one micro-batch)")
    parser.add_argument("--micro_batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--attention", nargs="+", choices=ATTENTION, default=["padded"],
                        help="padded: SDPA with the padding mask, as the trainer runs without --packing_samples "
                             "(PACKING=0); packed: the rows without padding (--packing_samples, kd/packed_attention.py)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median reported)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step of each 'ours' configuration: top kernels and host operators")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every decoder layer of both models (dynamic shapes; the warm-up steps "
                             "pay for compilation), to measure what fusing the element-wise work would give")
    parser.add_argument("--compile_mode", default="default",
                        choices=("default", "max-autotune-no-cudagraphs"),
                        help="with --compile: torch.compile's mode; max-autotune-no-cudagraphs also times "
                             "Triton matmul templates against cuBLAS for each GEMM (a longer warm-up)")
    parser.add_argument("--kd_coef", default="0,0,0,1", help="kd,lm,rank,adaptive weights (kd/losses.py)")
    parser.add_argument("--learning_rate", type=float, default=1e-6)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s for MFU (default: from the GPU name)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    require_at_least(args, {"--total_doc": 1, "--prompt_len": 1, "--response_len": 1, "--copies_per_example": 1,
                            "--steps": 1, "--warmup": 0})
    if min(args.micro_batch_sizes) < 1:
        raise UserError(f"--micro_batch_sizes must be at least 1, got {args.micro_batch_sizes}")
    if not 0 <= args.teacher_position < args.total_doc:
        raise UserError(f"--teacher_position {args.teacher_position} outside 0..{args.total_doc - 1}")
    if args.engine != "deepspeed" and (args.adam_offload or args.teacher_offload):
        raise UserError("--adam_offload and --teacher_offload need --engine deepspeed")
    if args.engine == "deepspeed" and args.compile:
        raise UserError("--compile is measured with --engine torch only")
    if args.shape and args.teacher:
        raise UserError("--shape builds the teacher too; drop --teacher")
    args.kd_coef = parse_kd_coef(args.kd_coef)
    return args


# --------------------------------------------------------------------------- device


def _release(models) -> None:
    """After an out-of-memory error: drop gradients and cached blocks before the next config."""
    import torch

    models.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_config(args, variant, attention, micro_batch, batch, models, objective, device, counts, peak):
    import torch

    cuda = device.type == "cuda"
    student, teacher = models.hf_student, models.hf_teacher
    packed = attention == "packed"
    student_tokens = int(batch["student_attention_mask"].sum())
    teacher_mask = teacher_rows(batch, dedup=variant == "ours")[1]
    teacher_tokens = int(teacher_mask.sum())
    student_attention = attention_flops_per_pass(student, batch["student_attention_mask"].sum(-1).tolist())
    attention_flops = 3 * student_attention + attention_flops_per_pass(teacher, teacher_mask.sum(-1).tolist())
    # gradient checkpointing runs the student's forward twice: hardware FLOPs, not model FLOPs
    recomputed_flops = args.gradient_checkpointing * (2 * counts["student"] * student_tokens + student_attention)
    result = {
        "variant": variant,
        "attention": attention,
        "micro_batch_size": micro_batch,
        "student_tokens": student_tokens,
        "student_padded_tokens": int(batch["student_attention_mask"].numel()),
        "teacher_rows": int(teacher_mask.shape[0]),
        "teacher_tokens": teacher_tokens,
        "response_width": int(batch["labels"].shape[1]),
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else "tensor storages (dispatch mode)",
    }
    clock, host = PhaseClock(device), HostMemory()
    host.reset()

    def step():
        train_step(variant, packed, models, batch, objective, clock)
        return clock.durations()

    oom = False
    try:
        for _ in range(args.warmup):
            step()
        sync(device)
        if cuda:
            with CudaMeter(device) as meter:
                times = time_steps(step, args.steps)
            result["peak_memory_gib"] = (meter.before + meter.used) / 2**30
        else:
            times = time_steps(step, args.steps)
            with cpu_meter() as meter:  # one more step, untimed: the meter slows every op
                step()
            result["peak_memory_gib"] = None  # no allocator statistics for the CPU
        # above weights, optimizer state and anything else allocated before the step
        result["step_memory_gib"] = meter.used / 2**30
    except torch.OutOfMemoryError:
        oom = True
    result["host_peak_rss_gib"] = host.peak_bytes() / 2**30
    result["host_rss_source"] = host.source
    if oom:  # handled outside the except block: its traceback would pin the failed step's tensors
        _release(models)
        result["status"] = "OOM"
        return result
    if models.engine == "torch":  # under ZeRO-3 the LM heads are partitioned: not measured alone
        try:
            result["loss_memory_gib"] = loss_memory(variant, packed, student, teacher, batch, objective, device) / 2**30
        except torch.OutOfMemoryError:
            oom = True
        if oom:
            _release(models)
            result["loss_memory_gib"] = "OOM"
    totals = [sum(phases) for phases in times]
    seconds = statistics.median(totals)
    result["phase_seconds_median"] = {name: statistics.median(p[i] for p in times) for i, name in enumerate(PHASES)}
    flops = 6 * counts["student"] * student_tokens + 2 * counts["teacher"] * teacher_tokens
    result.update(
        status="ok",
        step_seconds_median=seconds,
        step_seconds_all=totals,
        student_tokens_per_s=student_tokens / seconds,
        samples_per_s=micro_batch / seconds,
        flops_per_step=flops,
        achieved_tflops=flops / seconds / 1e12,
        mfu=flops / seconds / (peak * 1e12) if peak else None,
        attention_flops_per_step=attention_flops,
        mfu_with_attention=(flops + attention_flops) / seconds / (peak * 1e12) if peak else None,
        # padded rows also compute their padding and the masked half of attention: not modelled, no HFU
        hardware_flops_per_step=flops + attention_flops + recomputed_flops if packed else None,
        hfu=(flops + attention_flops + recomputed_flops) / seconds / (peak * 1e12) if peak and packed else None,
    )
    if args.profile and variant == "ours" and not oom:
        print(f"{variant}, micro-batch {micro_batch}: one step profiled")
        try:
            result["profile"] = profile_call(step, device)
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block, as above
            _release(models)
            result["profile"] = "OOM"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- report


def main(argv):
    args = parse_args(argv)
    import torch

    from kd.losses import DistillationLoss
    from pos2distill.models import load_tokenizer, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    if args.shape:
        tokenizer, student, teacher = shape_models(args, device, dtype)
        student_path = teacher_path = f"shape {args.shape} (random weights, seed {args.seed})"
    else:
        student_path = resolve_model(args.model)
        teacher_path = resolve_model(args.teacher) if args.teacher else student_path
        tokenizer = load_tokenizer(student_path)
        student = load_model(student_path, device, dtype, True, args.gradient_checkpointing)
        teacher = load_model(teacher_path, device, dtype, False, False)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{student_path}: the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UserError("the teacher's vocabulary differs from the student's")
    counts = {"student": non_embedding_params(student), "teacher": non_embedding_params(teacher)}
    if args.compile:
        compile_decoder_layers(student, args.compile_mode)
        compile_decoder_layers(teacher, args.compile_mode)
    # fused AdamW keeps the optimizer step one kernel launch on GPUs, as DeepSpeed's FusedAdam does
    models = (DeepSpeedUpdater(student, teacher, args) if args.engine == "deepspeed"
              else TorchUpdater(student, teacher, args.learning_rate, device))
    setup_seconds = time.perf_counter() - began
    objective = DistillationLoss(args.kd_coef)

    largest = max(args.micro_batch_sizes)
    if args.data:
        items = real_items(args, tokenizer, largest)
        source = f"{args.data} ({args.total_doc} documents, teacher gold at {args.teacher_position})"
    else:
        items = synthetic_items(args, tokenizer, student.config.vocab_size, largest)
        source = f"synthetic ({args.prompt_len}-token prompts, {args.response_len}-token responses)"
    prompt_lengths = [len(it["student_ids"]) - it["response_len"] for it in items]

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype {str(dtype).replace('torch.', '')}, gradient checkpointing {args.gradient_checkpointing}, "
          f"compiled {args.compile}, attention {' and '.join(args.attention)}")
    print(f"engine: {engine_note(models)}; models ready in {setup_seconds:.1f} s")
    print(f"peak: {fmt(peak, '.0f')} TFLOP/s ({peak_source})")
    print(f"student {student_path}: N = {counts['student'] / 1e6:.1f}M non-embedding parameters; "
          f"teacher {teacher_path}: N = {counts['teacher'] / 1e6:.1f}M")
    print(f"data: {source}; student prompts {min(prompt_lengths)}-{max(prompt_lengths)} tokens "
          f"(mean {statistics.mean(prompt_lengths):.0f}); {args.copies_per_example} row(s) per teacher input")
    print(FLOPS_FORMULA)

    results = []
    for attention in args.attention:
        set_attention((student, teacher), attention,
                      max(max(len(it["student_ids"]), len(it["teacher_ids"])) for it in items))
        for micro_batch in args.micro_batch_sizes:
            batch = {k: v.to(device) for k, v in collate(items[:micro_batch], pad_id).items()}
            for variant in args.variants:
                results.append(run_config(args, variant, attention, micro_batch, batch, models, objective, device,
                                          counts, peak))
    ratios = comparisons(results)
    print()
    print("peak GiB: all allocated memory during the timed steps (CUDA only); step GiB: the step's peak above "
          "what was allocated before it; loss GiB: LM heads + loss + their backward alone (see loss_memory; "
          "torch engine only); teach / s f+b / opt ms: median teacher forward, student forward + loss + backward, "
          "optimizer update; host GiB: peak resident set of the process (" + HostMemory().source + ")")
    print(table(results))
    for row in ratios:
        label = f"mb {row['micro_batch_size']}, ours {row['ours_attention']} vs naive {row['naive_attention']}"
        if "tokens_per_s_ratio" in row:
            extra = "".join(f", {k.split('_ratio')[0].replace('_', ' ')} naive/ours {v:.2f}x"
                            for k, v in row.items() if k.endswith("naive_over_ours"))
            print(f"{label}: ours/naive tokens/s {row['tokens_per_s_ratio']:.2f}x{extra}")
        else:
            print(f"{label}: ours {row['ours']}, naive {row['naive']}")
    if args.output:
        report = {
            "benchmark": "bench_train",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": str(dtype).replace("torch.", ""),
            "peak_tflops": peak,
            "peak_tflops_source": peak_source,
            "flops_formula": FLOPS_FORMULA,
            "engine": engine_note(models),
            "setup_seconds": setup_seconds,
            "student": student_path,
            "teacher": teacher_path,
            "student_non_embedding_params": counts["student"],
            "teacher_non_embedding_params": counts["teacher"],
            "data": source,
            "student_prompt_tokens": {"min": min(prompt_lengths), "max": max(prompt_lengths),
                                      "mean": statistics.mean(prompt_lengths)},
            "results": results,
            "comparison": ratios,
        }
        write_report(args.output, report, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
