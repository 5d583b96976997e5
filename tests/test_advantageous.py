"""Stage 1's choice of the advantageous position: noise keeps the first, a real lead moves it."""

import math
import os
import subprocess
import sys

import pytest

from pos2distill.advantageous import choice_table, choose_position
from pos2distill.errors import UserError
from pos2distill.paired import holm_adjusted, mcnemar_exact_p, mcnemar_one_sided_p

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe_records(right_by_position: dict, n: int = 100) -> list[dict]:
    """``{position: set of example ids answered right}`` -> probe records over ``n`` questions."""
    return [{"example_id": i, "gold_idx": p, "correct": i in right}
            for p, right in right_by_position.items() for i in range(n)]


def test_one_sided_mcnemar_and_holm_by_hand():
    # 5 right only at A, 10 right only at B: P(X >= 10), X ~ Bin(15, 1/2)
    want = sum(math.comb(15, i) for i in range(10, 16)) / 2**15
    assert mcnemar_one_sided_p(5, 10) == pytest.approx(want)  # 0.151
    assert mcnemar_one_sided_p(0, 0) == 1.0 and mcnemar_one_sided_p(10, 5) > 0.9
    assert mcnemar_exact_p(5, 10) == pytest.approx(2 * want)  # the two-sided test is unchanged
    # Holm: sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    assert holm_adjusted({"a": 0.02, "b": 0.01, "c": 0.04}) == pytest.approx({"a": 0.04, "b": 0.03, "c": 0.04})


def test_noisy_lead_keeps_position_zero():
    # The held-out NQ run of issue 16: 44 vs 39 of 100 at positions 1 and 0, others lower.
    right = {0: set(range(39)), 1: set(range(34)) | set(range(39, 49)), 2: set(range(36)), 3: set(range(30))}
    choice = choose_position(probe_records(right))
    assert choice["most_accurate"] == 1 and choice["chosen"] == 0
    row = choice["rows"][1]
    assert (row["correct"], row["only_first"], row["only_here"]) == (44, 5, 10)
    assert row["p"] == pytest.approx(mcnemar_one_sided_p(5, 10)) and not row["supported"]
    assert choice["reason"].startswith("kept position 0: no position's lead is statistically supported")
    low, high = choice["rows"][0]["ci95"]
    assert low < 39 < high and "*" not in choice_table(choice).splitlines()[2]


def test_real_lead_picks_the_last_position():
    # SmolLM2-like: the last position far better than the first, the middle worse.
    n = 300
    right = {0: set(range(60)), 5: set(range(50)), 10: set(range(45)), 19: set(range(40)) | set(range(100, 200))}
    choice = choose_position(probe_records(right, n))
    assert choice["chosen"] == 19 and choice["rows"][-1]["supported"]
    assert choice["rows"][-1]["p_holm"] <= 0.05 and "beats position 0" in choice["reason"]
    assert " *" in choice_table(choice).splitlines()[4]


def test_holm_counts_every_candidate():
    # One position 8 ahead on 10 discordant questions (p 0.0107 alone) among 19 others: not enough.
    right = {p: set(range(40)) for p in range(20)}
    right[7] = set(range(1, 40)) | set(range(50, 59))  # 1 only at 0, 9 only at 7
    alone = mcnemar_one_sided_p(1, 9)
    assert alone == pytest.approx(11 / 1024)
    assert choose_position(probe_records({0: right[0], 7: right[7]}))["chosen"] == 7
    assert choose_position(probe_records(right))["chosen"] == 0


def test_bad_probes_are_errors():
    with pytest.raises(UserError, match="other questions"):
        choose_position(probe_records({0: set()}, 3) + [{"example_id": 0, "gold_idx": 1, "correct": True}])
    with pytest.raises(UserError, match="probe_alpha"):
        choose_position(probe_records({0: set()}, 3), alpha=1.5)


def test_bad_probe_alpha_fails_before_anything_is_loaded(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "gen_advantageous_pos_for_R1.py"), "--input-path",
                           str(tmp_path / "missing.jsonl"), "--gold_doc", "auto", "--probe_alpha", "0",
                           "--output-path", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "error: --probe_alpha must be between 0 and 1, got 0.0"
    assert not os.path.exists(tmp_path / "out")
