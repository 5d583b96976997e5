"""Benchmark of PINE's attention kernel alone: prefill and cached decoding steps of a random-weight
Qwen2 model with a chosen attention shape, on synthetic prompts (no tokenizer, no data).

Times ``pine.prefill`` and ``--decode_steps`` calls of ``pine.decode_step`` (median of
``--repeats``, after a warm-up), and the prefill's share spent in each kernel of
``pos2distill.pine_attention``. Run it at two commits to compare kernels on the same shapes.
Prints, never asserts.

    python benchmarks/bench_pine_kernel.py --device cpu --layers 2 --rows 2
    python benchmarks/bench_pine_kernel.py --device cuda --dtype bfloat16 --layers 24 --rows 64
"""

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import pick_device, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.errors import run_cli  # noqa: E402

KERNELS = ("prompt_importance", "document_queries", "attend", "prefill_cache")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    # defaults: Qwen2.5-0.5B's attention (896 wide, 14 query heads, 2 kv heads, head dim 64)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="prompts in the batch (default 2)")
    parser.add_argument("--docs", type=int, default=20, help="documents per prompt (default 20)")
    parser.add_argument("--doc_tokens", type=int, nargs=2, default=[80, 140], metavar=("MIN", "MAX"),
                        help="tokens per document, drawn uniformly (default 80 140: NQ-20's ~2,300-token prompts)")
    parser.add_argument("--decode_steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON report path")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import pos2distill.pine_attention as kernels
    from pos2distill.pine import build_layout, decode_step, half_inputs_on_tf32, prefill

    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=32768)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    rng = random.Random(args.seed)
    rows = [([rng.randrange(1000) for _ in range(30)],
             [[rng.randrange(1000) for _ in range(rng.randint(*args.doc_tokens))] for _ in range(args.docs)],
             [rng.randrange(1000) for _ in range(20)]) for _ in range(args.rows)]
    spent = {}
    for name in KERNELS:  # wall time per kernel (synchronised), where this commit has it
        if hasattr(kernels, name):
            def timed(*a, _f=getattr(kernels, name), _name=name, **k):
                sync(device)
                began = time.perf_counter()
                out = _f(*a, **k)
                sync(device)
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - began
                return out
            setattr(kernels, name, timed)
    prefills, decodes, shares = [], [], []
    with torch.inference_mode(), half_inputs_on_tf32(model):
        for repeat in range(args.repeats + 1):
            spent.clear()
            ids, layout = build_layout(rows, device, 0)
            sync(device)
            began = time.perf_counter()
            _, caches = prefill(model, ids, layout)
            sync(device)
            prefill_s = time.perf_counter() - began
            share = dict(spent)
            began = time.perf_counter()
            tokens = torch.full((len(rows),), 5, device=device)
            for step in range(args.decode_steps):
                decode_step(model, tokens, layout.lengths + step, layout, caches)
            sync(device)
            decode_s = time.perf_counter() - began
            if repeat:  # the first is the warm-up
                prefills.append(prefill_s)
                decodes.append(decode_s)
                shares.append(share)
    tokens = int(ids.shape[1])
    report = {"device": str(device), "dtype": args.dtype, "rows": args.rows, "tokens_per_row": tokens,
              "prefill_seconds": round(statistics.median(prefills), 3),
              "decode_seconds_per_step": round(statistics.median(decodes) / max(1, args.decode_steps), 4),
              "prefill_kernel_seconds": {k: round(statistics.median(s.get(k, 0.0) for s in shares), 3)
                                         for k in shares[-1]}}
    print(f"{args.rows} rows x {tokens} tokens, {args.layers} layers, {args.dtype} on {device}: prefill "
          f"{report['prefill_seconds']:.3f} s, decoding {report['decode_seconds_per_step'] * 1000:.1f} ms/step; "
          "prefill by kernel: " + ", ".join(f"{k} {v:.3f} s" for k, v in report["prefill_kernel_seconds"].items()))
    if args.output:
        write_report(args.output, report, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
