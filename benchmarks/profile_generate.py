"""Where one stage-4 generation batch spends its time: prefill vs per-step decoding, and the
top operators of a profiled run (host and device), for the HF backend's model.

Each decoding step is forced (``min_new_tokens = max_new_tokens``, no stop), so the per-step
time is (full - prefill-only) / (steps - 1). ``--cache static`` uses transformers' static KV
cache, which on CUDA makes ``generate`` compile the decoding step (CUDA graphs);
``static_eager`` the same cache without compiling (no per-step copy of a growing cache). Prompt
widths are then padded up to a multiple of ``--bucket`` so that few shapes are compiled. Every
configuration runs ``--repeats`` times and the last run is reported (the first pays for
compilation and kernel selection).

    python benchmarks/profile_generate.py --model Qwen2.5-Coder-0.5B-Instruct.gguf \\
        --data qa_data/nq-open-20_total_documents.jsonl.gz --batch_size 128 --cache dynamic static
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import profile_call, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.cli_args import require_at_least  # noqa: E402
from pos2distill.errors import UserError, run_cli  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="folder, hub id, .gguf file or SmolLM2-135M-Instruct (embedded)")
    parser.add_argument("--data", "--input-path", dest="data", required=True, help="evaluation file")
    parser.add_argument("--total_doc", type=int, default=20)
    parser.add_argument("--position", type=int, default=9, help="gold position of the prompts")
    parser.add_argument("--batch_size", type=int, default=128, help="prompts in the batch (the last ones of the file)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="decoding steps, all forced")
    parser.add_argument("--cache", nargs="+", choices=("dynamic", "static", "static_eager"), default=["dynamic"],
                        help="static_eager: the static cache without compilation (separates the two effects)")
    parser.add_argument("--bucket", type=int, default=256, help="static cache: pad prompt widths to a multiple")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_profile", action="store_true", help="timings only")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--output", default=None, help="JSON report")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    require_at_least(args, {"--total_doc": 1, "--position": 0, "--batch_size": 1, "--max_new_tokens": 2,
                            "--bucket": 1, "--repeats": 1})
    if args.position >= args.total_doc:
        raise UserError(f"--position must be below --total_doc {args.total_doc}, got {args.position}")
    return args


def main(argv):
    args = parse_args(argv)
    import torch
    from transformers import GenerationConfig

    from pos2distill.formats import load_examples
    from pos2distill.generation.factory import make_backend
    from pos2distill.generation.hf import left_padded
    from pos2distill.position_eval import prompt_examples

    examples = load_examples(args.data, total_doc=args.total_doc)
    if not examples:
        raise UserError(f"{args.data}: no examples")
    first = max(0, len(examples) - args.batch_size)
    backend = make_backend("hf", args.model, num_gpus=0 if args.device == "cpu" else None, need_chat_template=True)
    device, model = backend.device, backend.model
    items = prompt_examples(backend.tokenizer, examples[first:], list(range(first, len(examples))), args.position, 0)
    token_ids = backend._token_ids([it.prompt for it in items])
    longest = max(len(ids) for ids in token_ids)

    def run(input_ids, attention, new_tokens, cache):
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=backend.pad_id, eos_token_id=backend.eos_ids, num_beams=1)
        if cache.startswith("static"):
            config.cache_implementation = "static"
            config.disable_compile = cache == "static_eager"
        sync(device)
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        sync(device)
        return time.perf_counter() - began

    report = {"model": model.name_or_path, "device": str(device), "batch": len(token_ids), "longest_prompt": longest,
              "mean_prompt": sum(map(len, token_ids)) / len(token_ids), "max_new_tokens": args.max_new_tokens,
              "configs": {}}
    print(f"{len(token_ids)} prompts of up to {longest} tokens on {device}")
    for cache in args.cache:
        width = longest if cache == "dynamic" else -(-longest // args.bucket) * args.bucket  # static: bucketed
        input_ids, attention = left_padded(token_ids, backend.pad_id, width, device)
        first_full = None
        for _ in range(args.repeats):
            prefill = run(input_ids, attention, 1, cache)
            full = run(input_ids, attention, args.max_new_tokens, cache)
            first_full = full if first_full is None else first_full
        step_ms = 1e3 * (full - prefill) / (args.max_new_tokens - 1)
        # first_full_s: the first full run, with compilation (static cache on CUDA) and kernel set-up
        entry = {"width": width, "prefill_s": prefill, "full_s": full, "first_full_s": first_full,
                 "decode_step_ms": step_ms, "decode_step_ms_per_row": step_ms / len(token_ids)}
        print(f"{cache:>7} cache, width {width}: prefill {prefill:.3f} s, {args.max_new_tokens} tokens "
              f"{full:.3f} s (first run {first_full:.3f} s) -> {step_ms:.1f} ms per decoding step "
              f"({entry['decode_step_ms_per_row']:.3f} ms per row)")
        if not args.no_profile:
            entry.update(profile_call(lambda: run(input_ids, attention, args.max_new_tokens, cache), device))
        report["configs"][cache] = entry
    backend.close()
    if args.output:
        write_report(args.output, report, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
