"""Overlay saved stage-4 summaries (JSON) in one accuracy-vs-position plot and table.

    python plot_positions.py evaluate/nq/base/summary_20docs.json \\
        evaluate/nq/trained/summary_20docs.json --output compare.png --label base trained
"""

import sys

from pos2distill.cli_help import new_parser
from pos2distill.errors import UserError, run_cli
from pos2distill.names import check_names
from pos2distill.report import load_summaries, plot_positions, to_console, write_summaries


def build_parser():
    parser = new_parser(__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="summary JSON files written by eval_data.py")
    parser.add_argument("--output", required=True, help="PNG path; tables go next to it (.csv, .md, .json)")
    parser.add_argument("--label", nargs="*", default=None, help="new labels, one per summary (default: the saved labels)")
    parser.add_argument("--title", default="", help="plot title (default: accuracy by gold-document position)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    check_names(args, "--label")  # labels are table rows and plot legends: plain names, as in stage 4
    summaries = []
    for path in args.summaries:
        summaries.extend(load_summaries(path))  # a missing file is a one-line error there
    if args.label:
        if len(args.label) != len(summaries):
            raise UserError(f"--label gives {len(args.label)} labels for {len(summaries)} summaries")
        for summary, label in zip(summaries, args.label):
            summary["label"] = label
    prefix = args.output[: -len(".png")] if args.output.endswith(".png") else args.output
    write_summaries(summaries, prefix)
    plot_positions(summaries, prefix + ".png", title=args.title)
    print(to_console(summaries))
    print(f"wrote {prefix}.png (+ .csv, .md, .json)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
