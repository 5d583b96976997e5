"""Paired comparison of two stage-4 runs, against hand-computed values."""

import json
import math
import os
import subprocess
import sys

import pytest

from pos2distill.errors import UserError
from pos2distill.jsonl import write_jsonl
from pos2distill.paired import compare_runs, mcnemar_exact_p, paired_difference_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(correct_by_position):
    return [{"example_id": i, "gold_idx": p, "correct": c}
            for p, flags in correct_by_position.items() for i, c in enumerate(flags)]


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 * 0.5**5)  # 0.0625
    assert mcnemar_exact_p(1, 4) == pytest.approx(2 * (1 + 5) / 32)  # 0.375
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def test_paired_interval_by_hand():
    # 10 pairs, 1 right only in A, 4 right only in B: d = 0.3, var = (0.5 - 0.09) / 10
    diff, low, high = paired_difference_interval(1, 4, 10)
    half = 1.96 * math.sqrt(0.041)
    assert diff == pytest.approx(30.0)
    assert (low, high) == (pytest.approx(100 * (0.3 - half)), pytest.approx(100 * (0.3 + half)))


def test_compare_runs_per_position_and_average():
    a = records({0: [1, 1, 0, 0], 1: [0, 0, 0, 1]})
    b = records({0: [1, 1, 0, 0], 1: [1, 1, 0, 1]})
    result = compare_runs(a, b, "base", "p2d")
    zero, one = result["positions"][0], result["positions"][1]
    assert zero["difference"] == 0 and zero["mcnemar_p"] == 1.0 and zero["ci95"] == (0.0, 0.0)
    assert (one["accuracy_a"], one["accuracy_b"], one["only_a"], one["only_b"]) == (25.0, 75.0, 0, 2)
    assert one["mcnemar_p"] == pytest.approx(0.5)
    avg = result["average"]
    assert (avg["a"], avg["b"], avg["difference"]) == (37.5, 62.5, 25.0)
    # per-example changes of the average: 50, 50, 0, 0 -> mean 25, sd 28.87, half 1.96*sd/2
    half = 1.96 * math.sqrt(((25**2) * 4) / 3) / 2
    assert avg["ci95"] == (pytest.approx(25 - half), pytest.approx(25 + half))


def test_compare_runs_rejects_different_prompts():
    with pytest.raises(UserError, match="same"):
        compare_runs(records({0: [1, 0]}), records({0: [1, 0, 1]}))
    with pytest.raises(UserError, match="no correct"):
        compare_runs([{"example_id": 0, "gold_idx": 0}], [])


def test_cli(tmp_path):
    write_jsonl(str(tmp_path / "a.jsonl.gz"), records({0: [1, 0, 1, 0]}))
    write_jsonl(str(tmp_path / "b.jsonl.gz"), records({0: [1, 1, 1, 1]}))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "compare_predictions.py"), str(tmp_path / "a.jsonl.gz"),
                           str(tmp_path / "b.jsonl.gz"), "--label", "base", "p2d", "--output", str(tmp_path / "cmp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| 0 | 50.0 | 100.0 | +50.0 |" in done.stdout
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["positions"]["0"]["only_b"] == 2
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "compare_predictions.py"), str(tmp_path / "x.gz"),
                              str(tmp_path / "b.jsonl.gz")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:") and "Traceback" not in missing.stderr
