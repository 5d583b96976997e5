"""Is a run's accuracy curve flat over the gold positions, within noise?

The same questions are answered at every position, so the positions are k matched binary samples:
Cochran's Q tests "accuracy is equal at every position" (the k-position form of McNemar's test,
which ``paired.py`` uses for two runs). A curve is called flat when Q's p-value is at least
``ALPHA``. Not rejecting is not proof of flatness, so the max - min gap over positions is reported
with a 95% percentile bootstrap interval over questions: its upper end is the largest gap the
data still allow (the point estimate is biased upward by noise, which is why it is not the flag).
"""

import math

from .paired import index_records

ALPHA = 0.05


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with integer ``df`` degrees of freedom, in closed form:
    even df = 2m: exp(-x/2) * sum_{i<m} (x/2)^i / i!;
    odd df = 2m+1: erfc(sqrt(x/2)) + exp(-x/2) * sum_{i<m} (x/2)^(i+1/2) / Gamma(i+3/2)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if x <= 0:
        return 1.0
    half = x / 2.0
    if df % 2 == 0:
        term, total = 1.0, 0.0
        for i in range(df // 2):
            total += term
            term *= half / (i + 1)
        return min(1.0, math.exp(-half) * total)
    term, total = math.sqrt(half) / math.gamma(1.5), 0.0
    for i in range(df // 2):
        total += term
        term *= half / (i + 1.5)
    return min(1.0, math.erfc(math.sqrt(half)) + math.exp(-half) * total)


def cochran_q(table: list[list[bool]]) -> tuple[float, int, float]:
    """(Q, df, p) for rows = questions, columns = the k positions (1 = correct):
    Q = (k - 1) * (k * sum_j C_j^2 - T^2) / (k * T - sum_i R_i^2), C_j column sums, R_i row sums,
    T the total; Q ~ chi-square(k - 1) when every position has the same accuracy. Without a
    question answered right at some positions and wrong at others, Q = 0 and p = 1."""
    k = len(table[0]) if table else 0
    if k < 2:
        raise ValueError("Cochran's Q needs at least 2 positions")
    columns = [sum(row[j] for row in table) for j in range(k)]
    rows = [sum(row) for row in table]
    total = sum(rows)
    denominator = k * total - sum(r * r for r in rows)
    if denominator == 0:
        return 0.0, k - 1, 1.0
    q = (k - 1) * (k * sum(c * c for c in columns) - total * total) / denominator
    return q, k - 1, chi2_sf(q, k - 1)


def gap_interval(table: list[list[bool]], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(gap, low, high) in points: max - min accuracy over the columns, and its 95% percentile
    bootstrap interval over rows (questions resampled with replacement, seeded)."""
    import numpy as np

    matrix = np.asarray(table, dtype=np.float64)
    accuracy = matrix.mean(axis=0)
    draws = np.random.default_rng(seed).integers(0, len(matrix), size=(resamples, len(matrix)))
    resampled = matrix[draws].mean(axis=1)  # resamples x positions
    gaps = resampled.max(axis=1) - resampled.min(axis=1)
    low, high = np.percentile(gaps, [2.5, 97.5])
    return 100.0 * float(accuracy.max() - accuracy.min()), 100.0 * float(low), 100.0 * float(high)


def flatness(records: list[dict], label: str = "run") -> dict:
    """Cochran's Q and the gap interval of one stage-4 predictions file (questions that have every
    position; a question missing one is left out and counted)."""
    correct, _ = index_records(records, label)
    positions = sorted({p for _, p in correct})
    questions = sorted({e for e, _ in correct})
    complete = [e for e in questions if all((e, p) in correct for p in positions)]
    table = [[correct[(e, p)] for p in positions] for e in complete]
    if len(positions) < 2 or not table:
        return {"positions": positions, "questions": len(complete), "left_out": len(questions) - len(complete),
                "q": None, "df": None, "p": None, "gap": None, "gap_ci95": None, "flat": None}
    q, df, p = cochran_q(table)
    gap, low, high = gap_interval(table)
    return {"positions": positions, "questions": len(complete), "left_out": len(questions) - len(complete),
            "q": q, "df": df, "p": p, "gap": gap, "gap_ci95": [low, high], "flat": p >= ALPHA}
