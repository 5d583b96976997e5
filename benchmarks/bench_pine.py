"""Benchmark of PINE inference (``--inference pine``) against plain inference, prompts/s.

Both answer the same stage-4 prompts (the last ``--sample_num`` examples with the gold
document at each of ``--positions``; without ``--data``, synthetic examples of
``--doc_words`` words per document) greedily with the same model object: ``plain`` is the
hf backend (``HFBackend``, SDPA, ``model.generate``), ``pine`` is ``PineBackend``. Prints
prompts/s and new tokens/s of each at each ``--batch_size``, the slow-down, how many
examples PINE answers identically at every position (1.0 by construction in fp32; bf16 can
break exact ties) and, with ``--data``, the accuracy of each. Prints, never asserts.

    python benchmarks/bench_pine.py --device cpu --sample_num 4 --total_doc 10
    python benchmarks/bench_pine.py --model /path/Qwen2.5-1.5B-Instruct --device cuda --dtype bfloat16 \\
        --data nq-open-20_total_documents.jsonl.gz --sample_num 100 --positions 0,19 --batch_size 8 32
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.profiling import pick_device, sync  # noqa: E402
from benchmarks.reports import write_report  # noqa: E402
from pos2distill.errors import run_cli  # noqa: E402

WORDS = ("river", "station", "album", "league", "season", "novel", "border", "island", "film", "council", "born",
         "census", "emperor", "bridge", "award", "village", "episode", "treaty", "tower", "harbour")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="folder, hub id, .gguf file or SmolLM2-135M-Instruct (embedded default)")
    parser.add_argument("--data", default=None, help="evaluation file (default: synthetic examples)")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt (default 20)")
    parser.add_argument("--doc_words", type=int, default=90, help="synthetic: words per document (default 90)")
    parser.add_argument("--sample_num", type=int, default=8, help="examples, the file's last N (default 8)")
    parser.add_argument("--positions", default="0,last", help="gold positions (default 0,last)")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8], help="batch sizes to measure (default 8)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=20,
                        help="new tokens at most (default 20; answers stop at the first newline after text)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs, fp32 on the CPU) | bfloat16 | float32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=42, help="distractor order and synthetic text (default 42)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def synthetic_examples(n: int, total_doc: int, words: int, seed: int):
    from pos2distill.records import Document, Example

    rng = random.Random(seed)
    examples = []
    for i in range(n):
        docs = [Document(f"Title {i}.{j}", " ".join(rng.choice(WORDS) for _ in range(words))) for j in range(total_doc)]
        examples.append(Example(f"which {rng.choice(WORDS)} is meant in question {i}?", [rng.choice(WORDS)],
                                docs[0], docs[1:]))
    return examples


def measure(backend, prompts, args, device):
    sync(device)
    start = time.perf_counter()
    answers = backend.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, seed=args.seed,
                               stop_at_newline=True, desc=backend.name)
    sync(device)
    seconds = time.perf_counter() - start
    stats = {"seconds": round(seconds, 3), "prompts_per_s": round(len(prompts) / seconds, 3),
             "new_tokens_per_s": round(backend.last_stats["new_tokens"] / seconds, 2)}
    if "prefill_seconds" in backend.last_stats:  # PINE: prompt pass vs decoding
        stats["prefill_seconds"] = backend.last_stats["prefill_seconds"]
    return answers, stats


def main(argv):
    args = parse_args(argv)
    import torch

    from pos2distill.formats import load_examples
    from pos2distill.generation.backend_config import check_precision
    from pos2distill.metrics import score_prediction
    from pos2distill.models import resolve_model
    from pos2distill.pine import PineBackend
    from pos2distill.position_eval import prompt_examples
    from pos2distill.positions import parse_positions

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = check_precision("hf", args.dtype, False)
    if args.data:
        examples = load_examples(args.data, total_doc=args.total_doc)[-args.sample_num:]
    else:
        examples = synthetic_examples(args.sample_num, args.total_doc, args.doc_words, args.seed)
    ids = list(range(len(examples)))
    positions = parse_positions(args.positions, args.total_doc, "--positions")
    pine = PineBackend(resolve_model(args.model), batch_size=args.batch_size[0], dtype=dtype, device=str(device),
                       need_chat_template=True, show_progress=False)
    plain = pine._hf  # the same model object
    items = [it for p in positions for it in prompt_examples(pine.tokenizer, examples, ids, p, args.seed)]
    prompts = [it.prompt for it in items]
    lengths = pine.count_tokens(prompts)
    print(f"{len(prompts)} prompts ({len(examples)} examples x positions {positions}), "
          f"{sum(lengths) / len(lengths):.0f} tokens on average, device {device}, dtype {dtype}")
    report = {"prompts": len(prompts), "mean_prompt_tokens": sum(lengths) / len(lengths), "device": str(device),
              "dtype": dtype, "runs": []}
    for batch in args.batch_size:
        plain.batch_size = pine.batch_size = batch
        row = {"batch_size": batch}
        for name, backend in (("plain", plain), ("pine", pine)):
            answers, row[name] = measure(backend, prompts, args, device)
            if args.data:
                row[name]["accuracy"] = round(100.0 * sum(score_prediction(a, it.example.answers)
                                                          for a, it in zip(answers, items)) / len(items), 2)
            if name == "pine":
                per_example = {}
                for a, it in zip(answers, items):
                    per_example.setdefault(it.example_id, set()).add(a)
                row[name]["same_answer_at_every_position"] = round(
                    sum(len(v) == 1 for v in per_example.values()) / len(per_example), 3)
        row["slowdown"] = round(row["plain"]["prompts_per_s"] / row["pine"]["prompts_per_s"], 2)
        report["runs"].append(row)
        print(f"batch {batch:>4}: plain {row['plain']['prompts_per_s']:.2f} prompts/s, "
              f"PINE {row['pine']['prompts_per_s']:.2f} prompts/s ({row['slowdown']}x slower; prefill "
              f"{row['pine']['prefill_seconds']:.1f} of {row['pine']['seconds']:.1f} s); "
              f"PINE same answer at every position: {row['pine']['same_answer_at_every_position']:.0%}"
              + (f"; accuracy plain {row['plain']['accuracy']} PINE {row['pine']['accuracy']}" if args.data else ""))
    pine.close()
    if args.output:
        write_report(args.output, report, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
