"""Per-position accuracy summaries, confidence intervals, tables and plots."""

import csv
import io
import json
import math
import os
from collections import defaultdict

from .errors import UserError
from .jsonl import temporary_name, write_text_atomic


def wilson_interval(correct: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion, in percent (stable at 0% and 100%)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def summarize(records: list[dict], label: str, total_docs: int) -> dict:
    """Accuracy per gold position (percent), its 95% CI, the average over positions and the gap."""
    correct, count = defaultdict(float), defaultdict(int)
    for record in records:
        correct[record["gold_idx"]] += record["correct"]
        count[record["gold_idx"]] += 1
    positions = sorted(count)
    accuracy = {p: 100.0 * correct[p] / count[p] for p in positions}
    values = list(accuracy.values())
    return {
        "label": label,
        "total_docs": total_docs,
        "positions": positions,
        "n": {p: count[p] for p in positions},
        "accuracy": accuracy,
        "ci95": {p: wilson_interval(correct[p], count[p]) for p in positions},
        "average": sum(values) / len(values) if values else 0.0,
        "gap": max(values) - min(values) if values else 0.0,
    }


def _columns(summaries: list[dict]) -> list[int]:
    return sorted({p for s in summaries for p in s["positions"]})


def table_rows(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    positions = _columns(summaries)
    header = ["model"] + [str(p) for p in positions] + ["avg", "gap"]
    rows = []
    for s in summaries:
        cells = [f"{s['accuracy'][p]:.1f}" if p in s["accuracy"] else "" for p in positions]
        rows.append([s["label"], *cells, f"{s['average']:.1f}", f"{s['gap']:.1f}"])
    return header, rows


def to_markdown(summaries: list[dict]) -> str:
    header, rows = table_rows(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(summaries: list[dict]) -> str:
    """One row per (model, position): accuracy with CI bounds, plus the model's average and gap."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "total_docs", "position", "n", "accuracy", "ci95_low", "ci95_high", "average", "gap"])
    for s in summaries:
        for p in s["positions"]:
            low, high = s["ci95"][p]
            writer.writerow(
                [s["label"], s["total_docs"], p, s["n"][p], f"{s['accuracy'][p]:.2f}", f"{low:.2f}", f"{high:.2f}",
                 f"{s['average']:.2f}", f"{s['gap']:.2f}"]
            )
    return buffer.getvalue()


def to_console(summaries: list[dict]) -> str:
    header, rows = table_rows(summaries)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def table_paths(prefix: str) -> list[str]:
    """The files ``write_summaries`` writes for ``prefix``."""
    return [f"{prefix}.csv", f"{prefix}.md", f"{prefix}.json"]


def write_summaries(summaries: list[dict], prefix: str) -> list[str]:
    """Write ``prefix``.csv / .md / .json; return the paths."""
    paths = table_paths(prefix)
    write_text_atomic(paths[0], to_csv(summaries))
    write_text_atomic(paths[1], to_markdown(summaries))
    write_text_atomic(paths[2], json.dumps(summaries, indent=1))
    return paths


def load_summaries(path: str) -> list[dict]:
    """Read a summary JSON (JSON turns integer position keys into strings; turn them back)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        for s in data:
            for key in ("n", "accuracy", "ci95"):
                s[key] = {int(p): v for p, v in s[key].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError, ValueError) as err:
        raise UserError(f"{path}: not a summary JSON written by eval_data.py ({type(err).__name__}: {err})") from err
    return data


# Per model: line style and marker, so overlapping curves stay distinguishable without colour.
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_positions(summaries: list[dict], path: str, title: str = "") -> str:
    """Accuracy vs gold position, one line (with its 95% CI as a shaded band) per model/checkpoint.

    Overlapping models stay apart: each has its own line style and marker, its band is light
    with edges in its line style, and its points are shifted slightly along x.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    spread = 0.08 if len(summaries) > 1 else 0.0  # of one position step, between neighbouring models
    for i, s in enumerate(summaries):
        shift = spread * (i - (len(summaries) - 1) / 2)
        xs = [p + shift for p in s["positions"]]
        ys = [s["accuracy"][p] for p in s["positions"]]
        low = [s["ci95"][p][0] for p in s["positions"]]
        high = [s["ci95"][p][1] for p in s["positions"]]
        style = _LINE_STYLES[i % len(_LINE_STYLES)]
        (line,) = ax.plot(xs, ys, linestyle=style, marker=_MARKERS[i % len(_MARKERS)], markersize=4, linewidth=1.4,
                          zorder=3 + i, label=f"{s['label']} (avg {s['average']:.1f}, gap {s['gap']:.1f})")
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.08, linewidth=0, zorder=1)
        for edge in (low, high):
            ax.plot(xs, edge, color=line.get_color(), linestyle=style, linewidth=0.6, alpha=0.5, zorder=2)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(facecolor="grey", alpha=0.25, label="shaded: 95% interval (Wilson)"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position of the gold document (0 = first)")
    ax.set_ylabel("accuracy (%), band: 95% interval")
    ax.set_title(title or "accuracy by gold-document position")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    tmp = temporary_name(path)
    try:
        # The temporary name has no extension: say which format to write.
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
