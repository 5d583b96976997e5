"""Prepare offline data: k-document NQ sets from the oracle file, and synthetic KV retrieval.

    python prepare_data.py nq --oracle ../shared/data/nq-open-oracle.jsonl.gz --total_doc 20 \
        --output raw_data/nq-open-20_total_documents.jsonl.gz
    python prepare_data.py kv --num_keys 75 --num_examples 500 --seed 0 --output raw_data/kv-75.jsonl.gz
"""

import argparse

from pos2distill.cli_args import require_at_least
from pos2distill.cli_help import HelpFormatter, new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.flag_types import harden_numbers
from pos2distill.formats import load_examples
from pos2distill.jsonl import write_jsonl
from pos2distill.kv_data import generate_kv_records
from pos2distill.nq_builder import build_nq_sets
from pos2distill.output_guard import claim_output, releasing_locks


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = new_parser(__doc__.splitlines()[0], parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)

    nq = commands.add_parser("nq", parents=[common], formatter_class=HelpFormatter, help="k-document NQ sets with BM25 distractors")
    nq.add_argument("--oracle", required=True, help="nq-open-oracle.jsonl.gz (one gold ctx per question)")
    nq.add_argument("--total_doc", type=int, default=20, help="documents per question, gold included")
    nq.add_argument("--output", required=True, help="output .jsonl or .jsonl.gz")
    nq.add_argument("--limit", type=int, default=None, help="write only the first N questions (default: all)")

    kv = commands.add_parser("kv", parents=[common], formatter_class=HelpFormatter, help="synthetic key-value retrieval records")
    kv.add_argument("--num_keys", type=int, default=75, help="key-value pairs per record (its documents)")
    kv.add_argument("--num_examples", type=int, default=500, help="records to write")
    kv.add_argument("--seed", type=int, default=0, help="seeds the random keys and values")
    kv.add_argument("--output", required=True, help="output .jsonl or .jsonl.gz")
    return harden_numbers(parser)


def _skipped_note(skipped: list[tuple[int, str]], shown: int = 3) -> str:
    if not skipped:
        return ""
    listed = ", ".join(f"#{index + 1} {question!r}" for index, question in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"; skipped {len(skipped)} question(s) lacking enough passages without the answer: {listed}{more}"


@releasing_locks
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "nq":
        require_at_least(args, {"--total_doc": 1, "--limit": 1})
        claim_output(args.output, {"--oracle": args.oracle}, flag="--output")  # before the oracle is read
        examples = load_examples(args.oracle, fmt="litm")
        build = build_nq_sets(examples, args.total_doc, limit=args.limit)
        if not build.records:  # an empty set is never what was asked for
            raise UserError(f"{args.oracle}: no question could be built ({len(examples)} read"
                            f"{_skipped_note(build.skipped)}); nothing written to {args.output}")
        count = write_jsonl(args.output, build.records)
        print(f"wrote {count} records ({args.total_doc} documents each) to {args.output}{_skipped_note(build.skipped)}")
    else:
        require_at_least(args, {"--num_keys": 1, "--num_examples": 1})
        claim_output(args.output, flag="--output")
        records = generate_kv_records(args.num_examples, args.num_keys, args.seed)
        count = write_jsonl(args.output, records)
        print(f"wrote {count} records ({args.num_keys} keys each) to {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
