"""Stage 4: accuracy at every gold-document position.

For each model and each position, the last ``--sample_num`` examples are asked
with the gold document moved to that position (distractor order fixed per
example), answered greedily, and scored by best-subspan EM on the first line.
Writes per-example predictions (.jsonl.gz), a summary table (CSV, Markdown,
JSON) with 95% confidence intervals, average and gap, and a PNG plot that
overlays all models given.
"""

import sys

from pos2distill.cli_args import add_model_flags, check_model_flags, dataset_name_from_path, require_at_least
from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.flag_types import harden_numbers
from pos2distill.formats import load_examples
from pos2distill.pine import open_backend, resolve_inference
from pos2distill.models import resolve_model
from pos2distill.names import (check_name, check_names, eval_dir, model_name, overlay_prefix, predictions_file,
                               summary_prefix)
from pos2distill.output_guard import claim_output, releasing_locks
from pos2distill.position_eval import evaluate_positions
from pos2distill.positions import parse_positions
from pos2distill.report import plot_positions, summarize, to_console, write_summaries
from pos2distill.resumable import ChunkedOutput, file_identity
from pos2distill.training_questions import training_questions


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("--input-path", dest="input_path", required=True, help="evaluation file (.jsonl[.gz])")
    parser.add_argument("--output-path", dest="output_path", default="evaluate", help="output folder")
    parser.add_argument("--dataset_name", default=None, help="default: from the input file name (nq, kv, tqa, ...)")
    parser.add_argument("--total_doc", type=int, default=20, help="documents per prompt")
    parser.add_argument("--sample_num", type=int, default=500, help="evaluate the last N examples (-1: all)")
    parser.add_argument("--positions", default="all", help="all | comma list such as 0,4,9,last")
    parser.add_argument("--label", nargs="*", default=None, help="plot/table labels, one per --model (default: the model names)")
    parser.add_argument("--train_dataset", default=None,
                        help="stage-2 dataset folder or stage-1 file: warn if evaluated questions were trained on (default: no check)")
    parser.add_argument("--no_stop_at_newline", action="store_true",
                        help="generate the full answer (only the first line is scored either way)")
    parser.add_argument("--positions_per_call", type=int, default=1,
                        help="positions answered by one generate call (HF: larger mixed batches; each "
                             "position is saved for resuming once its call returns; as with --batch_size, "
                             "a resumed run must use the same value)")
    parser.add_argument("--compact_finished", action="store_true",
                        help="HF backend: finished rows leave the batch (greedy; same outputs up to bf16 "
                             "rounding; docs/performance.md); ignored by vLLM")
    add_model_flags(parser, several_models=True)
    return harden_numbers(parser)


def parse_args(argv):
    return build_parser().parse_args(argv)


def warn_training_overlap(train_dataset: str, examples) -> None:
    trained = training_questions(train_dataset)
    overlap = sum(1 for ex in examples if ex.question in trained)
    if overlap:
        print(f"WARNING: {overlap} of {len(examples)} evaluated questions are in the training data {train_dataset}")
    else:
        print(f"no overlap between the evaluated questions and {train_dataset}")


