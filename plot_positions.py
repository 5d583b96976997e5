"""Overlay saved stage-4 summaries (JSON) in one accuracy-vs-position plot and table.

    python plot_positions.py evaluate/nq/base/summary_20docs.json \\
        evaluate/nq/trained/summary_20docs.json --output compare.png --label base trained
"""

import os
import sys

from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.names import check_names
from pos2distill.output_guard import claim_output, refuse_output_is_input, releasing_locks
from pos2distill.report import load_summaries, plot_positions, table_paths, to_console, write_summaries


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="summary JSON files written by eval_data.py")
    parser.add_argument("--output", required=True, help="PNG path; tables go next to it (.csv, .md, .json)")
    parser.add_argument("--label", nargs="*", default=None, help="new labels, one per summary (default: the saved labels)")
    parser.add_argument("--title", default="", help="plot title (default: accuracy by gold-document position)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


@releasing_locks
def main(argv):
    args = build_parser().parse_args(argv)
    check_names(args, "--label")  # labels are table rows and plot legends: plain names, as in stage 4
    prefix = args.output[: -len(".png")] if args.output.endswith(".png") else args.output
    # --output x.png also writes x.json: it must not be one of the summaries read
    outputs = [prefix + ".png", *table_paths(prefix)]
    refuse_output_is_input({f"--output (its {os.path.splitext(p)[1]})": p for p in outputs},
                           {f"summary {i}": p for i, p in enumerate(args.summaries, 1)})
    claim_output(prefix + ".png", flag="--output")
    summaries = []
    for path in args.summaries:
        summaries.extend(load_summaries(path))  # a missing file is a one-line error there
    if args.label:
        if len(args.label) != len(summaries):
            raise UserError(f"--label gives {len(args.label)} labels for {len(summaries)} summaries")
        for summary, label in zip(summaries, args.label):
            summary["label"] = label
    write_summaries(summaries, prefix)
    plot_positions(summaries, prefix + ".png", title=args.title)
    print(to_console(summaries))
    print(f"wrote {prefix}.png (+ .csv, .md, .json)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
