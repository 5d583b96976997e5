"""Helpers shared by the benchmarks: picking and waiting for the device, the causal attention
FLOP count, and one call profiled with torch.profiler, summarised as the top host operators and
device kernels, the device time by kind of kernel and the matrix-multiply FLOP rate.

Shared by the benchmarks (``python benchmarks/x.py`` puts the repository root on ``sys.path``,
so this imports as ``benchmarks.profiling``).
"""

import time

TOP_OPS = 12
# Kernel kinds by name, first match wins: torch.compile's kernels first (their names list the
# fused operators, "attention" among them; "triton_tem" ones are its matmul templates), then
# attention before GEMMs, as cuDNN's attention kernels carry "sm90"/"wgmma" in their names too.
KERNEL_KINDS = (
    ("matmul", ("triton_tem",)),
    ("compiled fused", ("triton",)),
    ("attention", ("flash", "sdpa", "fmha", "attn", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
)
# host operators whose FLOPs the profiler counts from their shapes (record_shapes + with_flops)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def pick_device(name: str):
    """``--device``: auto (the first CUDA GPU, else the CPU), cpu, cuda or cuda:N."""
    import torch

    from pos2distill.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible")
    return device


def causal_attention_flops(lengths, heads: int, head_dim: int) -> int:
    """Matmul FLOPs of one causal attention forward (one layer) over rows of these lengths:
    QK^T and PV over half of each row's square, 2 * n^2 * heads * head_dim per row."""
    return 2 * heads * head_dim * sum(n * n for n in lengths)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a wall-clock timer measures it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_events(profiler):
    """The device-side kernels only: a CPU operator's device time repeats its kernels' time, and
    so does a user annotation's device-side range (such as the optimizer's step)."""
    from torch.autograd import DeviceType

    return [e for e in profiler.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def top_ops(events, key):
    rows = []
    for event in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP_OPS]:
        rows.append({"name": event.key, "calls": event.count, "ms": getattr(event, key) / 1e3})
    return rows


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def device_time_by_kind(kernels) -> dict:
    """Milliseconds of device time per kernel kind (``KERNEL_KINDS``, else "other")."""
    totals = {}
    for event in kernels:
        kind = kernel_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_device_time_total / 1e3
    return totals


def matmul_flops(events) -> int:
    """FLOPs of the matrix multiplies the host dispatched (the profiler's count from shapes).

    Attention kernels are custom operators, so their FLOPs are not in this count."""
    return int(sum(e.flops or 0 for e in events if e.key in MATMUL_OPS))


def profile_call(fn, device) -> dict:
    """Run ``fn()`` once under the profiler; its wall time (synchronised on CUDA), the top host
    operators by self time, the matmul FLOPs and, on CUDA, the top kernels, the device time by
    kernel kind, the matmul kernels' FLOP rate and the share of the wall time the device was
    busy. Prints a short summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - began
    events = prof.key_averages()
    entry = {"profiled_wall_s": wall, "top_self_cpu_ms": top_ops(events, "self_cpu_time_total"),
             "matmul_flops": matmul_flops(events)}
    if cuda:
        kernels = kernel_events(prof)
        entry["top_self_device_ms"] = top_ops(kernels, "self_device_time_total")
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        entry["device_busy_s"] = busy
        by_kind = device_time_by_kind(kernels)
        entry["device_ms_by_kind"] = by_kind
        matmul_s = by_kind.get("matmul", 0.0) / 1e3
        entry["matmul_tflops"] = entry["matmul_flops"] / matmul_s / 1e12 if matmul_s else None
        print(f"  profiled: wall {wall:.3f} s, device kernels {busy:.3f} s ({100 * busy / wall:.0f}% busy)")
        for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
            rate = f", {entry['matmul_tflops']:.0f} TFLOP/s" if kind == "matmul" and entry["matmul_tflops"] else ""
            print(f"  {kind:<15} {ms:>9.1f} ms  {100 * ms / 1e3 / wall:>5.1f}% of the wall time{rate}")
    for key, what in (("top_self_device_ms", "device"), ("top_self_cpu_ms", "host")):
        for row in entry.get(key, [])[:8]:
            print(f"  {what:<6} {row['ms']:>9.1f} ms  {row['calls']:>6} calls  {row['name'][:70]}")
    return entry
