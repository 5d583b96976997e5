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
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import causal_attention_flops, pick_device, profile_call, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.names import parse_kd_coef  # noqa: E402
from pos2distill.cli_args import require_at_least  # noqa: E402
from pos2distill.errors import UserError, run_cli  # noqa: E402
from pos2distill.model_shapes import shape_names  # noqa: E402
from benchmarks.train_engines import (PHASES, DeepSpeedUpdater, HostMemory, PhaseClock, TorchUpdater,  # noqa: E402
                                      engine_note)

VARIANTS = ("ours", "naive")
ATTENTION = ("padded", "packed")
# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
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


def peak_tflops(device, override):
    """(peak bf16 TFLOP/s or None, where it came from)."""
    import torch

    if override is not None:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "CPU: no known peak (pass --peak_tflops for an MFU figure)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{name}: {key} dense bf16 peak from NVIDIA's data sheet"
    return None, f"{name}: unknown GPU (pass --peak_tflops for an MFU figure)"


# --------------------------------------------------------------------------- models


def load_model(path: str, device, dtype, train: bool, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    return set_mode(model, train, gradient_checkpointing)


def set_mode(model, train: bool, gradient_checkpointing: bool):
    model.config.use_cache = False
    if train:
        model.train()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def shape_models(args, device, dtype):
    """--shape: (tokenizer, student, teacher), both models built on ``device`` with the same weights."""
    import tempfile

    from pos2distill.model_shapes import load_shape_tokenizer, model_for_shape, resolve_tokenizer
    from pos2distill.models import embedded_tokenizer_dir

    source = resolve_tokenizer(args.tokenizer) if args.tokenizer else embedded_tokenizer_dir()
    with tempfile.TemporaryDirectory() as work:
        tokenizer = load_shape_tokenizer(args.shape, source, work)

    def build(train, checkpointing):
        model = model_for_shape(args.shape, tokenizer, device, dtype, args.seed)
        model.set_attn_implementation("sdpa")
        return set_mode(model, train, checkpointing)

    return tokenizer, build(True, args.gradient_checkpointing), build(False, False)


def compile_decoder_layers(model, mode: str = "default") -> None:
    """Regional compilation: torch.compile each decoder layer in place, not the whole model.

    The layers run the same code, so one compiled graph serves all of them (and the teacher's);
    a whole-model compile traces every layer and the mask code, for the student's forward and
    backward and the teacher's forward: on an H200 it had not finished its warm-up after 10
    minutes (docs/performance.md, fifth session).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise UserError(f"--compile: {type(model).__name__} has no model.layers (decoder layers) to compile")
    for layer in layers:
        layer.compile(dynamic=True, mode=mode)


def set_attention(models, attention: str, longest: int) -> None:
    """Switch the models between SDPA on padded rows and the packed-rows kernel."""
    from kd.packed_attention import check_packable, register_packed_attention

    name = register_packed_attention() if attention == "packed" else "sdpa"
    for model in models:
        if attention == "packed":
            check_packable(model.config, longest)
        model.set_attn_implementation(name)


def attention_flops_per_pass(model, lengths) -> int:
    """Causal attention matmul FLOPs of one forward over rows of these real lengths (all layers)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * causal_attention_flops(lengths, config.num_attention_heads, head_dim)


def non_embedding_params(model) -> int:
    """Parameters outside the input embedding and an untied output head (Kaplan's N)."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# --------------------------------------------------------------------------- micro-batches


def _response_ids(tokenizer, answer: str) -> list:
    from pos2distill.metrics import first_line

    return tokenizer(first_line(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def real_items(args, tokenizer, count: int) -> list:
    """``count`` rows from ``--data``: student prompt with the gold document at a trivial
    position, teacher prompt with it at ``--teacher_position``, response = first gold answer + EOS.
    Tokenized as ``kd.pair_dataset.PairDataset`` does with ``--apply_chat_template``."""
    from pos2distill.formats import load_examples
    from pos2distill.position_eval import prompt_examples

    needed = math.ceil(count / args.copies_per_example)
    examples = load_examples(args.data, total_doc=args.total_doc, limit=needed)
    if not examples:
        raise UserError(f"{args.data}: no examples")
    trivial = [p for p in range(args.total_doc) if p != args.teacher_position] or [args.teacher_position]
    stride = max(1, len(trivial) // args.copies_per_example)

    def ids(example, example_id, position):
        prompt = prompt_examples(tokenizer, [example], [example_id], position, args.seed)[0].prompt
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]

    items = []
    for row in range(count):
        # Fewer examples than rows: reuse them (the file is short), each still a distinct row.
        example_id = (row // args.copies_per_example) % len(examples)
        copy = row % args.copies_per_example
        example = examples[example_id]
        position = trivial[(example_id + copy * stride) % len(trivial)]
        response = _response_ids(tokenizer, example.answers[0] if example.answers else "")
        items.append({
            "student_ids": ids(example, example_id, position) + response,
            "teacher_ids": ids(example, example_id, args.teacher_position) + response,
            "response_len": len(response),
            "gold_idx": position,
            "is_anchor": False,
        })
    return items


def synthetic_items(args, tokenizer, vocab_size: int, count: int) -> list:
    """``count`` rows of random prompt ids of ``--prompt_len``; copies share a teacher prompt."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)

    def draw(n):
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    items = []
    for row in range(count):
        if row % args.copies_per_example == 0:  # a new example: its teacher prompt and response
            teacher = draw(args.prompt_len)
            response = draw(args.response_len - 1) + [tokenizer.eos_token_id]
        items.append({
            "student_ids": draw(args.prompt_len) + response,
            "teacher_ids": teacher + response,
            "response_len": args.response_len,
            "gold_idx": 1 + row % 4,
            "is_anchor": False,
        })
    return items


def collate(items: list, pad_id: int) -> dict:
    """The trainer's collate (``PairDataset.collate_fn``) on hand-made rows."""
    from types import SimpleNamespace

    from kd.pair_dataset import PairDataset

    return PairDataset.collate_fn(SimpleNamespace(pad_token_id=pad_id), items)


# --------------------------------------------------------------------------- the step


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _teacher_rows(batch: dict, dedup: bool) -> tuple:
    if dedup:
        return batch["teacher_input_ids"], batch["teacher_attention_mask"]
    index = batch["teacher_index"]
    return batch["teacher_input_ids"][index], batch["teacher_attention_mask"][index]


def _forward_and_selector(model, ids, mask, width, packed):
    """``model`` (a causal LM or its decoder) on the rows, padded or packed, and a function that picks
    the response-predicting ``width + 1`` positions of every row from a per-position output."""
    from kd.packed_attention import pack_rows, packed_forward, response_positions

    if not packed:
        output = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        return output, lambda x: x[:, -(width + 1):]
    pack = pack_rows(ids, mask)
    positions = response_positions(pack, width)
    return packed_forward(model, pack), lambda x: x[0][positions].view(ids.shape[0], width + 1, -1)


def full_logits(model, ids, mask, width, packed):
    """fp32 logits at every position, then the response-predicting ones (``[batch, width, vocab]``)."""
    output, select = _forward_and_selector(model, ids, mask, width, packed)
    return select(output.logits.float())[:, :-1]


def teacher_logits(variant, teacher, batch, width, packed):
    """No grad. ours: ``response_logits`` once per distinct teacher input, mapped back to the rows
    (as ``kd.losses.student_teacher_logits``); naive: full fp32 logits for every row."""
    import torch

    from kd.losses import response_logits

    with torch.no_grad():
        if variant == "naive":
            return full_logits(teacher, *_teacher_rows(batch, dedup=False), width, packed)
        logits = response_logits(teacher, *_teacher_rows(batch, dedup=True), width, packed)
        rows = batch["student_input_ids"].shape[0]
        return logits[batch["teacher_index"]] if logits.shape[0] != rows else logits


def student_logits(variant, student, batch, width, packed):
    from kd.losses import response_logits

    logits = full_logits if variant == "naive" else response_logits
    return logits(student, batch["student_input_ids"], batch["student_attention_mask"], width, packed)


def _loss(objective, student_logits, teacher_logits, batch):
    return objective(student_logits, teacher_logits, batch["labels"], batch["response_mask"],
                     batch["gold_idx"], batch["is_anchor"])["total"]


def train_step(variant, packed, models, batch, objective, clock):
    """One step in the phases of ``PHASES``, ``clock`` marked between them: teacher forward, student
    forward + loss + backward, optimizer update (``models``: a train_engines updater)."""
    width = batch["labels"].shape[1]
    clock.mark()
    teacher = teacher_logits(variant, models.teacher, batch, width, packed)
    clock.mark()
    models.backward(_loss(objective, student_logits(variant, models.student, batch, width, packed), teacher, batch))
    clock.mark()
    models.step()
    clock.mark()


class CudaMeter:
    """Peak CUDA memory allocated inside the ``with`` block above what was allocated at its start."""

    def __init__(self, device):
        self.device = device
        self.used = None

    def __enter__(self):
        import torch

        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        sync(self.device)
        self.used = torch.cuda.max_memory_allocated(self.device) - self.before


def cpu_meter():
    """Peak bytes of tensor storage allocated inside the ``with`` block and alive at once.

    torch keeps no allocator statistics for the CPU: a dispatch mode sees every op's outputs,
    counts each new storage once, and a finalizer subtracts it when the storage is freed.
    Outputs that alias an input (views, in-place ops) are not new memory.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def pointers(tree):
        return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}

    class CpuMeter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.current, self.used = {}, 0, 0

        def _free(self, key):
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = pointers((args, kwargs))
            for tensor in tree_leaves(out):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in inputs and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.used = max(self.used, self.current)
                    weakref.finalize(storage, self._free, key)
            return out

    return CpuMeter()


def memory_meter(device):
    return CudaMeter(device) if device.type == "cuda" else cpu_meter()


def _hidden_and_selector(model, ids, mask, width, packed):
    """The decoder's last hidden states (no grad) and the selector of :func:`_forward_and_selector`."""
    import torch

    with torch.no_grad():
        output, select = _forward_and_selector(model.get_decoder(), ids, mask, width, packed)
    return output.last_hidden_state, select


def loss_memory(variant, packed, student, teacher, batch, objective, device) -> int:
    """Bytes the logits + loss computation (forward and backward) needs above what was allocated
    before it: the backbones run first (no grad), then the LM heads, the loss and its backward
    down to the last hidden states are measured. ``ours`` applies the head to the last
    ``width + 1`` positions as ``response_logits`` does; ``naive`` to every position, in fp32."""
    import torch

    width = batch["labels"].shape[1]
    dedup = variant == "ours"
    t_hidden, t_select = _hidden_and_selector(teacher, *_teacher_rows(batch, dedup), width, packed)
    s_hidden, s_select = _hidden_and_selector(student, batch["student_input_ids"], batch["student_attention_mask"],
                                              width, packed)
    hidden = s_hidden.detach().requires_grad_()
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    with memory_meter(device) as meter:
        if dedup:
            student_logits = s_head(s_select(hidden))[:, :-1]
            with torch.no_grad():
                teacher_logits = t_head(t_select(t_hidden))[:, :-1]
                if teacher_logits.shape[0] != student_logits.shape[0]:
                    teacher_logits = teacher_logits[batch["teacher_index"]]
        else:
            student_logits = s_select(s_head(hidden).float())[:, :-1]
            with torch.no_grad():
                teacher_logits = t_select(t_head(t_hidden).float())[:, :-1]
        _loss(objective, student_logits, teacher_logits, batch).backward()
        del student_logits, teacher_logits
    student.zero_grad(set_to_none=True)
    return meter.used


def time_steps(step, n: int) -> list:
    """Seconds per phase (``PHASES``) of ``n`` steps, one list per step."""
    return [step() for _ in range(n)]


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
    teacher_mask = _teacher_rows(batch, dedup=variant == "ours")[1]
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


def _ratios(ours: dict, naive: dict) -> dict:
    row = {"tokens_per_s_ratio": ours["student_tokens_per_s"] / naive["student_tokens_per_s"]}
    for key in ("peak_memory_gib", "step_memory_gib", "loss_memory_gib"):
        if isinstance(ours.get(key), float) and isinstance(naive.get(key), float) and ours[key] > 0:
            row[key.replace("_gib", "_ratio_naive_over_ours")] = naive[key] / ours[key]
    return row


def comparisons(results: list) -> list:
    """ours vs naive at equal micro-batch: with the same attention layout, and ours packed vs naive
    padded (the reference's layout without flash-attn) when both layouts ran."""
    by_key = {(r["variant"], r.get("attention", "padded"), r["micro_batch_size"]): r for r in results}
    pairs = [(a, a) for a in ATTENTION] + [("packed", "padded")]
    out = []
    for micro_batch in sorted({r["micro_batch_size"] for r in results}):
        for ours_attention, naive_attention in pairs:
            ours = by_key.get(("ours", ours_attention, micro_batch))
            naive = by_key.get(("naive", naive_attention, micro_batch))
            if ours is None or naive is None:
                continue
            row = {"micro_batch_size": micro_batch, "ours_attention": ours_attention,
                   "naive_attention": naive_attention, "ours": ours["status"], "naive": naive["status"]}
            if ours["status"] == naive["status"] == "ok":
                row.update(_ratios(ours, naive))
            out.append(row)
    return out


def _fmt(value, spec):
    if isinstance(value, str):  # "OOM"
        return value
    return "-" if value is None else format(value, spec)


def table(results: list) -> str:
    lines = [f"{'variant':<7} {'attention':<9} {'mb':>3} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU %':>6} "
             f"{'+attn %':>7} {'HFU %':>6} {'peak GiB':>9} {'step GiB':>9} {'loss GiB':>9} "
             f"{'teach ms':>9} {'s f+b ms':>9} {'opt ms':>8} {'host GiB':>9}"]
    for r in results:
        head = f"{r['variant']:<7} {r.get('attention', 'padded'):<9} {r['micro_batch_size']:>3}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']:>9}")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        mfu_attn = None if r.get("mfu_with_attention") is None else 100 * r["mfu_with_attention"]
        hfu = None if r.get("hfu") is None else 100 * r["hfu"]
        lines.append(
            f"{head} {1000 * r['step_seconds_median']:>9.1f} "
            f"{r['student_tokens_per_s']:>10.0f} {r['achieved_tflops']:>8.2f} {_fmt(mfu, '6.1f'):>6} "
            f"{_fmt(mfu_attn, '7.1f'):>7} {_fmt(hfu, '6.1f'):>6} {_fmt(r['peak_memory_gib'], '9.2f'):>9} "
            f"{_fmt(r['step_memory_gib'], '9.3f'):>9} {_fmt(r.get('loss_memory_gib'), '9.3f'):>9} "
            + " ".join(f"{1000 * r['phase_seconds_median'][name]:>{w}.1f}" for name, w in zip(PHASES, (9, 9, 8)))
            + f" {r['host_peak_rss_gib']:>9.2f}"
        )
    return "\n".join(lines)


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
    print(f"peak: {_fmt(peak, '.0f')} TFLOP/s ({peak_source})")
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
