"""Benchmark of the attention kernels packed rows can use: forward + backward time and FLOP rate.

The packed micro-batch (``kd.packed_attention``) is ``T`` tokens of several rows, each row
attending causally to itself only. Candidates, each on the same ``[T, heads, dim]`` tensors:

- ``varlen``: torch's variable-length flash kernel, as the trainer calls it on CUDA;
- ``per_row``: the trainer's fallback (SDPA per row, backend chosen by torch);
- ``per_row_<backend>``: SDPA per row with one backend forced (``cudnn``, ``flash``,
  ``efficient``, ``math``), the key/value heads repeated for the query heads.

Each is checked against ``per_row_math`` in fp32 (outputs and input gradients), then timed
(median of ``--steps``). FLOPs: causal attention, 2 * S^2 * heads * dim per row forward
(QK^T and PV over half the square), backward 2.5 times the forward.

    python benchmarks/bench_packed_attention.py --rows 32 --min_len 2181 --max_len 2758 --output attn.json
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import causal_attention_flops, pick_device, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.cli_args import require_at_least  # noqa: E402
from pos2distill.errors import UserError, run_cli  # noqa: E402

BACKENDS = ("cudnn", "flash", "efficient", "math")
METHODS = ("varlen", "per_row") + tuple(f"per_row_{b}" for b in BACKENDS)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="rows packed together (a micro-batch)")
    parser.add_argument("--min_len", type=int, default=2181, help="shortest row in tokens")
    parser.add_argument("--max_len", type=int, default=2758, help="longest row in tokens")
    parser.add_argument("--heads", type=int, default=14, help="query heads (Qwen2.5-0.5B: 14)")
    parser.add_argument("--kv_heads", type=int, default=2, help="key/value heads (Qwen2.5-0.5B: 2)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    require_at_least(args, {"--rows": 1, "--min_len": 1, "--heads": 1, "--kv_heads": 1, "--head_dim": 1,
                            "--warmup": 0, "--steps": 1})
    if args.max_len < args.min_len:
        raise UserError(f"--max_len {args.max_len} is below --min_len {args.min_len}")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} is not a multiple of --kv_heads {args.kv_heads}")
    return args


def attention_fn(method: str):
    """``fn(q, k, v, cu_seq_lens, max_len) -> [T, heads, dim]`` for ``method``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kd.packed_attention import _per_row_attention, _varlen_attention

    if method == "varlen":
        return lambda q, k, v, cu, longest: _varlen_attention(q, k, v, cu, longest, None)
    if method == "per_row":
        return lambda q, k, v, cu, longest: _per_row_attention(q, k, v, cu, None)
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[method.removeprefix("per_row_")]

    def forced(q, k, v, cu, longest):
        with sdpa_kernel(backend):
            return _per_row_attention(q, k, v, cu, None)

    return forced


def causal_flops(lengths, heads: int, head_dim: int) -> int:
    # forward + a backward of 2.5 forwards (FlashAttention's count: the backward recomputes QK^T)
    return int(causal_attention_flops(lengths, heads, head_dim) * 3.5)


def run_method(fn, tensors, cu, longest, grad, device, warmup: int, steps: int) -> list:
    def step():
        q, k, v = (t.detach().requires_grad_() for t in tensors)
        fn(q, k, v, cu, longest).backward(grad)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        began = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - began)
    return times


def check_method(fn, reference, tensors, cu, longest, grad) -> float:
    """Largest absolute difference from ``reference`` run in fp32 (output and input gradients);
    ``fn`` runs in the benchmark's dtype (the fused kernels take no fp32)."""
    results = []
    for f, cast in ((fn, lambda t: t), (reference, lambda t: t.float())):
        q, k, v = (cast(t.detach()).requires_grad_() for t in tensors)
        out = f(q, k, v, cu, longest)
        out.backward(cast(grad))
        results.append([out, q.grad, k.grad, v.grad])
    return max(float((a.float() - b).detach().abs().max()) for a, b in zip(*results))


def main(argv):
    args = parse_args(argv)
    import torch

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.rows,), generator=generator).tolist()
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    longest = max(lengths)
    shapes = ((total, args.heads, args.head_dim), (total, args.kv_heads, args.head_dim),
              (total, args.kv_heads, args.head_dim))
    tensors = [torch.randn(s, generator=generator).to(device, dtype) for s in shapes]
    grad = torch.randn(shapes[0], generator=generator).to(device, dtype)
    flops = causal_flops(lengths, args.heads, args.head_dim)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.rows} rows of {min(lengths)}-{max(lengths)} tokens ({total} in all), {args.heads} query / "
          f"{args.kv_heads} key-value heads of {args.head_dim}, {str(dtype).replace('torch.', '')} on {name}; "
          f"{flops / 1e12:.2f} TFLOP per forward + backward")
    reference = attention_fn("per_row_math")
    results = []
    for method in args.methods:
        fn = attention_fn(method)
        row = {"method": method}
        try:
            row["max_abs_diff_fp32"] = check_method(fn, reference, tensors, cu, longest, grad)
            times = run_method(fn, tensors, cu, longest, grad, device, args.warmup, args.steps)
        except (RuntimeError, NotImplementedError) as err:  # a backend this GPU/torch/dtype lacks
            row.update(status="unavailable", reason=str(err).splitlines()[0][:200])
            print(f"{method:<18} unavailable: {row['reason']}")
            results.append(row)
            continue
        seconds = statistics.median(times)
        row.update(status="ok", ms_median=1e3 * seconds, ms_all=[1e3 * t for t in times],
                   tflops=flops / seconds / 1e12)
        print(f"{method:<18} {row['ms_median']:>9.2f} ms  {row['tflops']:>7.1f} TFLOP/s  "
              f"max |diff| vs fp32 math {row['max_abs_diff_fp32']:.1e}")
        results.append(row)
    if args.output:
        write_report(args.output, {"benchmark": "bench_packed_attention", "device_name": name, "torch": torch.__version__,
                                   "dtype": str(dtype), "lengths": lengths, "flops_per_step": flops,
                                   "results": results}, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
