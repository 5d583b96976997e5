"""Timing helpers shared by the benchmarks: waiting for the device, and one call profiled with
torch.profiler, summarised as the top host operators and device kernels.

Shared by the benchmarks (``python benchmarks/x.py`` puts the repository root on ``sys.path``,
so this imports as ``benchmarks.profiling``).
"""

import time

TOP_OPS = 12


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a wall-clock timer measures it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_events(profiler):
    """The device-side events only: a CPU operator's device time repeats its kernels' time."""
    from torch.autograd import DeviceType

    return [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA]


def top_ops(events, key):
    rows = []
    for event in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP_OPS]:
        rows.append({"name": event.key, "calls": event.count, "ms": getattr(event, key) / 1e3})
    return rows


def profile_call(fn, device) -> dict:
    """Run ``fn()`` once under the profiler; its wall time (synchronised on CUDA), the top host
    operators by self time and, on CUDA, the top kernels and the share of the wall time the
    device was busy. Prints a short summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - began
    entry = {"profiled_wall_s": wall, "top_self_cpu_ms": top_ops(prof.key_averages(), "self_cpu_time_total")}
    if cuda:
        kernels = kernel_events(prof)
        entry["top_self_device_ms"] = top_ops(kernels, "self_device_time_total")
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        entry["device_busy_s"] = busy
        print(f"  profiled: wall {wall:.3f} s, device kernels {busy:.3f} s ({100 * busy / wall:.0f}% busy)")
    for key, what in (("top_self_device_ms", "device"), ("top_self_cpu_ms", "host")):
        for row in entry.get(key, [])[:8]:
            print(f"  {what:<6} {row['ms']:>9.1f} ms  {row['calls']:>6} calls  {row['name'][:70]}")
    return entry
