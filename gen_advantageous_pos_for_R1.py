"""Stage 1: sample answers with the gold document at the advantageous position.

Each example's distractors are shuffled once (seeded by example id), the gold
document is inserted at ``--gold_doc`` and one answer is sampled per question.
``--gold_doc auto`` first measures greedy accuracy at every position on a
held-out slice (examples just before the last ``--eval_holdout``, which stage 4
evaluates) and keeps the first position unless another one is better by a paired
test on the same questions (pos2distill/advantageous.py). Output, one record per example:
raw_data/{dataset}/{model}_{total_doc}docs_{gold_doc}.jsonl.gz with
``documents``, ``distractors``, ``gold_idx``, ``oracle_prompt``, ``oracle_answer``
and ``oracle_correct``. An interrupted run restarted with the same arguments
resumes where it stopped and writes the same file.
"""

import json
import os
import sys
import time

from pos2distill.advantageous import choice_table, choose_position
from pos2distill.cli_args import add_model_flags, check_model_flags, dataset_name_from_path, require_at_least
from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.flag_types import harden_numbers
from pos2distill.formats import example_to_raw, load_examples
from pos2distill.pine import open_backend, resolve_inference
from pos2distill.jsonl import write_text_atomic
from pos2distill.metrics import score_prediction
from pos2distill.models import resolve_model
from pos2distill.names import check_name, check_names, model_name, stage1_file, stage1_summary
from pos2distill.output_guard import check_writable, claim_output, releasing_locks
from pos2distill.position_eval import check_prompt_lengths, evaluate_positions, prompt_examples
from pos2distill.positions import parse_position, parse_positions
from pos2distill.report import summarize
from pos2distill.resumable import ChunkedOutput, file_identity


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("--input-path", dest="input_path", required=True, help="examples (.jsonl[.gz], any supported format)")
    parser.add_argument("--output-path", dest="output_path", default="raw_data",
                        help="output folder (file goes to {folder}/{dataset}/...), or a .jsonl.gz file name")
    parser.add_argument("--dataset_name", default=None, help="default: from the input file name (nq, kv, ...)")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt")
    parser.add_argument("--gold_doc", default="0", help="advantageous position: index, first, last or auto")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the answers")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling: smallest token set with this mass")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples (default: all)")
    parser.add_argument("--full_answers", action="store_true",
                        help="sample up to --max-new-tokens; by default sampling stops at the end of the first "
                             "line, the only part that is scored and trained on")
    parser.add_argument("--chunk_size", type=int, default=256, help="examples per resumable chunk")
    parser.add_argument("--probe_num", type=int, default=300,
                        help="--gold_doc auto: held-out examples to probe (default 300: at 100 a 5-point lead is noise)")
    parser.add_argument("--probe_alpha", type=float, default=0.05,
                        help="--gold_doc auto: leave the first probed position only for one whose lead passes a "
                             "one-sided McNemar test, Holm-corrected, at this level (pos2distill/advantageous.py)")
    parser.add_argument("--probe_positions", default="all", help="--gold_doc auto: positions to probe")
    parser.add_argument("--eval_holdout", type=int, default=500,
                        help="--gold_doc auto: the last N examples (stage 4's) are never probed")
    add_model_flags(parser)
    return harden_numbers(parser)


def parse_args(argv):
    return build_parser().parse_args(argv)


PROBE_PROMPTS_PER_CALL = 2048


def probe_slice(num_examples: int, probe_num: int, holdout: int) -> range:
    """Examples just before the evaluation hold-out; the whole file's tail if it is too short."""
    end = num_examples - holdout
    if end <= 0:
        print(f"WARNING: only {num_examples} examples, fewer than --eval_holdout {holdout}: "
              f"probing the last {min(probe_num, num_examples)}, which stage 4 may also evaluate")
        return range(max(0, num_examples - probe_num), num_examples)
    return range(max(0, end - probe_num), end)


