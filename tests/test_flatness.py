"""Flatness of an accuracy curve over positions (Cochran's Q, gap interval) and its column in
reproduce.py's table, on synthetic prediction files (the tiny model's answers are all wrong, so the
end-to-end test cannot tell a flat curve from a biased one)."""

import json
import math
import os
import random

import pytest

from pos2distill.experiment_table import write_table
from pos2distill.flatness import chi2_sf, cochran_q, flatness, gap_interval
from pos2distill.jsonl import write_jsonl
from pos2distill.names import eval_dir, predictions_file, summary_prefix
from pos2distill.report import summarize


@pytest.mark.parametrize("x, df, p", [(3.841459, 1, 0.05), (5.991465, 2, 0.05), (7.814728, 3, 0.05),
                                      (9.487729, 4, 0.05), (13.276704, 4, 0.01), (20.515, 5, 0.001)])
def test_chi2_sf_matches_tabulated_critical_values(x, df, p):
    assert chi2_sf(x, df) == pytest.approx(p, rel=1e-4)
    assert chi2_sf(0.0, df) == 1.0


def alternative_q(table):
    """Cochran's Q in its other textbook form: k(k-1) sum_j (C_j - mean C)^2 / sum_i R_i (k - R_i)."""
    k = len(table[0])
    columns = [sum(row[j] for row in table) for j in range(k)]
    mean = sum(columns) / k
    return k * (k - 1) * sum((c - mean) ** 2 for c in columns) / sum(sum(r) * (k - sum(r)) for r in table)


def test_cochran_q_two_positions_is_mcnemar_and_matches_the_other_form():
    table = [[1, 0]] * 9 + [[0, 1]] * 3 + [[1, 1]] * 20 + [[0, 0]] * 8
    q, df, p = cochran_q(table)
    assert q == pytest.approx((9 - 3) ** 2 / (9 + 3)) and df == 1
    assert p == pytest.approx(math.erfc(math.sqrt(q / 2)))  # chi-square(1) tail
    rng = random.Random(0)
    for k in (3, 5):
        table = [[int(rng.random() < 0.3 + 0.1 * j) for j in range(k)] for _ in range(60)]
        assert cochran_q(table)[0] == pytest.approx(alternative_q(table))
    assert cochran_q([[1, 1, 1], [0, 0, 0]]) == (0.0, 2, 1.0)  # no question differs between positions


def records(pattern, label_positions=(0, 1, 2)):
    """Prediction records: question i is right at position p when pattern(i, p)."""
    return [{"example_id": i, "question": f"q{i}", "gold_idx": p, "correct": bool(pattern(i, p))}
            for i in range(40) for p in label_positions]


def test_flatness_flags_a_biased_curve_and_not_a_flat_one():
    biased = flatness(records(lambda i, p: p == 0 or i < 10))
    assert not biased["flat"] and biased["p"] < 1e-6 and biased["df"] == 2
    assert biased["gap"] == pytest.approx(75.0) and 50 < biased["gap_ci95"][0] < 75 < biased["gap_ci95"][1]
    flat = flatness(records(lambda i, p: i % 3 == 0))  # right at every position or at none
    assert flat["flat"] and flat["p"] == 1.0 and flat["gap"] == 0.0 and flat["gap_ci95"] == [0.0, 0.0]
    noisy = flatness(records(lambda i, p: (i + p) % 4 == 0))  # 10 right per position, different questions
    assert noisy["gap"] == 0.0 and noisy["flat"] and noisy["gap_ci95"][1] > 0  # gap 0, yet uncertain
    partial = flatness(records(lambda i, p: True)[:-1])  # question 39 lacks position 2
    assert partial["questions"] == 39 and partial["left_out"] == 1
    assert gap_interval([[1, 0]] * 5 + [[0, 1]] * 5, resamples=200, seed=1)[0] == 0.0


def test_table_has_the_flat_column_and_the_paired_lines(tmp_path):
    out = str(tmp_path)
    runs = {"base": lambda i, p: p == 0 or i < 10, "pine": lambda i, p: i < 20,
            "p2d-seed42": lambda i, p: i < 30, "p2d-seed43": lambda i, p: p == 2 or i < 5}
    for label, pattern in runs.items():
        folder = eval_dir(os.path.join(out, "evaluate"), "nq", label)
        os.makedirs(folder)
        predictions = records(pattern)
        write_jsonl(predictions_file(folder, 3), predictions)
        with open(summary_prefix(folder, 3) + ".json", "w") as f:
            json.dump([summarize(predictions, label, 3)], f)
    os.makedirs(os.path.join(out, "compare"))
    with open(os.path.join(out, "compare", "nq3-pine.json"), "w") as f:
        json.dump({"average": {"difference": 7.5, "ci95": [1.0, 14.0], "examples": 40}}, f)
    evalset = ("nq3", None, "nq", 3, "all", 8, None)
    labels = [("base", "base"), ("pine", "pine"), ("p2d", "p2d-seed42"), ("p2d", "p2d-seed43")]
    text = write_table(out, "pine", [evalset], labels, [("base", "pine"), ("base", "p2d-seed42")])
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("| base |")).endswith("| no |")
    assert next(line for line in lines if line.startswith("| pine |")).endswith("| yes |")
    assert next(line for line in lines if line.startswith("| p2d | 2/2 |")).endswith("| 1/2 |")
    assert "- pine: average +7.5 points vs base, 95% CI [+1.0, +14.0] (40 questions)" in lines
    assert not any(line.startswith("- p2d-seed42: average") for line in lines)  # its comparison is missing
    assert any(line.startswith("- base: Q ") and "not flat; gap 75.0 [" in line for line in lines)
    numbers = json.load(open(tmp_path / "table.json"))["nq3"]
    assert numbers["pine"]["flatness"]["pine"]["flat"] and not numbers["base"]["flatness"]["base"]["flat"]
