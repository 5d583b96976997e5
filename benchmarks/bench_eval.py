"""Benchmark of stage-4 generation: the project's HF backend vs plain batched ``generate``.

Both answer the same prompts (stage 4's: the last ``--sample_num`` examples with the gold
document at each of ``--positions``), greedily, with the same model object:

- ``ours``: ``make_backend("hf", ...)`` as ``eval_data.py`` uses it: prompts sorted longest
  first, batches of ``--batch_size``, generation stopped at the first newline after content;
  ``ours_compact``: the same with ``compact_finished=True`` (finished rows leave the batch).
- ``baseline``: ``model.generate`` on the prompts in input order, batches of
  ``--baseline_batch_size`` (64), left padding, no sorting, no newline stop,
  ``--max_new_tokens`` (100) tokens at most. More sizes (``--baseline_batch_size 64 32``) run the
  baseline again at each and compare its scores with the first's: how many scores the batch
  shape alone changes at this precision.

``--baseline_only`` times the baseline alone. ``--dtype float32 --tf32`` runs both in float32 with TF32 tensor-core matrix multiplies.

Reports prompts/s of each (tokenization included in both, one call per position as stage 4
makes), the speed-up, and whether the scores (best-subspan EM on the first line) agree per
prompt, with a few of the disagreements.

    python benchmarks/bench_eval.py --data qa_data/nq-open-20_total_documents.jsonl.gz \
        --model Qwen2.5-Coder-0.5B-Instruct.gguf --sample_num 500 --positions 0,9,19 \
        --batch_size 64 128 --output bench_eval.json
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.generate_counts import GenerateCounter  # noqa: E402
from benchmarks.profiling import sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.cli_args import require_at_least  # noqa: E402
from pos2distill.errors import UserError, run_cli  # noqa: E402

SHOWN_MISMATCHES = 5


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", "--input-path", dest="data", required=True,
                        help="evaluation file (any format pos2distill.formats reads)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="folder, hub id, .gguf file or SmolLM2-135M-Instruct (embedded)")
    parser.add_argument("--total_doc", type=int, default=20)
    parser.add_argument("--sample_num", type=int, default=500, help="the last N examples, as stage 4")
    parser.add_argument("--positions", default="0,9,19", help="all | comma list such as 0,9,last")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[128],
                        help="HF-backend batch size(s) to measure (stage 4 ran at 128)")
    parser.add_argument("--baseline_batch_size", type=int, nargs="+", default=[64],
                        help="the baseline's batch size; more sizes run it again, compared with the first")
    parser.add_argument("--baseline_only", action="store_true",
                        help="time the baseline alone (when stage 4's own summary times our backends, e.g. "
                             "beside a vLLM run)")
    parser.add_argument("--compact", choices=("off", "on", "both"), default="both",
                        help="measure the HF backend without / with compact_finished, or both")
    parser.add_argument("--positions_per_call", type=int, default=1,
                        help="positions per HF-backend call (eval_data.py --positions_per_call)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=100)
    parser.add_argument("--max_prompt_length", "--max-prompt-length", dest="max_prompt_length", type=int,
                        default=32768)
    parser.add_argument("--instruction", default="reference", help="reference | corrected")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="weights and compute for both methods (auto: bf16 on GPUs, fp32 on CPU); "
                             "float32 shows whether score differences come from bf16 rounding")
    parser.add_argument("--tf32", action="store_true",
                        help="with --dtype float32: TF32 tensor cores for the matrix multiplies (both methods)")
    parser.add_argument("--warmup_prompts", type=int, default=8,
                        help="prompts each method answers untimed first (kernel set-up, the newline table)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv)
    require_at_least(args, {"--total_doc": 1, "--positions_per_call": 1, "--sample_num": 1,
                            "--max_new_tokens": 1, "--max_prompt_length": 1, "--warmup_prompts": 0})
    for flag in ("batch_size", "baseline_batch_size"):
        if min(getattr(args, flag)) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if len(set(args.baseline_batch_size)) != len(args.baseline_batch_size):
        raise UserError(f"--baseline_batch_size: sizes must differ, got {args.baseline_batch_size}")
    return args


def plain_generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, eos_ids, pad_id, device):
    """The baseline: ``generate`` in input order, tokenizer padding (left), greedy, no stop string.

    Returns (texts, generated tokens up to each row's EOS, padded prompt tokens, rows x steps run)."""
    import torch

    texts, new_tokens, padded, row_steps = [], 0, 0, 0
    for begin in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[begin:begin + batch_size], padding=True, return_tensors="pt",
                            add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos_ids, pad_token_id=pad_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
        ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
        new_tokens += int(ends.sum())
        padded += encoded["input_ids"].numel()
        row_steps += new.numel()
    return texts, new_tokens, padded, row_steps


def score_all(predictions: list, items: list) -> list:
    from pos2distill.metrics import score_prediction

    return [score_prediction(p, it.example.answers) for p, it in zip(predictions, items)]


def compare(ours: list, baseline: list, items: list) -> dict:
    from pos2distill.metrics import first_line

    score_ours = score_all(ours, items)
    score_base = score_all(baseline, items)
    mismatches = [i for i, (a, b) in enumerate(zip(score_ours, score_base)) if a != b]
    return {
        "accuracy": 100.0 * sum(score_ours) / len(items),
        "baseline_accuracy": 100.0 * sum(score_base) / len(items),
        "score_mismatches": len(mismatches),
        "first_line_differences": sum(first_line(a) != first_line(b) for a, b in zip(ours, baseline)),
        "examples": [
            {"example_id": items[i].example_id, "position": items[i].position, "answers": items[i].example.answers,
             "ours": first_line(ours[i]), "baseline": first_line(baseline[i]),
             "score_ours": score_ours[i], "score_baseline": score_base[i]}
            for i in mismatches[:SHOWN_MISMATCHES]
        ],
    }


def main(argv):
    args = parse_args(argv)
    import torch

    from pos2distill.formats import load_examples
    from pos2distill.generation.factory import make_backend
    from pos2distill.position_eval import check_prompt_lengths, prompt_examples
    from pos2distill.positions import parse_positions
    from pos2distill.prompting import resolve_instruction

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible")
    instruction = resolve_instruction(args.instruction)
    positions = parse_positions(args.positions, args.total_doc, "--positions")
    examples = load_examples(args.data, total_doc=args.total_doc)
    if not examples:
        raise UserError(f"{args.data}: no examples")
    first = max(0, len(examples) - args.sample_num)
    example_ids = list(range(first, len(examples)))
    examples = examples[first:]

    num_gpus = 0 if args.device == "cpu" else None
    backend = make_backend("hf", args.model, num_gpus=num_gpus, batch_size=args.batch_size[0],
                           max_model_len=args.max_prompt_length + args.max_new_tokens, seed=args.seed,
                           dtype=args.dtype, tf32=args.tf32, need_chat_template=True)
    device = backend.device
    model_path = backend.model.name_or_path
    try:
        per_position = [prompt_examples(backend.tokenizer, examples, example_ids, p, args.seed, instruction)
                        for p in positions]
        position_lengths = []
        for position, items in zip(positions, per_position):
            check_prompt_lengths(backend, [it.prompt for it in items], args.max_prompt_length, f"position {position}")
            position_lengths.append(backend.count_tokens([it.prompt for it in items]))
        lengths = [n for group in position_lengths for n in group]
        all_items = [it for items in per_position for it in items]
        precision = str(backend.model.dtype).replace("torch.", "") + (" with TF32 matmuls" if args.tf32 else "")
        print(f"model {model_path} on {device} ({precision}); "
              f"{len(examples)} examples x {len(positions)} positions = {len(all_items)} prompts of "
              f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f})")

        def run_ours(items):
            return backend.generate([it.prompt for it in items], max_new_tokens=args.max_new_tokens,
                                    temperature=0.0, seed=args.seed, stop_at_newline=True, desc="ours")

        def run_baseline(items, batch_size):
            return plain_generate(backend.model, backend.tokenizer, [it.prompt for it in items],
                                  batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                                  eos_ids=backend.eos_ids, pad_id=backend.pad_id, device=device)

        if args.warmup_prompts:
            warm = all_items[: args.warmup_prompts]
            if not args.baseline_only:
                run_ours(warm)
            run_baseline(warm, args.baseline_batch_size[0])

        group = args.positions_per_call
        calls = [[it for items in per_position[i : i + group] for it in items]
                 for i in range(0, len(per_position), group)]
        runs, out_of_memory = {}, {}
        compact_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compact]
        for batch_size in [] if args.baseline_only else args.batch_size:
            for compact in compact_modes:
                backend.batch_size = batch_size
                backend.compact_finished = compact
                predictions, seconds, totals = [], 0.0, {}
                name = f"ours_bs{batch_size}" + ("_compact" if compact else "")
                try:
                    for items in calls:  # as stage 4 makes them
                        sync(device)
                        began = time.perf_counter()
                        with GenerateCounter(backend.model) as counter:  # the baseline counts its own
                            predictions.extend(run_ours(items))
                        sync(device)
                        seconds += time.perf_counter() - began
                        counts = dict(counter.totals, new_tokens=backend.last_stats["new_tokens"])
                        for key in ("new_tokens", "decode_steps", "row_steps", "padded_prompt_tokens"):
                            totals[key] = totals.get(key, 0) + counts[key]
                except (torch.cuda.OutOfMemoryError, UserError) as err:
                    # A batch size too large for the GPU is a result too (the backend re-raises it
                    # as a UserError from the OutOfMemoryError); the other settings are still measured.
                    if isinstance(err, UserError) and not isinstance(err.__cause__, torch.OutOfMemoryError):
                        raise
                    out_of_memory[name] = batch_size
                    torch.cuda.empty_cache()
                    print(f"{name}: out of GPU memory")
                    continue
                print(f"{name}: {len(predictions) / seconds:.2f} prompts/s")
                runs[name] = {"method": "ours", "batch_size": batch_size, "compact_finished": compact,
                              "positions_per_call": group,
                              "predictions": predictions, "seconds": seconds, **totals}
        for batch_size in args.baseline_batch_size:
            predictions, seconds, new_tokens, padded, row_steps = [], 0.0, 0, 0, 0
            for items in per_position:
                sync(device)
                began = time.perf_counter()
                texts, count, pad, steps = run_baseline(items, batch_size)
                sync(device)
                seconds += time.perf_counter() - began
                predictions.extend(texts)
                new_tokens += count
                padded += pad
                row_steps += steps
            name = "baseline" if batch_size == args.baseline_batch_size[0] else f"baseline_bs{batch_size}"
            print(f"{name}: {len(predictions) / seconds:.2f} prompts/s")
            runs[name] = {"method": "baseline", "batch_size": batch_size, "predictions": predictions,
                          "seconds": seconds, "new_tokens": new_tokens, "padded_prompt_tokens": padded,
                          "row_steps": row_steps}
    finally:
        backend.close()

    real = sum(lengths)
    baseline = runs["baseline"]
    for run in runs.values():
        run["prompts"] = len(all_items)
        run["prompts_per_s"] = len(all_items) / run["seconds"]
        run["padding_fraction"] = 1.0 - real / run["padded_prompt_tokens"]
        # share of the computed decoding rows x steps that produced answer tokens
        run["useful_decode_fraction"] = run["new_tokens"] / max(run["row_steps"], 1)
    for run in runs.values():
        if run is not baseline:
            run["speedup_vs_baseline"] = run["prompts_per_s"] / baseline["prompts_per_s"]
            run.update(compare(run["predictions"], baseline["predictions"], all_items))
        else:
            run["accuracy"] = 100.0 * sum(score_all(run["predictions"], all_items)) / len(all_items)

    print(f"\n{'method':<22} {'batch':>5} {'prompts/s':>10} {'speed-up':>9} {'new tok':>8} {'useful':>7} "
          f"{'padding':>8} {'acc':>6} {'score diffs':>11}")
    for name, run in runs.items():
        speedup = f"{run['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in run else "1.00x"
        diffs = str(run.get("score_mismatches", "-"))
        print(f"{name:<22} {run['batch_size']:>5} {run['prompts_per_s']:>10.2f} {speedup:>9} {run['new_tokens']:>8} "
              f"{100 * run['useful_decode_fraction']:>6.1f}% {100 * run['padding_fraction']:>7.1f}% "
              f"{run['accuracy']:>6.1f} {diffs:>11}")
    print("useful: answer tokens / (rows x decode steps computed); padding: pad share of the prompt tokens run; "
          "score diffs: prompts whose score differs from the baseline's")
    for name, run in runs.items():
        for shown in run.get("examples", []):
            print(f"  {name} differs at example {shown['example_id']} position {shown['position']}: "
                  f"ours {shown['ours']!r} ({shown['score_ours']}) vs baseline {shown['baseline']!r} "
                  f"({shown['score_baseline']}); answers {shown['answers']}")

    if args.output:
        report = {
            "benchmark": "bench_eval",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "precision": precision,
            "model": model_path,
            "prompts": len(all_items),
            "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": real / len(lengths)},
            "runs": {name: {k: v for k, v in run.items() if k != "predictions"} for name, run in runs.items()},
            # per prompt, in this order: a run can be paired with stage 4's predictions afterwards
            "items": [[it.example_id, it.position] for it in all_items],
            "scores": {name: score_all(run["predictions"], all_items) for name, run in runs.items()},
            "out_of_memory": out_of_memory,
        }
        write_report(args.output, report, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