def evaluate_model(args, model_path, label, examples, example_ids, positions, dataset, generation, instruction):
    out_dir = eval_dir(args.output_path, dataset, label)
    predictions_path = predictions_file(out_dir, args.total_doc)
    compact = args.compact_finished and generation.backend == "hf" and generation.inference == "plain"  # vLLM, PINE: not used
    # Everything that changes the predictions; any change starts the chunks (one per position) over.
    config = {
        "stage": "eval", "model": model_path, "input": file_identity(args.input_path), "total_doc": args.total_doc,
        "sample_num": args.sample_num, "positions": positions, "seed": args.seed, "instruction": instruction,
        "max_new_tokens": args.max_new_tokens, "stop_at_newline": not args.no_stop_at_newline,
        "positions_per_call": args.positions_per_call, "compact_finished": compact, **generation.record(),
    }
    output = ChunkedOutput(predictions_path, config)
    stats = {"generated": 0, "seconds": 0.0}
    if output.complete:
        print(f"== {label}: {predictions_path} is already complete with these arguments; reusing it")
    else:
        with open_backend(generation, model_path, max_model_len=args.max_prompt_length + args.max_new_tokens,
                          seed=args.seed, need_chat_template=True, compact_finished=compact) as backend:
            print(f"== {label}: {len(examples)} examples x {len(positions)} positions, backend {backend.name}")
            _, stats = evaluate_positions(
                backend, examples, example_ids, positions, seed=args.seed, max_new_tokens=args.max_new_tokens,
                max_prompt_length=args.max_prompt_length, instruction=instruction,
                stop_at_newline=not args.no_stop_at_newline, output=output,
                positions_per_call=args.positions_per_call,
            )
    records = output.finalize(len(positions))
    summary = summarize(records, label, args.total_doc)
    rate = stats["generated"] / stats["seconds"] if stats["generated"] else None
    summary.update({"model": model_path, "backend": generation.backend, **generation.software(),
                    "generated_prompts": stats["generated"],
                    "generation_seconds": round(stats["seconds"], 1), "prompts_per_s": round(rate, 2) if rate else None})
    write_summaries([summary], summary_prefix(out_dir, args.total_doc))
    done = f"{stats['generated']} prompts generated in {stats['seconds']:.1f} s ({rate:.1f} prompts/s)" if rate else "all resumed"
    print(f"{label}: {len(records)} predictions ({done}); predictions in {predictions_path}")
    return summary


@releasing_locks
def main(argv):
    args = parse_args(argv)
    check_names(args, "--dataset_name", "--label")
    # Flags first: a typo must not surface after the first model's evaluation.
    resolve_inference(args)
    generation, instruction = check_model_flags(args)
    require_at_least(args, {"--total_doc": 1, "--positions_per_call": 1})
    if args.sample_num == 0 or args.sample_num < -1:
        raise UserError(f"--sample_num must be -1 (all) or at least 1, got {args.sample_num}")
    positions = parse_positions(args.positions, args.total_doc, "--positions")
    models = args.model
    labels = args.label or [check_name(model_name(m), "--model (its name, the default --label)") for m in models]
    if len(labels) != len(models):
        raise UserError(f"--label gives {len(labels)} labels for {len(models)} models")
    if len(set(labels)) != len(labels):
        raise UserError(f"--label: labels must differ (they name the output folders; pass --label), got {labels}")
    dataset = args.dataset_name or dataset_name_from_path(args.input_path)
    # Every output folder checked (writable, not an input) and locked before any input is read or model loaded.
    inputs = {"--input-path": args.input_path, "--train_dataset": args.train_dataset}
    for label in labels:
        claim_output(eval_dir(args.output_path, dataset, label), inputs, folder=True, flag="--output-path")
    claim_output(overlay_prefix(args.output_path, dataset, args.total_doc, labels), inputs, flag="--output-path")
    model_paths = [resolve_model(m) for m in models]
    examples = load_examples(args.input_path, total_doc=args.total_doc)
    if not examples:
        raise UserError(f"{args.input_path}: no examples")
    first = 0 if args.sample_num < 0 else max(0, len(examples) - args.sample_num)
    example_ids = list(range(first, len(examples)))
    examples = examples[first:]
    if args.train_dataset:
        warn_training_overlap(args.train_dataset, examples)
    summaries = [
        evaluate_model(args, path, label, examples, example_ids, positions, dataset, generation, instruction)
        for path, label in zip(model_paths, labels)
    ]
    prefix = overlay_prefix(args.output_path, dataset, args.total_doc, labels)
    tables = write_summaries(summaries, prefix)
    plot = plot_positions(summaries, prefix + ".png",
                          title=f"{dataset}, {args.total_doc} documents, last {len(examples)} examples")
    print()
    print(to_console(summaries))
    print(f"tables: {', '.join(tables)}\nplot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