def choose_advantageous_position(args, backend, examples, instruction) -> tuple[int, dict]:
    ids = list(probe_slice(len(examples), args.probe_num, args.eval_holdout))
    positions = parse_positions(args.probe_positions, args.total_doc, "--probe_positions")
    print(f"== --gold_doc auto: greedy accuracy at {len(positions)} positions on examples {ids[0]}..{ids[-1]}")
    # Several positions per generate call: one example's prompts at different positions are about
    # equally long, so the backend's longest-first batches carry less padding (prefill is most of
    # the time on a CPU); capped so that one call's prompts and token ids stay small.
    per_call = max(1, min(len(positions), PROBE_PROMPTS_PER_CALL // len(ids)))
    records, _ = evaluate_positions(
        backend, [examples[i] for i in ids], ids, positions, seed=args.seed, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, instruction=instruction, positions_per_call=per_call,
    )
    choice = choose_position(records, args.probe_alpha)
    print(choice_table(choice))
    print(f"advantageous position: {choice['chosen']} ({choice['reason']})")
    return choice["chosen"], {**summarize(records, "probe", args.total_doc), "choice": choice}


def output_file(args, dataset: str, model: str, position: int) -> str:
    if args.output_path.endswith((".jsonl", ".jsonl.gz")):
        return args.output_path
    return stage1_file(args.output_path, dataset, model, args.total_doc, position, args.seed)


def stage1_record(item, answer: str, instruction: str, model: str) -> dict:
    record = example_to_raw(item.example)
    record.update({
        "example_id": item.example_id,
        "distractors": [d.to_dict() for d in item.distractors],
        "documents": [d.to_dict() for d in item.documents],
        "gold_idx": item.position,
        "instruction": instruction,
        "oracle_prompt": item.prompt,
        "oracle_answer": answer,
        "oracle_correct": bool(score_prediction(answer, item.example.answers)),
        "model": model,
    })
    return record


@releasing_locks
def main(argv):
    args = parse_args(argv)
    check_names(args, "--dataset_name")
    # Flags first: a typo must not cost a model load or a long probe.
    resolve_inference(args)
    generation, instruction = check_model_flags(args)
    require_at_least(args, {"--total_doc": 1, "--limit": 1, "--chunk_size": 1, "--probe_num": 1, "--eval_holdout": 0,
                            "--temperature": 0})
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    auto = args.gold_doc.strip().lower() == "auto"
    if auto:
        parse_positions(args.probe_positions, args.total_doc, "--probe_positions")
        if not 0 < args.probe_alpha < 1:
            raise UserError(f"--probe_alpha must be between 0 and 1, got {args.probe_alpha}")
        position = None
    else:
        position = parse_position(args.gold_doc, args.total_doc, "--gold_doc")
    dataset = args.dataset_name or dataset_name_from_path(args.input_path)
    name = check_name(model_name(args.model), "--model (its name in the output file)")
    # Output checks and lock before the input is read or a model loads (auto: the name waits for the probe).
    if auto:
        check_writable(os.path.dirname(os.path.abspath(output_file(args, dataset, name, 0))))
    else:
        claim_output(output_file(args, dataset, name, position), {"--input-path": args.input_path}, flag="--output-path")
    examples = load_examples(args.input_path, total_doc=args.total_doc)
    if not examples:
        raise UserError(f"{args.input_path}: no examples")
    model_path = resolve_model(args.model)

    backend = None

    def get_backend():
        nonlocal backend
        if backend is None:
            backend = open_backend(generation, model_path, max_model_len=args.max_prompt_length + args.max_new_tokens,
                                   seed=args.seed, need_chat_template=True)
        return backend

    try:
        probe = None
        if auto:
            position, probe = choose_advantageous_position(args, get_backend(), examples, instruction)
        todo = examples[: args.limit] if args.limit else examples
        path = output_file(args, dataset, name, position)
        if auto:
            claim_output(path, {"--input-path": args.input_path}, flag="--output-path")
        # Everything that changes the records; any change starts the chunks over.
        config = {
            "stage": 1, "input": file_identity(args.input_path), "model": model_path, "total_doc": args.total_doc,
            "gold_doc": position, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "instruction": instruction, "limit": args.limit,
            "chunk_size": args.chunk_size, "full_answers": args.full_answers, **generation.record(),
        }
        output = ChunkedOutput(path, config)
        reused = output.complete
        chunks = [range(s, min(s + args.chunk_size, len(todo))) for s in range(0, len(todo), args.chunk_size)]
        if output.complete:
            print(f"== stage 1: {path} is already complete with these arguments; reusing it (delete it to recompute)")
        else:
            print(f"== stage 1: {len(todo)} examples, gold at position {position} of {args.total_doc}, "
                  f"backend {get_backend().name}, {len(chunks)} chunks -> {path}")
        started, generated = time.perf_counter(), 0
        for index, ids in enumerate(chunks):
            if output.done(index):
                continue
            items = prompt_examples(backend.tokenizer, [todo[i] for i in ids], list(ids), position, args.seed,
                                    instruction)
            check_prompt_lengths(backend, [it.prompt for it in items], args.max_prompt_length, f"chunk {index}")
            answers = backend.generate(
                [it.prompt for it in items], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed * 100003 + index, stop_at_newline=not args.full_answers,
                desc=f"chunk {index + 1}/{len(chunks)}",
            )
            output.write_chunk(index, [stage1_record(it, a, instruction, name) for it, a in zip(items, answers)])
            generated += len(items)
        seconds = time.perf_counter() - started
    finally:
        if backend is not None:  # vLLM worker processes must not outlive an error
            backend.close()
    records = output.finalize(len(chunks))

    accuracy = 100.0 * sum(r["oracle_correct"] for r in records) / len(records)
    stats = {
        "output": path, "examples": len(records), "gold_doc": position, "accuracy": round(accuracy, 2),
        "generated_now": generated, "seconds": round(seconds, 1),
        "prompts_per_s": round(generated / seconds, 2) if generated else None, "config": config, "probe": probe,
    }
    summary_path = stage1_summary(path)
    if not (reused and os.path.exists(summary_path)):  # keep the throughput of the run that did the work
        write_text_atomic(summary_path, json.dumps(stats, indent=1, default=str))
    rate = f", {generated / seconds:.1f} prompts/s" if generated else ""
    print(f"accuracy at position {position}: {accuracy:.1f}% of {len(records)} ({seconds:.1f} s{rate})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
