"""Paired comparison of two stage-4 prediction files (same questions and positions).

    python compare_predictions.py evaluate/nq/base/predictions_20docs.jsonl.gz \\
        evaluate/nq/p2d/predictions_20docs.jsonl.gz --label base p2d --output evaluate/nq/base_vs_p2d

Per position: both accuracies, the change with a 95% interval for paired proportions and
McNemar's exact p-value; for the average over positions, a 95% interval from the per-example
changes. Use it for "did training change position 0?" and "does a repeat run reproduce?".
"""

import json
import sys

from pos2distill.cli_help import new_parser
from pos2distill.errors import run_cli
from pos2distill.jsonl import read_jsonl, write_text_atomic
from pos2distill.names import check_names
from pos2distill.output_guard import claim_output, refuse_output_is_input, releasing_locks
from pos2distill.paired import compare_runs, comparison_table


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("run_a", help="predictions_{k}docs.jsonl.gz of the reference run (e.g. base)")
    parser.add_argument("run_b", help="predictions of the run compared with it")
    parser.add_argument("--label", nargs=2, default=["A", "B"], metavar=("A", "B"), help="names of the two runs in the table")
    parser.add_argument("--output", default=None, help="write OUTPUT.md and OUTPUT.json (default: print only)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


@releasing_locks
def main(argv):
    args = build_parser().parse_args(argv)
    check_names(args, "--label")  # table headers, plain names as in stage 4
    if args.output:
        refuse_output_is_input({"--output (its .md)": args.output + ".md", "--output (its .json)": args.output + ".json"},
                               {"run_a": args.run_a, "run_b": args.run_b})
        claim_output(args.output + ".md", flag="--output")
    # read_jsonl reports a missing file or a bad line in one line itself
    result = compare_runs(read_jsonl(args.run_a), read_jsonl(args.run_b), *args.label)
    table = comparison_table(result)
    print(table, end="")
    if args.output:
        write_text_atomic(args.output + ".md", table)
        write_text_atomic(args.output + ".json", json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}.md and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
