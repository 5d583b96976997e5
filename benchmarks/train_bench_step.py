"""The step ``bench_train.py`` times (teacher forward, student forward + loss + backward,
optimizer update; ``ours`` or ``naive`` logits), its model FLOPs, and the memory meters for the
step and for the logits + loss alone."""

from benchmarks.profiling import causal_attention_flops, sync


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


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def teacher_rows(batch: dict, dedup: bool) -> tuple:
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
            return full_logits(teacher, *teacher_rows(batch, dedup=False), width, packed)
        logits = response_logits(teacher, *teacher_rows(batch, dedup=True), width, packed)
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
    t_hidden, t_select = _hidden_and_selector(teacher, *teacher_rows(batch, dedup), width, packed)
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
