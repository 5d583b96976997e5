"""The final table of ``reproduce.py``: per evaluation set, each row's accuracy at every position
(mean over its seeds), average and gap, the paper's published numbers beside them, and each
trained run's paired change of the average against base (``compare_predictions.py``)."""

import json
import os
import statistics

from . import experiments
from .jsonl import write_text_atomic
from .names import eval_dir, summary_prefix


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(value, sd=None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def set_table(out: str, evalset, labels, paper=None) -> tuple[list[str], dict]:
    """Markdown lines and the numbers of one evaluation set."""
    set_id, _, dataset, total, _, _, _ = evalset
    runs = {}  # row -> summaries of its seeds
    for row, label in labels:
        summary = _load(summary_prefix(eval_dir(os.path.join(out, "evaluate"), dataset, label), total) + ".json")
        runs.setdefault(row, []).append(summary[0] if summary else None)
    positions = sorted({int(p) for ss in runs.values() for s in ss if s for p in s["accuracy"]})
    lines = [f"### {set_id}: {dataset}, {total} documents", "",
             "| row | runs | " + " | ".join(str(p) for p in positions) + " | avg | gap |" + (" paper avg |" if paper else ""),
             "|---" * (len(positions) + 4 + bool(paper)) + "|"]
    numbers = {}
    for row, summaries in runs.items():
        have = [s for s in summaries if s]
        cells = [_fmt(statistics.mean(s["accuracy"][str(p)] for s in have)) if have and all(
            str(p) in s["accuracy"] for s in have) else "—" for p in positions]
        averages = [s["average"] for s in have]
        avg = statistics.mean(averages) if have else None
        sd = statistics.stdev(averages) if len(averages) > 1 else None
        gap = statistics.mean(s["gap"] for s in have) if have else None
        numbers[row] = {"runs": len(have), "average": avg, "average_sd": sd, "gap": gap,
                        "accuracy": {p: statistics.mean(s["accuracy"][str(p)] for s in have) for p in positions
                                     if have and all(str(p) in s["accuracy"] for s in have)}}
        published = (paper or {}).get("rows", {}).get(row, {})
        lines.append(f"| {row} | {len(have)}/{len(summaries)} | " + " | ".join(cells) + f" | {_fmt(avg, sd)} | "
                     f"{_fmt(gap)} |" + (f" {_fmt(published.get('average'))} |" if paper else ""))
        at = {total - 1 if p == "last" else p: v for p, v in published.get("positions", {}).items()}
        if at and set(at) <= set(positions):  # only where the paper's positions were evaluated
            lines.append(f"| {row} (paper) | | " + " | ".join(_fmt(at.get(p)) for p in positions)
                         + f" | {_fmt(published.get('average'))} | | |")
    changes = []
    for row, label in labels:
        result = _load(os.path.join(out, "compare", f"{set_id}-{label}.json"))
        if row != "base" and result:
            average = result["average"]
            changes.append(f"- {label}: average {average['difference']:+.1f} points vs base, 95% CI "
                           f"[{average['ci95'][0]:+.1f}, {average['ci95'][1]:+.1f}] ({average['examples']} questions)")
    if changes:
        lines += ["", "Paired change against base (compare_predictions.py):", *changes]
    return lines, numbers


def write_table(out: str, experiment: str, sets, labels) -> str:
    """Write OUT/table.md and OUT/table.json; return the Markdown."""
    paper = experiments.PAPER.get(experiment)
    lines = [f"## {experiment}: accuracy (%) by gold position", ""]
    if paper:
        lines += [f"Paper: {paper['model']}, {paper['source']}; '—' where the paper gives no number.", ""]
    numbers = {}
    for index, evalset in enumerate(sets):
        # the paper's numbers are for the training data's set (NQ, 20 documents) only
        more, numbers[evalset[0]] = set_table(out, evalset, labels, paper if index == 0 else None)
        lines += more + [""]
    text = "\n".join(lines)
    write_text_atomic(os.path.join(out, "table.md"), text)
    write_text_atomic(os.path.join(out, "table.json"), json.dumps(numbers, indent=1) + "\n")
    return text
