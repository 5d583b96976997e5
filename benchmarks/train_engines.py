"""What bench_train.py runs a step with: the optimizer side (plain torch AdamW, or the trainer's
DeepSpeed engines: ZeRO stage, --adam_offload, --teacher_offload, through kd.strategy.KDStrategy
as kd/train_kd.py builds them), the phase clock that splits a step's time, and the host memory
high-water mark.
"""

import os
import resource
import time

PHASES = ("teacher_forward", "student_forward_backward", "optimizer")


class PhaseClock:
    """Marks between a step's phases: CUDA events on a GPU (no synchronisation inside the step),
    wall clock on the CPU. ``durations()`` waits for the last mark and returns seconds per phase."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list:
        marks, self.marks = self.marks, []
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


class HostMemory:
    """The process's resident-set high-water mark (Linux VmHWM), reset at ``reset()`` when the
    kernel allows it (``/proc/self/clear_refs``); else the lifetime peak (``ru_maxrss``)."""

    def __init__(self):
        self.resettable = True

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.resettable = False

    @staticmethod
    def _status(field: str):
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def peak_bytes(self) -> int:
        peak = self._status("VmHWM")
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def current_bytes(self):
        return self._status("VmRSS")

    @property
    def source(self) -> str:
        return "VmHWM since the configuration began" if self.resettable else "process lifetime peak RSS"


class TorchUpdater:
    """Plain torch: ``loss.backward()``, then AdamW (fused on GPUs) on the bf16 weights."""

    engine = "torch"

    def __init__(self, student, teacher, learning_rate: float, device):
        import torch

        self.student, self.teacher = student, teacher
        self.hf_student, self.hf_teacher = student, teacher
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, fused=device.type == "cuda")

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.student.zero_grad(set_to_none=True)


class DeepSpeedUpdater:
    """The trainer's engines (kd/train_kd.py): ``KDStrategy`` with the flags below, one process
    (world size 1), the student a ZeRO engine with the trainer's optimizer (FusedAdam, or
    DeepSpeedCPUAdam with ``adam_offload``), the teacher a ZeRO-3 inference engine whose
    parameters live on the host with ``teacher_offload``. ``student``/``teacher`` are the
    engines (callable like the models); ``hf_student``/``hf_teacher`` the wrapped modules."""

    engine = "deepspeed"

    def __init__(self, student, teacher, args):
        from transformers import get_scheduler

        from kd.strategy import KDStrategy
        from kd.train_kd import build_parser

        flags = ["--pretrain", "shape", "--dataset", "bench", "--bf16", "--zero_stage", str(args.zero_stage),
                 "--micro_train_batch_size", "1", "--train_batch_size", "1", "--seed", str(args.seed),
                 "--learning_rate", str(args.learning_rate)]
        if args.adam_offload:
            flags.append("--adam_offload")
        train_args = build_parser().parse_args(flags)
        self.strategy = KDStrategy(train_args)
        self.strategy.setup_distributed()
        self.hf_student, self.hf_teacher = student, teacher
        optimizer = self.strategy.create_optimizer(student, lr=args.learning_rate, betas=tuple(train_args.adam_betas),
                                                   weight_decay=train_args.l2)
        scheduler = get_scheduler("constant", optimizer)
        teacher._offload = args.teacher_offload  # read by strategy.prepare, as in train_kd.py
        # the teacher first: with --teacher_offload its weights leave the GPU before the
        # student's optimizer states are allocated (train_kd.py loads it straight into host memory)
        self.teacher = self.strategy.prepare(teacher)
        self.student, self.optimizer, _ = self.strategy.prepare((student, optimizer, scheduler))
        self.config = {"zero_stage": args.zero_stage, "adam_offload": args.adam_offload,
                       "teacher_offload": args.teacher_offload, "world_size": self.strategy.world_size}

    def backward(self, loss) -> None:
        self.student.backward(loss)

    def step(self) -> None:
        self.student.step()  # every micro-step is a boundary: gradient accumulation 1

    def release(self) -> None:
        self.student.zero_grad()


def engine_note(updater) -> str:
    if updater.engine == "torch":
        return "plain torch AdamW on the bf16 weights (no fp32 master copy; not the trainer's memory)"
    c = updater.config
    return (f"DeepSpeed ZeRO-{c['zero_stage']} as kd/train_kd.py (fp32 master weights and Adam moments), "
            f"adam_offload {c['adam_offload']}, teacher_offload {c['teacher_offload']}, {c['world_size']} process(es), "
            f"LOCAL_RANK {os.environ.get('LOCAL_RANK')}")
