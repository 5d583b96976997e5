"""One table over the document counts (or task) evaluated by generalization.sh: average and gap
of the base model and a checkpoint, the checkpoint's gap as a fraction of base's (the issue's
target: at most 0.5 at 30 and 50 documents) and its average change.

    python benchmarks/summarize_generalization.py --out_dir $OUT --checkpoint p2d --dataset nq 10 30 50

reads OUT_DIR/{base,CHECKPOINT}_DATASET_summary_Kdocs.json (reproduce.sh eval) and writes
OUT_DIR/generalization_DATASET.{md,json}.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pos2distill.errors import UserError, run_cli  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, help="where reproduce.sh eval left the summaries")
    parser.add_argument("--checkpoint", required=True, help="the trained run's name")
    parser.add_argument("--dataset", required=True, help="dataset name in the summary file names (nq, kv, ...)")
    parser.add_argument("counts", nargs="+", type=int, help="document (or key) counts evaluated")
    parser.add_argument("--debug", action="store_true", help="full tracebacks")
    return parser.parse_args(argv)


def comparison_row(total_docs: int, base: dict, trained: dict) -> dict:
    """Average, gap (max - min over positions) and their changes for one document count."""
    if base["positions"] != trained["positions"]:
        raise UserError(f"{total_docs} documents: base and checkpoint were evaluated at different positions")
    return {
        "total_docs": total_docs,
        "positions": base["positions"],
        "base_average": base["average"],
        "base_gap": base["gap"],
        "trained_average": trained["average"],
        "trained_gap": trained["gap"],
        "gap_ratio": trained["gap"] / base["gap"] if base["gap"] else None,
        "average_change": trained["average"] - base["average"],
    }


def to_markdown(rows: list, checkpoint: str) -> str:
    lines = [f"| documents | positions | base avg | base gap | {checkpoint} avg | {checkpoint} gap | "
             "gap / base gap | avg change |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "n/a" if r["gap_ratio"] is None else f"{r['gap_ratio']:.2f}"
        lines.append(f"| {r['total_docs']} | {len(r['positions'])} | {r['base_average']:.1f} | {r['base_gap']:.1f} | "
                     f"{r['trained_average']:.1f} | {r['trained_gap']:.1f} | {ratio} | {r['average_change']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from benchmarks.reports import write_report
    from pos2distill.jsonl import write_text_atomic
    from pos2distill.report import load_summaries

    args = parse_args(argv)
    rows = []
    for k in args.counts:
        pair = []
        for name in ("base", args.checkpoint):
            path = os.path.join(args.out_dir, f"{name}_{args.dataset}_summary_{k}docs.json")
            if not os.path.isfile(path):
                raise UserError(f"{path} is missing (benchmarks/reproduce.sh eval {name} writes it)")
            pair.append(load_summaries(path)[0])
        rows.append(comparison_row(k, *pair))
    prefix = os.path.join(args.out_dir, f"generalization_{args.dataset}")
    table = to_markdown(rows, args.checkpoint)
    write_text_atomic(prefix + ".md", table)
    write_report(prefix + ".json", {"dataset": args.dataset, "checkpoint": args.checkpoint, "rows": rows}, args)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
