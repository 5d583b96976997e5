"""The final table of ``reproduce.py``: per evaluation set, each row's accuracy at every position
(mean over its seeds), average and gap, whether its curve is flat within noise (``flatness.py``),
the paper's published numbers beside them, each run's paired change of the average against base
or its other reference (``compare_predictions.py``), and PINE's cost (``bench_pine.py``)."""

import json
import os
import statistics

from . import experiments
from .flatness import ALPHA, flatness
from .jsonl import read_jsonl, write_text_atomic
from .names import eval_dir, predictions_file, summary_prefix

BENCH_FILE = "bench_pine.json"  # under the output folder


def comparison_prefix(out: str, set_id: str, ref: str, label: str) -> str:
    """compare_predictions.py's --output for LABEL against REF: compare/SET-LABEL (REF base) or SET-LABEL-vs-REF."""
    return os.path.join(out, "compare", f"{set_id}-{label}" + ("" if ref == "base" else f"-vs-{ref}"))


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(value, sd=None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def _flat_cell(results: list) -> str:
    """yes / no for one run, flat runs / runs for several, — where unknown."""
    known = [r["flat"] for r in results if r and r["flat"] is not None]
    if not known:
        return "—"
    return ("yes" if known[0] else "no") if len(results) == 1 else f"{sum(known)}/{len(results)}"


def _flat_line(label: str, f: dict) -> str:
    if f["flat"] is None:
        return f"- {label}: fewer than 2 positions or no complete question"
    low, high = f["gap_ci95"]
    return (f"- {label}: Q {f['q']:.2f} (df {f['df']}), p {f['p']:.3g}: {'flat' if f['flat'] else 'not flat'}; "
            f"gap {f['gap']:.1f} [{low:.1f}, {high:.1f}] points ({f['questions']} questions)")


def set_table(out: str, evalset, labels, pairs, paper=None) -> tuple[list[str], dict]:
    """Markdown lines and the numbers of one evaluation set."""
    set_id, _, dataset, total, _, _, _ = evalset
    runs, flat = {}, {}  # row -> summaries of its seeds; label -> flatness
    for row, label in labels:
        folder = eval_dir(os.path.join(out, "evaluate"), dataset, label)
        summary = _load(summary_prefix(folder, total) + ".json")
        runs.setdefault(row, []).append(summary[0] if summary else None)
        predictions = predictions_file(folder, total)
        flat[label] = flatness(read_jsonl(predictions), label) if summary and os.path.exists(predictions) else None
    positions = sorted({int(p) for ss in runs.values() for s in ss if s for p in s["accuracy"]})
    lines = [f"### {set_id}: {dataset}, {total} documents", "",
             "| row | runs | " + " | ".join(str(p) for p in positions) + " | avg | gap | flat |"
             + (" paper avg |" if paper else ""), "|---" * (len(positions) + 5 + bool(paper)) + "|"]
    numbers = {}
    for row, summaries in runs.items():
        have = [s for s in summaries if s]
        cells = [_fmt(statistics.mean(s["accuracy"][str(p)] for s in have)) if have and all(
            str(p) in s["accuracy"] for s in have) else "—" for p in positions]
        averages = [s["average"] for s in have]
        avg = statistics.mean(averages) if have else None
        sd = statistics.stdev(averages) if len(averages) > 1 else None
        gap = statistics.mean(s["gap"] for s in have) if have else None
        row_flat = {label: flat[label] for r, label in labels if r == row}
        numbers[row] = {"runs": len(have), "average": avg, "average_sd": sd, "gap": gap,
                        "accuracy": {p: statistics.mean(s["accuracy"][str(p)] for s in have) for p in positions
                                     if have and all(str(p) in s["accuracy"] for s in have)},
                        "flatness": row_flat}
        published = (paper or {}).get("rows", {}).get(row, {})
        lines.append(f"| {row} | {len(have)}/{len(summaries)} | " + " | ".join(cells) + f" | {_fmt(avg, sd)} | "
                     f"{_fmt(gap)} | {_flat_cell(list(row_flat.values()))} |" + (f" {_fmt(published.get('average'))} |" if paper else ""))
        at = {total - 1 if p == "last" else p: v for p, v in published.get("positions", {}).items()}
        if at and set(at) <= set(positions):  # only where the paper's positions were evaluated
            lines.append(f"| {row} (paper) | | " + " | ".join(_fmt(at.get(p)) for p in positions)
                         + f" | {_fmt(published.get('average'))} | | | |")
    changes = []
    for ref, label in pairs:
        result = _load(comparison_prefix(out, set_id, ref, label) + ".json")
        if result:
            average = result["average"]
            changes.append(f"- {label}: average {average['difference']:+.1f} points vs {ref}, 95% CI "
                           f"[{average['ci95'][0]:+.1f}, {average['ci95'][1]:+.1f}] ({average['examples']} questions)")
    if changes:
        lines += ["", "Paired change of the average (compare_predictions.py):", *changes]
    flat_lines = [_flat_line(label, flat[label]) for _, label in labels if flat[label]]
    if flat_lines:
        lines += ["", f"flat: accuracy equal at every position by Cochran's Q, paired by question (flat when p >= "
                      f"{ALPHA}); gap: max - min with a 95% bootstrap interval over questions (docs/pine.md):",
                  *flat_lines]
    return lines, numbers


def bench_lines(out: str) -> list[str]:
    """PINE's cost from benchmarks/bench_pine.py's report, if it ran."""
    report = _load(os.path.join(out, BENCH_FILE))
    if not report:
        return []
    lines = [f"### PINE's cost (benchmarks/bench_pine.py): {report['prompts']} prompts, "
             f"{report['mean_prompt_tokens']:.0f} tokens on average, {report['device']}, {report['dtype']}", "",
             "| batch | plain prompts/s | PINE prompts/s | slower | PINE same answer at every position |",
             "|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['batch_size']} | {run['plain']['prompts_per_s']:.2f} | {run['pine']['prompts_per_s']:.2f} "
                     f"| {run['slowdown']:.2f}x | {run['pine']['same_answer_at_every_position']:.0%} |")
    return lines + [""]


def write_table(out: str, experiment: str, sets, labels, pairs) -> str:
    """Write OUT/table.md and OUT/table.json; return the Markdown."""
    paper = experiments.PAPER.get(experiment)
    lines = [f"## {experiment}: accuracy (%) by gold position", ""]
    if paper:
        lines += [f"Paper: {paper['model']}, {paper['source']}; '—' where the paper gives no number.", ""]
    numbers = {}
    for index, evalset in enumerate(sets):
        # the paper's numbers are for the training data's set (NQ, 20 documents) only
        more, numbers[evalset[0]] = set_table(out, evalset, labels, pairs, paper if index == 0 else None)
        lines += more + [""]
    if experiments.EXPERIMENTS[experiment].get("bench"):
        lines += bench_lines(out)
    text = "\n".join(lines)
    write_text_atomic(os.path.join(out, "table.md"), text)
    write_text_atomic(os.path.join(out, "table.json"), json.dumps(numbers, indent=1) + "\n")
    return text
