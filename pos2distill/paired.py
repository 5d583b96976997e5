"""Paired comparison of two stage-4 runs on the same questions and positions.

Two evaluations of the same prompts (base vs trained, or a run vs its repeat) are compared
per (example, position) pair, which is far more sensitive than comparing two accuracies:
- per position: the accuracy change, a 95% interval for the paired difference of proportions
  (Wald, from the discordant counts) and McNemar's exact two-sided p-value;
- the average over positions: each example's mean correctness over the positions is a paired
  sample; the change of the average gets a 95% t-style interval from those per-example changes.
"""

import math
from collections import defaultdict

from .errors import UserError

Z95 = 1.96


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_difference_interval(only_a: int, only_b: int, n: int) -> tuple[float, float, float]:
    """(difference, low, high) of accuracy B - A in percent, from the discordant counts of n pairs."""
    if n == 0:
        return (0.0, 0.0, 0.0)
    diff = (only_b - only_a) / n
    variance = ((only_a + only_b) / n - diff * diff) / n
    half = Z95 * math.sqrt(max(variance, 0.0))
    return (100.0 * diff, 100.0 * (diff - half), 100.0 * (diff + half))


def index_records(records: list[dict], label: str) -> tuple[dict, dict]:
    """``{(example_id, gold_idx): correct}`` and ``{example_id: question}``, field types checked."""
    out, questions = {}, {}
    for number, record in enumerate(records, 1):
        missing = [k for k in ("example_id", "gold_idx", "correct") if k not in record]
        if missing:
            raise UserError(f"{label}: record {number} has no {', '.join(missing)} (not a stage-4 predictions file?)")
        for field, kind in (("example_id", int), ("gold_idx", int), ("correct", (bool, int, float))):
            value = record[field]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"{label}: record {number}: {field!r} must be {getattr(kind, '__name__', 'a boolean')}, "
                                f"got {value!r:.40}")  # "false" as a string would count as correct
        key = (record["example_id"], record["gold_idx"])
        if key in out:
            raise UserError(f"{label}: example {key[0]} appears twice at position {key[1]}")
        out[key] = bool(record["correct"])
        if "question" in record:
            questions[key[0]] = record["question"]
    return out, questions


def _check_same_questions(questions_a: dict, questions_b: dict, label_a: str, label_b: str) -> None:
    """Equal example ids are not equal questions: two runs on other input files would pair at random."""
    for example_id in sorted(set(questions_a) & set(questions_b)):
        if questions_a[example_id] != questions_b[example_id]:
            differ = sum(questions_a[i] != questions_b[i] for i in set(questions_a) & set(questions_b))
            raise UserError(f"{label_a} and {label_b} ask other questions under the same example ids ({differ} "
                            f"differ; example {example_id}: {questions_a[example_id]!r:.60} vs "
                            f"{questions_b[example_id]!r:.60}); compare runs on the same --input-path")


def compare_runs(records_a: list[dict], records_b: list[dict], label_a: str = "A", label_b: str = "B") -> dict:
    """Paired per-position and average comparison of run B against run A (same prompts)."""
    (a, questions_a), (b, questions_b) = index_records(records_a, label_a), index_records(records_b, label_b)
    _check_same_questions(questions_a, questions_b, label_a, label_b)
    if set(a) != set(b):
        missing = len(set(a) ^ set(b))
        raise UserError(f"{label_a} and {label_b} do not cover the same (example, position) pairs "
                        f"({missing} differ); compare runs of the same --sample_num and --positions")
    by_position = defaultdict(list)
    for key in a:
        by_position[key[1]].append(key)
    positions = {}
    for position in sorted(by_position):
        keys = by_position[position]
        only_a = sum(1 for k in keys if a[k] and not b[k])
        only_b = sum(1 for k in keys if b[k] and not a[k])
        diff, low, high = paired_difference_interval(only_a, only_b, len(keys))
        positions[position] = {
            "n": len(keys),
            "accuracy_a": 100.0 * sum(a[k] for k in keys) / len(keys),
            "accuracy_b": 100.0 * sum(b[k] for k in keys) / len(keys),
            "difference": diff,
            "ci95": (low, high),
            "only_a": only_a,
            "only_b": only_b,
            "mcnemar_p": mcnemar_exact_p(only_a, only_b),
        }
    # Average over positions: per example, the mean correctness over the positions it has.
    per_example = defaultdict(list)
    for key in a:
        per_example[key[0]].append(float(b[key]) - float(a[key]))
    changes = [100.0 * sum(v) / len(v) for v in per_example.values()]
    mean = sum(changes) / len(changes)
    spread = math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1)) if len(changes) > 1 else 0.0
    half = Z95 * spread / math.sqrt(len(changes))
    average_a = sum(p["accuracy_a"] for p in positions.values()) / len(positions)
    average_b = sum(p["accuracy_b"] for p in positions.values()) / len(positions)
    return {
        "label_a": label_a,
        "label_b": label_b,
        "positions": positions,
        "average": {"a": average_a, "b": average_b, "difference": average_b - average_a,
                    "ci95": (mean - half, mean + half), "examples": len(changes)},
    }


def comparison_table(result: dict) -> str:
    """Markdown table of ``compare_runs``'s result."""
    a, b = result["label_a"], result["label_b"]
    lines = [f"| position | {a} | {b} | change | 95% CI (paired) | only {a} | only {b} | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for position, row in result["positions"].items():
        low, high = row["ci95"]
        lines.append(f"| {position} | {row['accuracy_a']:.1f} | {row['accuracy_b']:.1f} | {row['difference']:+.1f} | "
                     f"{low:+.1f} .. {high:+.1f} | {row['only_a']} | {row['only_b']} | {row['mcnemar_p']:.3g} |")
    avg = result["average"]
    low, high = avg["ci95"]
    lines.append(f"| average | {avg['a']:.1f} | {avg['b']:.1f} | {avg['difference']:+.1f} | {low:+.1f} .. {high:+.1f} "
                 f"| | | |")
    return "\n".join(lines) + "\n"
