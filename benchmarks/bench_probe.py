"""Stage 1's ``--gold_doc auto`` probe: one generate call per position vs several positions per call.

The same questions (the ``--probe_num`` before the last ``--eval_holdout``, as stage 1 picks
them) are answered greedily at ``--positions`` by one HF backend, alternating the two ways
``--repeats`` times (the machine's load changes between runs). Prints, per run, prompts/s; once,
the prompt tokens each way computes (padding of the longest-first batches included) and
whether the answers agree. Prints, never asserts.

    python benchmarks/bench_probe.py --data qa_data/nq-open-3_total_documents.jsonl.gz \\
        --total_doc 3 --probe_num 24 --eval_holdout 24 --max-new-tokens 32 --batch_size 16
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pos2distill.formats import load_examples  # noqa: E402
from pos2distill.generation.factory import make_backend  # noqa: E402
from pos2distill.models import resolve_model  # noqa: E402
from pos2distill.position_eval import evaluate_positions, prompt_examples  # noqa: E402
from pos2distill.positions import parse_positions  # noqa: E402
from pos2distill.prompting import resolve_instruction  # noqa: E402


def padded_tokens(lengths: list[int], batch: int) -> int:
    """Prompt tokens computed for one call: longest first, each batch padded to its longest."""
    lengths = sorted(lengths, reverse=True)
    return sum(lengths[b] * len(lengths[b : b + batch]) for b in range(0, len(lengths), batch))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="examples (.jsonl[.gz])")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt (default 20)")
    parser.add_argument("--positions", default="all", help="positions probed (default all)")
    parser.add_argument("--probe_num", type=int, default=24, help="questions (default 24)")
    parser.add_argument("--eval_holdout", type=int, default=500, help="last N examples left out (default 500)")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32, help="default 32")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating (default 2)")
    args = parser.parse_args(argv)

    examples = load_examples(args.data, total_doc=args.total_doc)
    end = len(examples) - args.eval_holdout
    ids = list(range(end - args.probe_num, end))
    chosen = [examples[i] for i in ids]
    positions = parse_positions(args.positions, args.total_doc, "--positions")
    instruction = resolve_instruction("reference")
    backend = make_backend("hf", resolve_model(args.model), batch_size=args.batch_size, need_chat_template=True)
    backend.show_progress = False
    lengths = {p: backend.count_tokens([it.prompt for it in prompt_examples(backend.tokenizer, chosen, ids, p, 42,
                                                                            instruction)]) for p in positions}
    real = sum(map(sum, lengths.values()))
    per_position = sum(padded_tokens(v, args.batch_size) for v in lengths.values())
    together = padded_tokens([n for v in lengths.values() for n in v], args.batch_size)
    print(f"{len(ids)} questions x {len(positions)} positions, batch {args.batch_size}: {real} prompt tokens; "
          f"computed one call per position {per_position} (+{100 * (per_position / real - 1):.1f}%), "
          f"one call {together} (+{100 * (together / real - 1):.1f}%)")
    answers = {}
    for _ in range(args.repeats):
        for per_call in (1, len(positions)):
            started = time.perf_counter()
            records, _ = evaluate_positions(backend, chosen, ids, positions, seed=42,
                                            max_new_tokens=args.max_new_tokens, max_prompt_length=10**9,
                                            instruction=instruction, positions_per_call=per_call,
                                            log=lambda *a: None)
            seconds = time.perf_counter() - started
            answers.setdefault(per_call, [r["prediction"] for r in records])
            print(f"positions per call {per_call:>2}: {len(records) / seconds:.3f} prompts/s "
                  f"({len(records)} prompts, {seconds:.0f} s)", flush=True)
    print("same answers:", answers[1] == answers[len(positions)])
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
