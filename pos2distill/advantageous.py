"""Stage 1's advantageous position from the probe's answers, without moving it on noise.

``--gold_doc auto`` asks held-out questions greedily with the gold document at each probed
position. The first probed position (normally 0, the reference's choice) is kept unless
another position answers *the same questions* better by a lead the data supports:

- each other probed position c gets a one-sided exact McNemar test of "c is more accurate
  than the first" on the discordant questions (right only at c vs right only at the first);
- the family is every probed position but the first, leading or not, and Holm's step-down
  correction keeps its family-wise error rate at ``alpha`` (Holm: valid under any dependence
  - the positions share questions - and never less powerful than Bonferroni);
- among the positions that pass, the most accurate is taken (ties: the earlier).

With 100 questions a 44 vs 39 lead is noise (one-sided p ~0.15 before correction); a
position far ahead of the first on 300 questions passes easily.
"""

from .errors import UserError
from .paired import discordant, holm_adjusted, index_records, mcnemar_one_sided_p, paired_difference_interval
from .report import wilson_interval

TEST_NAME = "one-sided exact McNemar vs the first position, Holm-corrected over the other positions"


def choose_position(records: list[dict], alpha: float = 0.05) -> dict:
    """The choice and its evidence: ``{"chosen", "baseline", "reason", "rows": [...]}``.

    ``records`` carry ``example_id``, ``gold_idx`` and ``correct`` (as ``evaluate_positions``
    writes them); every position must cover the same examples.
    """
    if not 0 < alpha < 1:
        raise UserError(f"--probe_alpha must be between 0 and 1, got {alpha}")
    correct, _ = index_records(records, "probe")
    by_position: dict[int, dict] = {}
    for (example_id, position), value in correct.items():
        by_position.setdefault(position, {})[example_id] = value
    if not by_position:
        raise UserError("probe: no answers to choose a position from")
    positions = sorted(by_position)
    baseline = positions[0]
    questions = set(by_position[baseline])
    for position in positions:
        if set(by_position[position]) != questions:
            raise UserError(f"probe: position {position} was asked other questions than position {baseline}")
    first = by_position[baseline]
    rows, p_values = [], {}
    for position in positions:
        answers = by_position[position]
        right = sum(answers.values())
        only_first, only_here = discordant(first, answers, questions)
        diff, low, high = paired_difference_interval(only_first, only_here, len(questions))
        row = {"position": position, "n": len(questions), "correct": right,
               "accuracy": 100.0 * right / len(questions), "ci95": wilson_interval(right, len(questions)),
               "difference": diff, "paired_ci95": (low, high), "only_first": only_first, "only_here": only_here}
        if position != baseline:
            p_values[position] = mcnemar_one_sided_p(only_first, only_here)
        rows.append(row)
    adjusted = holm_adjusted(p_values)
    for row in rows:
        position = row["position"]
        row["p"] = p_values.get(position)
        row["p_holm"] = adjusted.get(position)
        row["supported"] = position in adjusted and adjusted[position] <= alpha
    supported = [row for row in rows if row["supported"]]
    best_row = max(rows, key=lambda row: (row["accuracy"], -row["position"]))
    if supported:
        chosen = max(supported, key=lambda row: (row["accuracy"], -row["position"]))
        reason = (f"position {chosen['position']} beats position {baseline} on the same {len(questions)} questions "
                  f"(Holm-adjusted one-sided McNemar p {chosen['p_holm']:.3g} <= {alpha})")
        chosen = chosen["position"]
    else:
        chosen = baseline
        if best_row["position"] == baseline:
            reason = f"position {baseline} is the most accurate; kept"
        else:
            reason = (f"kept position {baseline}: no position's lead is statistically supported (best "
                      f"{best_row['position']}: {best_row['accuracy']:.1f} vs {rows[0]['accuracy']:.1f}, "
                      f"Holm-adjusted p {best_row['p_holm']:.3g} > {alpha})")
    return {"chosen": chosen, "baseline": baseline, "most_accurate": best_row["position"], "reason": reason,
            "alpha": alpha, "test": TEST_NAME, "questions": len(questions), "rows": rows}


def choice_table(choice: dict) -> str:
    """The probe's curve with 95% intervals and the tests, one line per position."""
    header = (f"{'pos':>4} {'right':>9} {'acc':>6} {'95% CI':>13} {'vs first':>8} {'paired 95% CI':>15} "
              f"{'only1st':>7} {'onlyhere':>8} {'p':>7} {'p_holm':>7}")
    lines = [header]
    for row in choice["rows"]:
        low, high = row["ci95"]
        plow, phigh = row["paired_ci95"]
        p = "" if row["p"] is None else f"{row['p']:.3g}"
        p_holm = "" if row["p_holm"] is None else f"{row['p_holm']:.3g}"
        mark = " *" if row["supported"] else ""
        lines.append(f"{row['position']:>4} {row['correct']:>4}/{row['n']:<4} {row['accuracy']:>6.1f} "
                     f"{low:>6.1f}..{high:<5.1f} {row['difference']:>+8.1f} {plow:>+7.1f}..{phigh:<+6.1f} "
                     f"{row['only_first']:>7} {row['only_here']:>8} {p:>7} {p_holm:>7}{mark}")
    lines.append(f"(* lead over position {choice['baseline']} supported at alpha {choice['alpha']}: {choice['test']})")
    return "\n".join(lines)
